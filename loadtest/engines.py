"""Senders: how a worker turns "request number i" into an HTTP exchange.

``raw`` (default): one :class:`~loadtest.http.Connection` per worker, pre-encoded bytes.
``aiohttp``: one shared ``ClientSession`` whose pool holds as many connections as workers.
Both return ``(status, body)`` or raise :class:`~loadtest.http.TransportError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from .http import Connection, Target, TransportError, encode_request
from .payloads import Payload


class Sender(Protocol):
    async def send(self, i: int) -> tuple[int, bytes]: ...

    def close(self) -> None: ...


class RawEngine:
    def __init__(self, target: Target, payloads: Sequence[Payload], timeout: float, workers: int) -> None:
        self.target = target
        self.timeout = timeout
        self.encoded = [encode_request(target, p.method, p.path, p.headers, p.body) for p in payloads]

    async def start(self) -> None:
        pass

    def sender(self) -> Sender:
        return _RawSender(Connection(self.target), self.encoded, self.timeout)

    async def aclose(self) -> None:
        pass


class _RawSender:
    __slots__ = ("conn", "encoded", "n", "timeout")

    def __init__(self, conn: Connection, encoded: list[bytes], timeout: float) -> None:
        self.conn, self.encoded, self.n, self.timeout = conn, encoded, len(encoded), timeout

    async def send(self, i: int) -> tuple[int, bytes]:
        return await self.conn.request(self.encoded[i % self.n], self.timeout)

    def close(self) -> None:
        self.conn.close()


class AiohttpEngine:
    def __init__(self, target: Target, payloads: Sequence[Payload], timeout: float, workers: int) -> None:
        self.target = target
        self.payloads = list(payloads)
        self.timeout = timeout
        self.workers = workers
        self.session: Any = None

    async def start(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.workers, limit_per_host=self.workers, force_close=False)
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            skip_auto_headers=("User-Agent",),
        )

    def sender(self) -> Sender:
        return _AiohttpSender(self)

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()


class _AiohttpSender:
    def __init__(self, engine: AiohttpEngine) -> None:
        self.engine = engine
        self.requests = [(p.method, engine.target.url(p.path), p.headers, p.body) for p in engine.payloads]

    async def send(self, i: int) -> tuple[int, bytes]:
        import aiohttp

        method, url, headers, body = self.requests[i % len(self.requests)]
        try:
            async with self.engine.session.request(method, url, headers=headers, data=body) as resp:
                return resp.status, await resp.read()
        except asyncio.TimeoutError:
            raise TransportError("timeout", "no response before --timeout") from None
        except aiohttp.ClientConnectorError as exc:
            raise TransportError("connect", str(exc)) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise TransportError("disconnect", str(exc)) from None
        except aiohttp.ClientError as exc:
            raise TransportError("protocol", str(exc)) from None

    def close(self) -> None:
        pass


def make_engine(name: str, target: Target, payloads: Sequence[Payload], timeout: float, workers: int):  # type: ignore[no-untyped-def]
    if name == "aiohttp":
        return AiohttpEngine(target, payloads, timeout, workers)
    return RawEngine(target, payloads, timeout, workers)
