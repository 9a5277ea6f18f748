"""Triton's model repository extension: the index, and load / unload (``--model-control explicit``).

``tritonclient.http``'s ``get_model_repository_index``, ``load_model`` and ``unload_model`` speak to these
unchanged. They need the API key when one is set (``auth.ApiKeyMiddleware``, in front of every route).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errors import BadRequest, InvalidParameter
from .common import dataplane, read_body

router = APIRouter(tags=["model repository"])

_MAX_BODY = 64 * 1024  # these requests carry a few flags; Triton's config/file overrides are not supported


async def _body(request: Request) -> dict[str, Any]:
    raw = await read_body(request, _MAX_BODY)
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    return doc


@router.post("/v2/repository/index", summary="Every model version in the repository, with its state and reason")
async def index(request: Request) -> JSONResponse:
    body = await _body(request)
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidParameter("'ready' must be true or false")
    return JSONResponse(await dataplane(request).registry.index(ready_only=ready))


@router.post("/v2/repository/models/{model}/load",
             summary="Load or reload a model from the repository (--model-control explicit)")
async def load(request: Request, model: str) -> JSONResponse:
    params = (await _body(request)).get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    overrides = sorted(k for k in params if k == "config" or k.startswith("file:"))
    if overrides:
        raise InvalidParameter(f"load parameters {overrides} are not supported: publish the model in the "
                               "repository and load it by name")
    await dataplane(request).registry.load(model)
    return JSONResponse({})


@router.post("/v2/repository/models/{model}/unload",
             summary="Unload a model after its accepted requests finish (--model-control explicit)")
async def unload(request: Request, model: str) -> JSONResponse:
    params = (await _body(request)).get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    await dataplane(request).registry.unload(model)
    return JSONResponse({})
