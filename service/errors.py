"""Errors as types. Each carries its HTTP status; one handler in ``service.http`` writes ``{"error": ...}``.

Nothing here imports a web framework: the data plane raises these, the transports map them.
"""

from __future__ import annotations


class VisionServeError(Exception):
    """Base class: a failure a client can be told about."""

    status_code = 500
    headers: dict[str, str] = {}

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if headers:
            self.headers = headers


class BadRequest(VisionServeError):
    status_code = 400


class BadImage(BadRequest):
    """Undecodable, corrupt or truncated image."""


class BadTensor(BadRequest):
    """A malformed Open Inference Protocol tensor."""


class Unauthorized(VisionServeError):
    status_code = 401


class ModelNotFound(VisionServeError):
    status_code = 404


class Conflict(VisionServeError):
    """The request conflicts with the server's state or configuration (e.g. model control mode)."""

    status_code = 409


class PayloadTooLarge(VisionServeError):
    status_code = 413


class UnsupportedMedia(VisionServeError):
    status_code = 415


class InvalidParameter(VisionServeError):
    status_code = 422


class Unavailable(VisionServeError):
    """Overloaded (queue full) or not ready yet; clients should retry."""

    status_code = 503

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})



class DeadlineExceeded(VisionServeError):
    status_code = 504
