"""The API key, checked once for every request in front of routing: a new route cannot forget it.

Open without a key: the health checks (Kubernetes probes), the API documentation and its assets, and
``/metrics`` unless ``protect_metrics``. Everything else — inference, model and server metadata, model
configuration and readiness, the repository API, unknown paths — answers 401 without the right key, so a
client without it learns nothing, not even which models or routes exist.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import Unauthorized
from ..settings import Settings
from .common import error_response

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json"})
OPEN_PREFIXES = ("/static-offline-docs/",)


def given_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries: ``X-API-Key``, else ``Authorization: Bearer``."""
    bearer = None
    for name, value in headers:
        if name == b"x-api-key":
            return value
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            bearer = value[7:].strip()
    return bearer


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        secret = settings.api_key
        self.key = secret.get_secret_value().encode() if secret is not None else None
        self.open_paths = OPEN_PATHS if settings.protect_metrics else OPEN_PATHS | {"/metrics"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or self._open(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = given_key(scope["headers"])
        if given and hmac.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        message = "wrong API key" if given else "missing API key: send header X-API-Key (or Authorization: Bearer)"
        challenge = {"WWW-Authenticate": 'Bearer realm="visionserve"'}
        await error_response(Unauthorized(message, headers=challenge))(scope, receive, send)

    def _open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(OPEN_PREFIXES)

