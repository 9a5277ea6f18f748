"""What every route needs: the model-request preamble (lookup, deadline, admission and metrics), body reading
with a size limit, error responses (the API key is checked in front of every route: ``auth.ApiKeyMiddleware``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from ..dataplane import DataPlane
from ..errors import BadRequest, InvalidParameter, PayloadTooLarge, VisionServeError
from ..registry import LoadedModel


def dataplane(request: Request) -> DataPlane:
    return request.app.state.dataplane  # type: ignore[no-any-return]


@asynccontextmanager
async def admitted(request: Request, model: str, version: str | None, endpoint: str
                   ) -> AsyncIterator[tuple[DataPlane, LoadedModel, float | None]]:
    """The preamble of every request for a model: look it up (404), read its deadline (422), admit it at the
    door (503 beyond ``max_inflight``, before the body is read) and count, time and label it as ``endpoint``
    until the block ends. Yields the data plane, the model and the deadline."""
    dp = dataplane(request)
    m = dp.model(model, version)
    due = deadline(request)
    async with dp.track(m, endpoint):
        yield dp, m, due


def error_response(e: VisionServeError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status_code, headers=e.headers or None)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise InvalidParameter(f"invalid Content-Length {declared!r}") from None
        if n > limit:
            raise PayloadTooLarge(f"body of {n} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # gone, or cut off by the body timeout: nobody reads this answer
        raise BadRequest("the client disconnected before sending the whole body") from None
    return b"".join(chunks)


def deadline(request: Request) -> float | None:
    """``X-Request-Timeout-Ms`` (or the configured default) as a monotonic deadline."""
    raw = request.headers.get("x-request-timeout-ms")
    if raw is None:
        default = request.app.state.settings.default_timeout_ms
        return None if default is None else time.monotonic() + default / 1000.0
    try:
        ms = float(raw)
    except ValueError:
        raise InvalidParameter(f"X-Request-Timeout-Ms must be a number of milliseconds, got {raw!r}") from None
    if not 0 < ms <= 3_600_000:
        raise InvalidParameter(f"X-Request-Timeout-Ms must be in (0, 3600000], got {raw!r}")
    return time.monotonic() + ms / 1000.0
