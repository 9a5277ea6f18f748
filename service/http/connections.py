"""Connection hygiene in front of the application: what uvicorn's HTTP protocol leaves open.

uvicorn (httptools) has no header-read timeout, no header-size limit, no connection cap that answers in
the contract's JSON, keeps reading a body nobody will use after an early answer (a 413 for a declared 10 GB
body read the 10 GB), and closes idle keep-alive connections at once on shutdown, resetting a request that
was on its way. This protocol subclass adds those five things; everything else is uvicorn's.

- **Connection cap**: a connection beyond ``max_connections`` gets a JSON 503 and is closed.
- **Header timeout**: a request's headers must arrive within ``header_timeout_s`` of the connection or of
  the request's first byte (slow-header clients), else 408 and close.
- **Header size**: request line + headers over ``max_header_bytes`` → 431 and close, checked while they
  arrive, before httptools buffers a 100 MB header.
- **Lingering close**: an answer sent before a large body was read (413, 401, 503…) ends the connection:
  the server stops writing, discards what the client still sends for a moment so that the client reads the
  answer instead of a reset, then closes.
- **Drain**: on shutdown an idle connection stays open ``drain_idle_close_s``; a request arriving on it
  meanwhile is answered with ``Connection: close``.
- Malformed HTTP gets the contract's JSON 400, not uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("visionserve.connections")

KEEP_ALIVE_UNREAD_BYTES = 256 * 1024  # an early answer keeps the connection if at most this much body is left
LINGER_S = 2.0  # lingering close: how long unread body is discarded before the socket is closed
LINGER_BYTES = 4 * 1024 * 1024  # … and how much of it


@dataclass(frozen=True)
class Limits:
    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    drain_idle_close_s: float


def raw_json_response(status: int, message: str, extra_headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 response with the contract's ``{"error": ...}`` body that closes the connection."""
    body = json.dumps({"error": message}).encode()
    head = [STATUS_LINE[status], b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body), b"connection: close\r\n"]
    head += [f"{k}: {v}\r\n".encode("latin-1") for k, v in extra_headers]
    return b"".join([*head, b"\r\n", body])


def guarded_protocol(limits: Limits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with ``limits``; pass as ``uvicorn.Config(http=...)``."""

    class Guarded(GuardedProtocol):
        pass

    Guarded.limits = limits
    return Guarded


class GuardedProtocol(HttpToolsProtocol):
    limits: Limits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._in_headers = False  # between a request's first byte and its last header
        self._lingering = False
        self._lingered = 0
        self._refused = False
        self._draining = False
        self._body_timer: asyncio.TimerHandle | None = None

    # -- connection ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            self.transport = transport
            transport.write(raw_json_response(
                503, f"too many connections (limit {self.limits.max_connections}); retry shortly",
                (("retry-after", "1"),)))
            self._lingering = True  # the client may be sending its request: read it away, then close
            try:
                transport.write_eof()
            except (OSError, RuntimeError, NotImplementedError):
                transport.close()
                return
            self.loop.call_later(LINGER_S, transport.close)
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        self._disarm_body_timer()
        if self._refused:
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.transport.close()
            return
        if not self._request_open():  # headers of a request may be in this chunk
            self._header_bytes += len(data)
        super().data_received(data)
        if self._in_headers and self._header_bytes > self.limits.max_header_bytes + 64 * 1024:
            self._fail(431, f"request headers exceed {self.limits.max_header_bytes} bytes")

    # -- parser callbacks ----------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._disarm_header_timer()  # counted from the request's first byte
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._disarm_header_timer()
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
        if size > self.limits.max_header_bytes:
            self._fail(431, f"request headers of {size} bytes exceed the limit of {self.limits.max_header_bytes}")
            return
        super().on_headers_complete()
        if self.cycle is None:
            return
        self._watch_early_answer(self.cycle)
        if self._draining:
            self.cycle.keep_alive = False  # answered, then closed: the server is going away
        if self.cycle.more_body and self.cycle.scope["method"] not in ("GET", "HEAD"):
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timeout, self.cycle)

    def on_body(self, body: bytes) -> None:
        if not self._lingering:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm_body_timer()
        if not self._lingering:
            super().on_message_complete()

    def _watch_early_answer(self, cycle: Any) -> None:
        """An answer that starts while more than ``KEEP_ALIVE_UNREAD_BYTES`` of the body is still unread
        says ``Connection: close``, and the close after it lingers (``_linger``) rather than resetting."""
        send = cycle.send

        async def watched_send(message: Any) -> None:
            if (message["type"] == "http.response.start" and cycle.more_body
                    and self._unread_body(cycle) > KEEP_ALIVE_UNREAD_BYTES):
                cycle.keep_alive = False
                cycle.transport = _LingerOnClose(self)
            await send(message)

        cycle.send = watched_send

    # -- errors --------------------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        self._fail(400, f"malformed HTTP request: {msg}")

    def _fail(self, status: int, message: str) -> None:
        """Answer ``status`` in JSON and close (nothing of this request reached the application)."""
        self._disarm_header_timer()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete and self.cycle.response_started:
            self.transport.close()  # an answer is already on its way: nothing more can be said
            return
        self.transport.write(raw_json_response(status, message))
        self._linger()

    def _linger(self) -> None:
        """Stop writing, discard what the client still sends for a moment, then close: the client reads
        our answer instead of a reset caused by unread data."""
        if self._lingering:
            return
        self._lingering = True
        self.flow.resume_reading()
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            self.transport.close()
            return
        self.loop.call_later(LINGER_S, self.transport.close)

    # -- timers --------------------------------------------------------------------------------------
    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self._request_open():
            return
        if self._in_headers:
            self._fail(408, f"request headers not received within {self.limits.header_timeout_s:g} s")
        else:  # connected and silent: nothing to answer
            self.transport.close()

    def _disarm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timeout(self, cycle: Any) -> None:
        """The body is still arriving after ``body_timeout_s``: answer 408 for the application (which sees
        a disconnect and gives up) and end the connection."""
        self._body_timer = None
        if cycle is not self.cycle or not cycle.more_body or self.transport.is_closing():
            return
        started = cycle.response_started
        cycle.disconnected = True  # the application's reads end, its answer goes nowhere
        cycle.message_event.set()
        if started:
            self.transport.close()
        else:
            self.transport.write(raw_json_response(
                408, f"request body not received within {self.limits.body_timeout_s:g} s"))
            self._linger()

    def _request_open(self) -> bool:
        """A request is being handled by the application (headers done, answer not complete)."""
        return self.cycle is not None and not self.cycle.response_complete

    @staticmethod
    def _unread_body(cycle: Any) -> int:
        for name, value in cycle.scope["headers"]:
            if name == b"content-length":
                try:
                    return max(0, int(value) - len(cycle.body))
                except ValueError:
                    return 1 << 62
        return 1 << 62  # chunked: unknown, assume large

    # -- shutdown ------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Graceful shutdown: a busy connection closes after its answer; an idle one after a short grace,
        answering (with ``Connection: close``) a request that arrives meanwhile."""
        if self._refused or self.transport.is_closing():
            return
        self._draining = True
        if self._request_open():
            self._last_cycle().keep_alive = False
            return
        self._unset_keepalive_if_required()
        self.loop.call_later(self.limits.drain_idle_close_s, self._close_if_idle)

    def _last_cycle(self) -> Any:
        """The request answered last on this connection: pipelined ones wait in ``pipeline`` (newest first)."""
        return self.pipeline[0][0] if self.pipeline else self.cycle

    def _close_if_idle(self) -> None:
        if self.transport.is_closing():
            return
        if self._request_open():
            self._last_cycle().keep_alive = False
        elif not self._in_headers:
            self.transport.close()
        else:  # a request is arriving: let it finish, then close
            self.loop.call_later(0.5, self._close_if_idle)



class _LingerOnClose:
    """The connection's transport for one request's answer, with ``close()`` made a lingering close."""

    def __init__(self, protocol: GuardedProtocol) -> None:
        self._protocol = protocol
        self._transport = protocol.transport

    def close(self) -> None:
        self._protocol._linger()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
