"""The Open Inference Protocol (KServe v2) over HTTP/REST, as Triton speaks it, incl. binary tensors.

A second face of the same data plane: these routes only move bytes; the protocol's formats (tensors, the
response document, metadata, configuration) are ``service.oip_codec``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .. import oip_codec as codec
from ..errors import Unavailable
from .common import admitted, dataplane, read_body

router = APIRouter(tags=["open inference protocol"])


@router.get("/v2", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return codec.server_metadata()


@router.get("/v2/health/live", summary="Liveness: the process answers")
async def live() -> dict[str, Any]:
    return {"live": True}


@router.get("/v2/health/ready", summary="Readiness: the first load is over and a model serves (strict: every model)")
async def ready(request: Request) -> Any:
    if request.app.state.draining:
        raise Unavailable("the server is shutting down", retry_after_s=1)
    reason = dataplane(request).registry.not_ready_reason()
    if reason is not None:
        raise Unavailable(reason, retry_after_s=2)
    return {"ready": True}


@router.get("/v2/models/{model}", summary="Model metadata")
@router.get("/v2/models/{model}/versions/{version}", include_in_schema=False)
async def model_metadata(request: Request, model: str, version: str | None = None) -> dict[str, Any]:
    return codec.metadata(dataplane(request).registry, model, version)  # an UNAVAILABLE model's says why


@router.get("/v2/models/{model}/ready", summary="Model readiness")
@router.get("/v2/models/{model}/versions/{version}/ready", include_in_schema=False)
async def model_ready(request: Request, model: str, version: str | None = None) -> dict[str, Any]:
    dp = dataplane(request)
    m = dp.model(model, version)
    if not m.ready:
        raise Unavailable(f"model {model} is not ready", retry_after_s=2)
    return {"name": m.name, "ready": True}


@router.get("/v2/models/{model}/config", summary="Triton-style model configuration")
@router.get("/v2/models/{model}/versions/{version}/config", include_in_schema=False)
async def model_config(request: Request, model: str, version: str | None = None) -> dict[str, Any]:
    return codec.model_config(dataplane(request).model(model, version))


@router.post("/v2/models/{model}/infer", summary="Inference with JSON or binary tensors")
@router.post("/v2/models/{model}/versions/{version}/infer", include_in_schema=False)
async def infer(request: Request, model: str, version: str | None = None) -> Response:
    async with admitted(request, model, version, "infer") as (dp, m, due):
        budget = dp.settings.max_body_bytes
        body = await read_body(request, budget)
        req, inputs = codec.parse_request(body, request.headers.get(codec.HEADER_LENGTH), budget)
        wanted = codec.requested(req, m.runners[0].output_names)  # refuse a bad request before running it
        names, outputs = await dp.infer(m, inputs, due)
        doc, blob = codec.encode_response(req, wanted, m, names, outputs)
        if blob is None:
            return JSONResponse(doc)
        content, header_length = codec.binary_body(doc, blob)
        return Response(content, media_type="application/octet-stream",
                        headers={codec.HEADER_LENGTH: str(header_length)})
