"""uvicorn, with a drain that loses nothing it accepted and an exit status that says how the drain went.

On SIGTERM (or SIGINT):
1. readiness turns 503 at once (``on_drain``), so a load balancer stops sending;
2. the listener stops accepting, after adopting the connections the kernel had already accepted on its
   behalf (closing a listener resets those);
3. every connection closes after its current answer; an idle one after ``drain_idle_close_s``, answering a
   request that arrives meanwhile (see ``connections.GuardedProtocol.shutdown``);
4. when everything is answered, the models stop and the process exits 0. If ``graceful_timeout_s`` passes
   first, every request still unanswered gets a JSON 503 (never uvicorn's plain-text 500) and the exit
   status is ``DRAIN_INCOMPLETE``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn

from .connections import raw_json_response

log = logging.getLogger("visionserve")

DRAIN_INCOMPLETE = 3  # exit status when the drain ran out of time


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.on_drain = on_drain
        self.drain_complete = True
        self._adopting: set[asyncio.Task[Any]] = set()

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn re-raises the signal after its shutdown (exit status 143); we exit by our own status."""
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit and self.on_drain is not None:
            self.on_drain()  # readiness 503 now, not at the next 0.1 s tick
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info("draining: no new connections, finishing what was accepted")
        for server in self.servers:
            self._adopt_backlog(server)
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        timeout = self.config.timeout_graceful_shutdown
        try:
            await asyncio.wait_for(self._drained(), timeout=timeout)
        except asyncio.TimeoutError:
            self.drain_complete = False
            await self._answer_unfinished(timeout)
        if not self.force_exit:
            await self.lifespan.shutdown()

    def _adopt_backlog(self, server: Any) -> None:
        """Take the connections the kernel has completed but nobody accepted yet: closing the listening
        socket would reset them, and their clients may already have sent a request."""
        loop = asyncio.get_running_loop()
        factory = functools.partial(self.config.http_protocol_class, config=self.config,
                                    server_state=self.server_state, app_state=self.lifespan.state)
        for listening in server.sockets or ():
            with socket.fromfd(listening.fileno(), listening.family, listening.type) as sock:  # a dup
                sock.setblocking(False)
                while True:
                    try:
                        conn, _ = sock.accept()
                    except OSError:  # BlockingIOError: nothing more waiting
                        break
                    conn.setblocking(False)
                    task = loop.create_task(loop.connect_accepted_socket(factory, conn))
                    self._adopting.add(task)
                    task.add_done_callback(self._adopting.discard)

    async def _drained(self) -> None:
        while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
            await asyncio.sleep(0.05)

    async def _answer_unfinished(self, timeout: float | None) -> None:
        pending = 0
        body = raw_json_response(503, f"the server is shutting down: the request was not finished within the "
                                      f"{timeout or 0:g} s drain; retry it", (("retry-after", "1"),))
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            if cycle is not None and not cycle.response_started and not connection.transport.is_closing():
                cycle.response_started = cycle.response_complete = True  # the application's answer is void
                connection.transport.write(body)
                connection.transport.close()
                pending += 1
        log.error("drain incomplete after %g s: %d request(s) answered 503, %d task(s) cancelled",
                  timeout or 0, pending, len(self.server_state.tasks))
        for task in list(self.server_state.tasks):
            task.cancel()
        await asyncio.sleep(0)


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files towards ``wanted`` (up to the hard limit); returns the
    soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return int(soft) if soft != resource.RLIM_INFINITY else wanted
