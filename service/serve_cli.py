"""``visionserve serve``: validate settings and the repository, then run uvicorn."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from .cli_util import fail

Opt = typer.Option


def serve(
    repository: Annotated[Path | None, Opt("--repository", "-r", help="model repository to serve")] = None,
    host: Annotated[str | None, Opt(help="address to bind (default 127.0.0.1)")] = None,
    port: Annotated[int | None, Opt(help="port (default 8000)")] = None,
    config: Annotated[Path | None, Opt(help="settings file (YAML, TOML or JSON)")] = None,
    max_batch_size: Annotated[int | None, Opt(help="default max batch size for every model")] = None,
    instances: Annotated[int | None, Opt(help="ONNX Runtime sessions per model")] = None,
    log_level: Annotated[str | None, Opt(help="debug, info, warning or error")] = None,
    model_control: Annotated[str | None, Opt(
        help="none (read the repository once), poll (pick up new versions live) or explicit (the repository "
             "API loads and unloads)")] = None,
    poll_interval: Annotated[float | None, Opt(help="seconds between repository polls (poll mode; default 2)")] = None,
    load_model: Annotated[list[str] | None, Opt(
        help="explicit mode: a model to load at start (repeatable; '*' for all)")] = None,
    strict_readiness: Annotated[bool | None, Opt(
        "--strict-readiness/--no-strict-readiness",
        help="ready only when every model is available (default: when at least one is)")] = None,
    max_masks: Annotated[int | None, Opt(help="most masked images one /explain may run (default 1024)")] = None,
) -> None:
    """Serve every model in a repository (native API, Open Inference Protocol, /metrics).

    Every option is also an env var VISIONSERVE_<OPTION> (e.g. VISIONSERVE_PORT); see the README for the
    full settings list.
    """
    import uvicorn

    from .repository import model_names
    from .settings import ConfigError, load_settings

    defaults: dict[str, object] = {}
    if max_batch_size is not None:
        defaults["max_batch_size"] = max_batch_size
    if instances is not None:
        defaults["instances"] = instances
    given = dict(repository=repository, host=host, port=port, log_level=log_level, model_control=model_control,
                 poll_interval_s=poll_interval, load_models=load_model or None, strict_readiness=strict_readiness,
                 max_masks=max_masks)
    try:
        settings = load_settings(config, **given)
        if defaults:
            settings = load_settings(config, **given,
                                     defaults=settings.defaults.model_copy(update=defaults).model_dump())
    except ConfigError as e:
        fail(str(e))
    # A broken model does not stop the server (it is UNAVAILABLE, with its reason, in the index); a
    # repository that is not there does. poll and explicit modes may start with no model at all.
    if not settings.repository.is_dir():
        fail(f"model repository {settings.repository} does not exist or is not a directory")
    if settings.model_control == "none" and not model_names(settings.repository):
        fail(f"no models in repository {settings.repository} (build one with `visionserve convert` or "
             "`make models`)")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from threadpoolctl import threadpool_limits

    from .http.app import create_app
    from .http.connections import Limits, guarded_protocol
    from .http.server import DRAIN_INCOMPLETE, GracefulServer, raise_open_file_limit

    # each connection holds a file; keep room for models, logs and the listener
    files = raise_open_file_limit(settings.max_connections + 256)
    max_connections = min(settings.max_connections, max(1, files - 256))
    if max_connections < settings.max_connections:
        logging.getLogger("visionserve").warning(
            "max_connections lowered to %d: the open-file limit is %d", max_connections, files)
    limits = Limits(max_connections=max_connections, header_timeout_s=settings.header_timeout_s,
                    body_timeout_s=settings.body_timeout_s,
                    max_header_bytes=settings.max_header_bytes, drain_idle_close_s=settings.drain_idle_close_s)
    # Inference runs in onnxruntime's own threads; numpy's BLAS only sees small products here (a gallery's
    # scan, saliency sums), where a BLAS thread team beside busy inference workers costs far more than it
    # gains (measured: 1 000 x 1280 scan 9.7 ms with OpenBLAS's threads on a busy 2-core machine, 0.1 ms with one).
    threadpool_limits(1, user_api="blas")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            http=guarded_protocol(limits), timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
                            timeout_graceful_shutdown=settings.graceful_timeout_s or None, access_log=False,
                            backlog=max(2048, max_connections))
    server = GracefulServer(config, on_drain=app.state.start_draining)
    server.run()
    registry = getattr(app.state, "registry", None)
    if registry is not None and registry.loading_thread_alive():
        # Stopped while ONNX Runtime was still creating a session (a native call nothing can interrupt):
        # every accepted request has been answered, so leave now rather than wait for it.
        logging.getLogger("visionserve").info("exiting while a model session is still being created")
        logging.shutdown()
        os._exit(0 if server.drain_complete else DRAIN_INCOMPLETE)
    if not server.started:
        raise typer.Exit(1)
    if not server.drain_complete:
        raise typer.Exit(DRAIN_INCOMPLETE)

