"""The native API: ``/v1/models``, and how every native route reads an image (a raw or multipart body). Each
task's route (``POST /v1/models/{m}/classify``, ``detect``, ``embed``…) is made by ``service.http.tasks``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ..errors import BadRequest, UnsupportedMedia
from .common import dataplane, read_body

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
