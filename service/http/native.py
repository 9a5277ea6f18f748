"""The native API: ``/v1/models`` and ``classify``/``detect`` on raw or multipart image bodies."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ..errors import BadRequest, UnsupportedMedia
from .common import dataplane, deadline, read_body

router = APIRouter(tags=["native"])

IMAGE_TYPES = {"image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "image/x-ms-bmp",
               "application/octet-stream"}

_BODY = {"content": {t: {"schema": {"type": "string", "format": "binary"}} for t in
                     ("image/jpeg", "image/png", "multipart/form-data")}}


async def image_from_request(request: Request) -> bytes:
    """The image bytes of a raw-image or multipart (field ``image``) body."""
    limit = request.app.state.settings.max_body_bytes
    ctype = request.headers.get("content-type", "application/octet-stream")
    mime = ctype.split(";")[0].strip().lower()
    if mime == "multipart/form-data":
        body = await read_body(request, limit)
        return await _multipart_image(request.headers, body)
    if mime not in IMAGE_TYPES:
        raise UnsupportedMedia(f"unsupported Content-Type {mime!r}: send image/jpeg, image/png, image/webp, "
                               "image/bmp, application/octet-stream or multipart/form-data (field 'image')")
    return await read_body(request, limit)


async def _multipart_image(headers: Headers, body: bytes) -> bytes:
    async def stream():  # type: ignore[no-untyped-def]
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=4, max_fields=16).parse()
    except MultiPartException as e:
        raise BadRequest(f"malformed multipart body: {e.message}") from None
    try:
        field = form.get("image")
        if not isinstance(field, UploadFile):
            raise BadRequest("multipart body has no file field 'image'")
        return await field.read()
    finally:
        await form.close()


@router.get("/v1/models", summary="Every model: versions, task, input, state, execution provider")
async def list_models(request: Request) -> dict[str, Any]:
    return {"models": dataplane(request).list_models()}


@router.post("/v1/models/{model}/classify", openapi_extra={"requestBody": _BODY},
             summary="Classify one image (raw body or multipart field 'image')")
@router.post("/v1/models/{model}/versions/{version}/classify", openapi_extra={"requestBody": _BODY},
             include_in_schema=False)
async def classify(request: Request, model: str, version: str | None = None,
                   top_k: int = Query(5, description="how many classes to return")) -> Response:
    dp = dataplane(request)
    m = dp.model(model, version)
    due = deadline(request)
    async with dp.track(m, "classify"):
        data = await image_from_request(request)
        return JSONResponse(await dp.classify(m, data, top_k, due))  # plain JSON: skips FastAPI's re-encoding


@router.post("/v1/models/{model}/detect", openapi_extra={"requestBody": _BODY},
             summary="Detect objects in one image; boxes in the original image's pixels")
@router.post("/v1/models/{model}/versions/{version}/detect", openapi_extra={"requestBody": _BODY},
             include_in_schema=False)
async def detect(request: Request, model: str, version: str | None = None,
                 score_threshold: float = Query(0.25), iou_threshold: float = Query(0.45),
                 max_detections: int = Query(100),
                 annotate: bool = Query(False, description="return the image with boxes drawn (PNG)")) -> Any:
    dp = dataplane(request)
    m = dp.model(model, version)
    due = deadline(request)
    async with dp.track(m, "detect"):
        data = await image_from_request(request)
        result = await dp.detect(m, data, score_threshold=score_threshold, iou_threshold=iou_threshold,
                                 max_detections=max_detections, deadline=due)
    if annotate:
        from ..detection import annotate as draw

        png = await asyncio.get_running_loop().run_in_executor(None, draw, data, result["detections"])
        return Response(png, media_type="image/png")
    return JSONResponse(result)
