"""A minimal HTTP/1.1 keep-alive client on asyncio protocols: the load generator's hot path.

Each worker owns one connection and sends pre-encoded request bytes, so a request costs one
``transport.write`` and one small header parse. That is several times cheaper than a general
client (see ``benchmarks/loadtest_vs_wrk.py``); ``engine="aiohttp"`` remains for TLS and as a
cross-check.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from dataclasses import dataclass
from urllib.parse import urlsplit


class TransportError(Exception):
    """A request that got no HTTP response; ``kind`` is how it failed (connect, timeout, disconnect)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass(frozen=True)
class Target:
    """Where the server is: scheme, host, port and the base path that request paths are joined to."""

    scheme: str
    host: str
    port: int
    base_path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"URL must look like http://HOST:PORT, got {url!r}")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise ValueError(f"bad port in URL {url!r}") from exc
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def netloc(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.netloc}{self.base_path}{path}"


def encode_request(target: Target, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """The exact bytes of one HTTP/1.1 request (keep-alive)."""
    lines = [f"{method} {target.base_path}{path} HTTP/1.1", f"Host: {target.netloc}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _ResponseParser(asyncio.Protocol):
    """Collects bytes and resolves ``waiter`` with ``(status, body)`` once one response is complete."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.keep_alive = True
        self._head: tuple[int, int, int, bool] | None = None  # status, header end, length (-1: chunked)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            head = self._head
            if head is not None and head[2] == -2:  # body delimited by close
                waiter.set_result((head[0], bytes(self.buf[head[1] :])))
            elif not self.buf:
                waiter.set_exception(TransportError("disconnect", "server closed the connection before any response"))
            else:
                waiter.set_exception(TransportError("disconnect", "server closed the connection mid-response"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        try:
            done = self._parse()
        except ValueError as exc:
            waiter.set_exception(TransportError("protocol", str(exc)))
            self.close()
            return
        if done is not None:
            self.waiter = None
            waiter.set_result(done)

    def _parse(self) -> tuple[int, bytes] | None:
        buf = self.buf
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    raise ValueError("response header too large")
                return None
            self._head = self._parse_head(bytes(buf[:end]), end + 4)
        status, start, length, _ = self._head
        if length >= 0:
            if len(buf) < start + length:
                return None
            body = bytes(buf[start : start + length])
            del buf[: start + length]
        elif length == -1:
            parsed = _parse_chunked(buf, start)
            if parsed is None:
                return None
            body, consumed = parsed
            del buf[:consumed]
        else:
            return None  # read until the server closes
        self.keep_alive = self._head[3]
        self._head = None
        return status, body

    @staticmethod
    def _parse_head(head: bytes, start: int) -> tuple[int, int, int, bool]:
        lines = head.split(b"\r\n")
        first = lines[0].split(b" ", 2)
        if len(first) < 2 or not first[0].startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.x response: {lines[0][:60]!r}")
        status = int(first[1])
        length, keep_alive = -2, first[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                length = -1
            elif name == b"connection":
                keep_alive = value.strip().lower() == b"keep-alive"
        if status in (204, 304) or 100 <= status < 200:
            length = 0
        return status, start, length, keep_alive

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _parse_chunked(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """A complete chunked body starting at ``pos`` → (body, bytes consumed); None if incomplete."""
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)  # trailers (usually none) end with an empty line
            return (bytes(out), end + 4) if end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


class Connection:
    """One keep-alive connection that reconnects when the server closes it."""

    def __init__(self, target: Target, connect_timeout: float = 5.0) -> None:
        self.target = target
        self.connect_timeout = connect_timeout
        self._proto: _ResponseParser | None = None
        self._ssl = ssl_module.create_default_context() if target.scheme == "https" else None

    async def _connect(self) -> _ResponseParser:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(_ResponseParser, self.target.host, self.target.port, ssl=self._ssl),
                self.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise TransportError("connect", str(exc) or type(exc).__name__) from None
        return proto

    async def request(self, data: bytes, timeout: float) -> tuple[int, bytes]:
        """Send pre-encoded request bytes; return (status, body) or raise :class:`TransportError`.

        A kept-alive connection the server closed while idle (a race with its keep-alive timeout)
        is reopened and the request sent once more, as browsers and HTTP clients do.
        """
        proto = self._proto
        reused = proto is not None and not proto.closed and proto.keep_alive
        try:
            return await self._exchange(data, timeout)
        except TransportError as exc:
            if not (reused and exc.kind == "disconnect" and exc.args[0].endswith("before any response")):
                raise
        return await self._exchange(data, timeout)

    async def _exchange(self, data: bytes, timeout: float) -> tuple[int, bytes]:
        proto = self._proto
        if proto is None or proto.closed or not proto.keep_alive:
            if proto is not None:
                proto.close()
            proto = self._proto = await self._connect()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        proto.waiter = waiter
        proto.buf.clear()
        proto.transport.write(data)  # type: ignore[union-attr]
        timer = loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        except TransportError:
            self._drop()
            raise
        except asyncio.CancelledError:
            self._drop()
            raise
        finally:
            timer.cancel()

    async def connect(self) -> None:
        """Open the connection now (otherwise the first request opens it)."""
        if self._proto is None or self._proto.closed:
            self._proto = await self._connect()

    def _drop(self) -> None:
        if self._proto is not None:
            self._proto.close()
            self._proto = None

    def close(self) -> None:
        self._drop()


def _expire(waiter: asyncio.Future[tuple[int, bytes]]) -> None:
    if not waiter.done():
        waiter.set_exception(TransportError("timeout", "no response before --timeout"))


async def fetch(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One GET on a fresh connection (for /metrics and /v1/models), not on the hot path."""
    target = Target.parse(url)
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    plain = Target(target.scheme, target.host, target.port, "")
    conn = Connection(plain, connect_timeout=timeout)
    try:
        return await conn.request(
            encode_request(plain, "GET", path, {"Connection": "close", **(headers or {})}, b""), timeout
        )
    finally:
        conn.close()
