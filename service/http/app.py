"""The FastAPI application: wires settings, metrics, registry and data plane; maps errors once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..dataplane import DataPlane
from ..errors import VisionServeError
from ..metrics import Metrics
from ..registry import Registry
from ..settings import Settings
from ..tasks import routers as task_routers
from . import explain, native, oip, repository
from .auth import ApiKeyMiddleware
from .common import error_response

log = logging.getLogger("visionserve")


def create_app(settings: Settings, metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry(settings, metrics)
        app.state.dataplane = DataPlane(registry, settings, metrics)

        async def load() -> None:
            try:
                await registry.load_all()
                log.info("ready: %d model version(s) from %s", len(registry.models()), settings.repository)
            except Exception as e:  # readiness stays false and says why
                registry.error = f"model loading failed: {e}"
                log.error("%s", registry.error)

        loader = asyncio.create_task(load(), name="load-models")
        app.state.registry = registry
        try:
            yield
        finally:
            if not loader.done():  # stopping during start-up: give up loading, serve what is loaded
                log.info("stopping while models load: loading cancelled")
                registry.cancel_loading()
                loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await registry.close()  # every accepted request is finished before this returns
            app.state.dataplane.close()
            log.info("stopped")

    # Swagger UI and ReDoc from the package, not a CDN: /docs works on an air-gapped edge box
    app = FastAPIOffline(
        title="visionserve", version=__version__, lifespan=lifespan,
        description="Image classification and detection with dynamic batching on ONNX Runtime. Native API "
                    "and the Open Inference Protocol (KServe v2).",
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = False

    def start_draining() -> None:
        """SIGTERM: readiness answers 503 from now on (the server then stops accepting and drains)."""
        app.state.draining = True

    app.state.start_draining = start_draining
    app.add_middleware(ApiKeyMiddleware, settings=settings)
    native_routes, extra_routes = task_routers()
    # routes are tried in order: the tasks' native routes (the hot ones) first, so that a classify request is
    # not matched against every other route before its own
    for router in native_routes:
        app.include_router(router)
    app.include_router(native.router)
    app.include_router(oip.router)
    app.include_router(repository.router)
    app.include_router(explain.router)
    for router in extra_routes:  # what tasks bring (embed: galleries)
        app.include_router(router)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def root() -> dict[str, Any]:
        return {"name": "visionserve", "version": __version__, "docs": "/docs", "models": "/v1/models"}

    @app.exception_handler(VisionServeError)
    async def _ours(request: Request, e: VisionServeError) -> JSONResponse:
        if e.status_code >= 500 and e.status_code not in (503, 504):
            log.error("%s %s: %s", request.method, request.url.path, e.message)
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in err['loc'][1:]) or err['loc'][0]}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"error": "invalid parameter: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = "not found" if e.status_code == 404 else str(e.detail)
        return JSONResponse({"error": message}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal server error"}, status_code=500)

    return app
