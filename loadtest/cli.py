"""``visionserve loadtest URL --model M ...`` (a run or a sweep) and ``visionserve loadtest compare A B``.

The sub-app is a group whose default command is ``run``: anything that is not a subcommand name is
handed to ``run``, so ``visionserve loadtest http://127.0.0.1:8000 --model m`` works as written.
Heavy imports (matplotlib) happen only when a report is written.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import click
import typer
from typer.core import TyperGroup


class _DefaultToRun(TyperGroup):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


loadtest = typer.Typer(
    cls=_DefaultToRun,
    help="Load-test a visionserve (or any Open Inference Protocol) server. "
    "`visionserve loadtest URL --model M [options]`; `visionserve loadtest compare A.json B.json`.",
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _headers(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            _fail(f"--header must look like 'Name: value', got {item!r}")
        out[name.strip()] = value.strip()
    return out


def _discover_model(url: str) -> str:
    """The first model the server lists at /v1/models (when --model is not given)."""
    from .http import Target, TransportError, fetch

    try:
        status, body = asyncio.run(fetch(Target.parse(url).url("/v1/models"), timeout=5.0))
        data: Any = json.loads(body)
    except (TransportError, ValueError) as exc:
        _fail(f"--model not given and {url}/v1/models could not be read ({exc}); pass --model NAME")
    models = data.get("models", data) if isinstance(data, dict) else data
    # a model listed as UNAVAILABLE (broken, or unloaded) cannot be load-tested
    names = [m.get("name") for m in models if isinstance(m, dict) and m.get("name")
             and m.get("state", "READY") == "READY"] if status == 200 else []
    if not names:
        _fail(f"--model not given and {url}/v1/models lists no model; pass --model NAME")
    return str(names[0])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


@loadtest.command("run", epilog="Compare two saved runs: visionserve loadtest compare A.json B.json")
def run(
    url: Annotated[str, typer.Argument(help="server base URL")] = "http://127.0.0.1:8000",
    model: Annotated[str | None, typer.Option("--model", "-m", help="model name (default: first listed)")] = None,
    image: Annotated[Path | None, typer.Option(help="an image file, or a directory of images (cycled)")] = None,
    kind: Annotated[str, typer.Option(help="classify | detect | embed | identify (--model names the gallery) | "
                                           "infer (OIP JSON) | infer-binary (OIP binary)")] = "classify",
    version: Annotated[str | None, typer.Option(help="model version (default: the server's choice)")] = None,
    concurrency: Annotated[int | None, typer.Option(help="closed loop: requests in flight (default 1)")] = None,
    rate: Annotated[float | None, typer.Option(help="open loop: requests/s on a fixed schedule")] = None,
    arrival: Annotated[str, typer.Option(help="open loop arrivals: constant | poisson")] = "constant",
    connections: Annotated[int, typer.Option(help="open loop: most requests in flight")] = 256,
    duration: Annotated[float | None, typer.Option(help="seconds measured (default 10 unless --requests)")] = None,
    requests: Annotated[int | None, typer.Option(help="requests measured (stops at whichever comes first)")] = None,
    warmup: Annotated[float, typer.Option(help="seconds of warm-up, not recorded")] = 1.0,
    timeout: Annotated[float, typer.Option(help="seconds per request before it counts as an error")] = 10.0,
    window: Annotated[float | None, typer.Option(help="measurement window, s (default 1; sweeps 2)")] = None,
    sweep: Annotated[str | None, typer.Option(help="1,2,4,8 | auto | rate:50,100 | concurrency:auto")] = None,
    slo_p99_ms: Annotated[float | None, typer.Option(help="p99 objective; a single run exits 1 above it")] = None,
    stability: Annotated[float, typer.Option(help="sweep: window-to-window tolerance (fraction)")] = 0.15,
    max_windows: Annotated[int, typer.Option(help="sweep: windows per step at most")] = 10,
    max_steps: Annotated[int, typer.Option(help="sweep auto: steps at most")] = 10,
    max_error_rate: Annotated[float, typer.Option(help="sweep: a step above this error rate fails")] = 0.01,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the full result as JSON")] = None,
    report: Annotated[Path | None, typer.Option(help="write report.md and PNG plots into this directory")] = None,
    metrics: Annotated[bool, typer.Option(help="scrape the server's /metrics before and after")] = True,
    metrics_url: Annotated[str | None, typer.Option(help="where /metrics is (default URL/metrics)")] = None,
    header: Annotated[list[str] | None, typer.Option(help="extra request header 'Name: value' (repeat)")] = None,
    query: Annotated[str, typer.Option(help="query string for every request, e.g. top_k=1")] = "",
    engine: Annotated[str, typer.Option(help="raw (fast, default) | aiohttp")] = "raw",
    seed: Annotated[int, typer.Option(help="seed for Poisson arrivals")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no live progress")] = False,
) -> None:
    """Run a load test (or a sweep) against URL and print latency, throughput and errors."""
    from rich.console import Console

    from .config import ConfigError, LoadConfig, LoadError
    from .render import print_sweep_summary, progress_text, result_table

    console = Console(stderr=False)
    if sweep is not None and requests is not None:
        _fail("--requests does not apply to --sweep (each step runs until stable or --max-windows)")
    if image is None:
        _fail("--image FILE|DIR is required")
    cfg = LoadConfig(
        url=url,
        model=model or "",
        kind=kind,
        version=version,
        image=image,
        concurrency=concurrency,
        rate=rate,
        arrival=arrival,
        connections=connections,
        duration=duration,
        requests=requests,
        warmup=warmup,
        timeout=timeout,
        window=window if window is not None else (2.0 if sweep else 1.0),
        query=query,
        headers=_headers(header or []),
        metrics=metrics,
        metrics_url=metrics_url,
        engine=engine,
        seed=seed,
    )
    try:
        if not cfg.model:
            cfg.model = "placeholder"
            cfg.validate()  # reject bad arguments before touching the network
            cfg.model = _discover_model(url)
        cfg.validate()
        spec = None
        if sweep is not None:
            from .sweep import parse_sweep

            spec = parse_sweep(sweep, rate, concurrency)
    except ConfigError as exc:
        _fail(str(exc))

    live = _live(console, quiet)
    progress = None
    if live is not None:

        def progress(p: dict[str, Any]) -> None:
            live.update(progress_text(p), refresh=True)

    try:
        if live is not None:
            live.start()
        if spec is None:
            from .runner import run_load

            result: Any = run_load(cfg, progress=progress)
        else:
            from .sweep import run_sweep

            def on_step(step: Any) -> None:
                console.print(
                    f"step {step.load:g}: {step.throughput_rps:,.1f} req/s, p99 {step.latency_ms['p99']} ms, "
                    f"{step.error_count} errors, {'stable' if step.stable else 'not stable'}"
                )

            result = run_sweep(
                cfg, spec, slo_p99_ms, stability, max_windows, max_steps, max_error_rate, progress, on_step
            )
    except (ConfigError, LoadError) as exc:
        _fail(str(exc), 2 if isinstance(exc, ConfigError) else 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    finally:
        if live is not None:
            live.stop()

    if spec is None:
        console.print(result_table(result, title=f"{cfg.kind} → {cfg.url} model {cfg.model}"))
    else:
        print_sweep_summary(console, result)
    data = result.to_dict()
    if json_out is not None:
        _write_json(json_out, data)
        console.print(f"wrote {json_out}")
    if report is not None:
        from .report import write_report

        path = write_report(report, data)
        console.print(f"wrote {path}")
    if spec is None:
        if result.ok == 0:
            _fail("no successful responses", 1)
        if slo_p99_ms is not None and result.percentile_ms(99.0) > slo_p99_ms:
            _fail(f"p99 {result.percentile_ms(99.0):.2f} ms is above --slo-p99-ms {slo_p99_ms:g}", 1)


def _live(console: Any, quiet: bool) -> Any:
    if quiet or not sys.stdout.isatty():
        return None
    from rich.live import Live

    return Live(console=console, auto_refresh=False, transient=True)


@loadtest.command("compare")
def compare(
    a: Annotated[Path, typer.Argument(help="baseline JSON (from --json)")],
    b: Annotated[Path, typer.Argument(help="candidate JSON (from --json)")],
) -> None:
    """Compare two saved runs (or sweeps): a table of B − A for throughput, percentiles and errors."""
    from rich.console import Console

    from .compare import compare_files, render

    try:
        rows, title = compare_files(a, b)
    except ValueError as exc:
        _fail(str(exc))
    Console().print(render(rows, title))


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        _fail(f"{what} takes comma-separated whole numbers, got {text!r}")
    if not values or min(values) < 1:
        _fail(f"{what} takes comma-separated numbers >= 1, got {text!r}")
    return values


def tune(
    repository: Annotated[Path, typer.Option("--repository", "-r", help="model repository")],
    model: Annotated[str, typer.Option("--model", "-m", help="the model to tune (its newest version)")],
    slo_p99_ms: Annotated[float, typer.Option("--slo-p99-ms", help="p99 latency target")] = 100.0,
    out: Annotated[Path, typer.Option("--out", help="the config file to write (serve --config reads it)")] = Path(
        "serve.yaml"),
    report: Annotated[Path | None, typer.Option("--report", help="report directory (default: beside --out)")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="image file or directory sent (default: sample "
                                                               "photos)")] = None,
    instances: Annotated[str | None, typer.Option(help="instances to try (default: 1 and the usable CPUs)")] = None,
    threads: Annotated[str | None, typer.Option(help="intra-op threads to try (default: 1 and the usable CPUs)")
                       ] = None,
    batch: Annotated[str, typer.Option(help="largest batches the batcher forms, to try")] = "1,4,8",
    delay_ms: Annotated[str, typer.Option(help="batch delays to try, ms")] = "0,2",
    duration: Annotated[float, typer.Option(help="seconds per measurement window")] = 2.0,
    max_steps: Annotated[int, typer.Option(help="concurrency levels per candidate at most (1, 2, 4, ...)")] = 7,
) -> None:
    """Sweep instances x intra-op threads x batch x delay against a p99 target; write the best serving config."""
    from rich.console import Console

    from visionserve.service.cpus import available_cpus
    from visionserve.service.repository import RepositoryError, valid_entries

    from .tune import grid
    from .tune import tune as run_tune

    console = Console(stderr=True)
    try:
        entry = next(valid_entries(repository, model), None)
    except RepositoryError as e:
        _fail(str(e))
    if entry is None:
        _fail(f"no valid version of model {model!r} in {repository}")
    if entry.manifest.task != "classify":
        _fail(f"tune drives /classify; {model} is a {entry.manifest.task} model")
    cpus = available_cpus()
    default = sorted({1, cpus})
    try:
        candidates = grid(_ints(instances, "--instances") if instances else default,
                          _ints(threads, "--threads") if threads else default, _ints(batch, "--batch"),
                          [float(v) for v in delay_ms.split(",") if v.strip()], cpus)
    except ValueError as e:
        _fail(str(e))
    images = _tune_images(image)
    report_dir = report or out.parent / f"{out.stem}-report"
    console.print(f"tuning {model} on {cpus} usable CPUs: {len(candidates)} candidates, p99 <= {slo_p99_ms:g} ms")

    def progress(i: int, n: int, o: Any) -> None:
        result = (f"{o.best_rps:.1f} req/s at c={o.best_concurrency}, p99 {o.best_p99_ms:.1f} ms"
                  if o.best_rps is not None else (o.error or "no level met the target"))
        console.print(f"[{i}/{n}] {o.candidate.label}: {result}")

    _, winner = run_tune(entry.directory.parent, model, images, candidates, slo_p99_ms=slo_p99_ms,
                         duration=duration, max_steps=max_steps, out=out, report_dir=report_dir, progress=progress)
    if winner is None:
        _fail(f"no candidate met p99 <= {slo_p99_ms:g} ms; report: {report_dir / 'report.md'}", code=1)
    console.print(f"best: {winner.candidate.label}: {winner.best_rps:.1f} req/s, p99 {winner.best_p99_ms:.1f} ms")
    console.print(f"wrote {out} (visionserve serve --config {out}) and {report_dir / 'report.md'}")


def _tune_images(image: Path | None) -> list[bytes]:
    """--image as given, else one synthetic 640x480 photo-like JPEG (pass real photos for real figures: JPEG
    decoding costs what the pictures' size and detail make it cost)."""
    if image is not None:
        from .payloads import load_images

        try:
            return load_images(image)
        except ValueError as e:
            _fail(str(e))
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([128 + 100 * np.sin(x / 37.0), 128 + 100 * np.cos(y / 23.0), 128 + 60 * np.sin((x + y) / 51.0)],
                    axis=-1)
    pixels = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return [buf.getvalue()]
