"""One load run: closed loop (N workers back to back) or open loop (a schedule of intended sends).

Open loop avoids coordinated omission: request k has an intended send time fixed in advance
(constant gaps or Poisson arrivals). A worker free before that time sleeps until it and starts
the clock when it wakes (timer slop is the client's, not the server's, and is reported as
``schedule_lag_ms``). A worker that only becomes free *after* the intended time — every
connection was busy, i.e. the server fell behind — starts the clock at the intended time, so the
time the request waited in the client counts, as it would for a real user.

Warm-up: requests that start (closed) or are due (open) before ``warmup`` seconds are not recorded.
Every run is bounded: by ``duration`` and/or ``requests`` (at most ``MAX_DURATION_S``), and each
request by ``timeout``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import metrics as server_metrics
from .config import LoadConfig, LoadError
from .engines import Sender, make_engine
from .http import Connection, Target, TransportError
from .payloads import build_payload, load_images
from .stats import Result, Window, latency_summary, merge, new_histogram, to_us

StopWhen = Callable[[list[Window]], bool]
Progress = Callable[[dict[str, Any]], None]
PROGRESS_EVERY_S = 0.5
SLOP_S = 0.001  # an open-loop pick later than this counts as queued in the client
CONNECT_BACKOFF_S = 0.01


def run_load(
    config: LoadConfig,
    progress: Progress | None = None,
    stop_when: StopWhen | None = None,
    scrape_windows: bool = False,
) -> Result:
    """Run ``config`` to completion and return what it measured (blocking; one event loop)."""
    return _run_in_loop(_Run(config, progress, stop_when, scrape_windows).run())


def _run_in_loop(coro: Any) -> Any:
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _arrivals(cfg: LoadConfig, t0: float) -> Iterator[float]:
    """Intended send times: constant gaps or exponential ones (Poisson process) from ``t0``."""
    assert cfg.rate is not None
    rng = random.Random(cfg.seed)
    t, gap = t0, 1.0 / cfg.rate
    while True:
        t += rng.expovariate(cfg.rate) if cfg.arrival == "poisson" else gap
        yield t


class _Run:
    def __init__(
        self, cfg: LoadConfig, progress: Progress | None, stop_when: StopWhen | None, scrape_windows: bool
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.progress = progress
        self.stop_when = stop_when
        self.scrape_windows = scrape_windows
        self.target = Target.parse(cfg.url)
        images = list(cfg.images) if cfg.images else load_images(Path(cfg.image))  # type: ignore[arg-type]
        self.payloads = [build_payload(cfg.kind, cfg.model, img, cfg.version, cfg.query, cfg.headers) for img in images]
        self.metrics_url = cfg.metrics_url or self.target.url("/metrics")
        self.workers = (cfg.concurrency or 1) if cfg.rate is None else cfg.connections
        self.stopped = False
        self.counter = 0  # requests started, warm-up included (cycles the images)
        self.measured = 0  # requests started inside the measurement
        self.windows: list[Window] = []
        self.window: Window | None = None
        self.last_done = 0.0
        self.lag = new_histogram()
        self.queued = 0
        self.samples: dict[str, str] = {}
        self.snapshots: list[server_metrics.Snapshot | None] = []
        self.sleeping: set[asyncio.Task[None]] = set()

    # -- recording ---------------------------------------------------------------------------
    def _record(self, start: float, outcome: tuple[int, bytes] | TransportError) -> None:
        done = time.perf_counter()
        w = self.window
        assert w is not None
        self.last_done = done
        if isinstance(outcome, TransportError):
            w.record_error(outcome.kind)
            self.samples.setdefault(outcome.kind, str(outcome)[:200])
            return
        status, body = outcome
        if 200 <= status < 300:
            w.record_ok(done - start)
        else:
            w.record_error(str(status))
            self.samples.setdefault(str(status), body[:200].decode("utf-8", "replace"))

    def _take(self, measured: bool) -> int | None:
        """The next request's number, or None when the request budget is spent."""
        if measured:
            if self.cfg.requests is not None and self.measured >= self.cfg.requests:
                self.stopped = True
                return None
            self.measured += 1
        i = self.counter
        self.counter += 1
        return i

    # -- workers -----------------------------------------------------------------------------
    async def _closed_worker(self, sender: Sender) -> None:
        clock = time.perf_counter
        while not self.stopped:
            start = clock()
            if start >= self.end:
                return
            measured = start >= self.measure_start
            i = self._take(measured)
            if i is None:
                return
            try:
                outcome: tuple[int, bytes] | TransportError = await sender.send(i)
            except TransportError as exc:
                outcome = exc
                if exc.kind == "connect":
                    await asyncio.sleep(CONNECT_BACKOFF_S)  # don't spin on a refused port
            if measured:
                self._record(start, outcome)

    async def _open_loop(self, senders: list[Sender], schedule: Iterator[float]) -> None:
        """Send on schedule, each request on the most recently freed connection (hot ones stay hot).

        The clock starts at the intended time whenever the send is more than ``SLOP_S`` late (no
        free connection, or a busy client), and at the actual send otherwise (timer granularity
        is the client's, not the server's).
        """
        clock = time.perf_counter
        free = list(senders)  # a stack: LIFO reuse keeps the others idle rather than all lukewarm
        freed = asyncio.Event()
        inflight: set[asyncio.Task[None]] = set()

        async def one(sender: Sender, i: int, start: float, measured: bool) -> None:
            try:
                outcome: tuple[int, bytes] | TransportError = await sender.send(i)
            except TransportError as exc:
                outcome = exc
            if measured:
                self._record(start, outcome)
            free.append(sender)
            freed.set()

        while not self.stopped:
            due = next(schedule)
            if due >= self.end:
                break
            measured = due >= self.measure_start
            i = self._take(measured)
            if i is None:
                break
            now = clock()
            if due > now:
                task = asyncio.current_task()
                self.sleeping.add(task)  # type: ignore[arg-type]
                try:
                    await asyncio.sleep(due - now)
                except asyncio.CancelledError:
                    break  # stopped early (a sweep step became stable); in-flight requests finish below
                finally:
                    self.sleeping.discard(task)  # type: ignore[arg-type]
                if self.stopped:
                    break
            waited = False
            while not free:
                waited = True
                freed.clear()
                await freed.wait()
            now = clock()
            late = now - due
            if measured:
                self.lag.record_value(to_us(max(late, 0.0)))
                if waited:
                    self.queued += 1
            start = due if late > SLOP_S else now
            task = asyncio.ensure_future(one(free.pop(), i, start, measured))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        if inflight:
            await asyncio.gather(*inflight, return_exceptions=True)

    # -- the controller: windows, scrapes, progress, stopping ----------------------------------
    async def _scrape(self) -> None:
        if not self.cfg.metrics or (self.snapshots and self.snapshots[0] is None):
            return
        self.snapshots.append(
            await server_metrics.scrape(self.metrics_url, self.cfg.model, self.cfg.version, timeout=5.0)
        )

    async def _controller(self) -> None:
        clock = time.perf_counter
        await asyncio.sleep(max(0.0, self.measure_start - clock()))
        await self._scrape()
        boundary = self.measure_start + self.cfg.window
        next_progress = clock() if self.progress is not None else float("inf")
        while not self.stopped:
            now = clock()
            if now >= self.end:
                break
            if now >= boundary:
                self._rotate(now)
                boundary += self.cfg.window
                if self.scrape_windows:
                    await self._scrape()
                if self.stop_when is not None and self.stop_when(self.windows):
                    self._stop()
                    break
            if self.progress is not None and now >= next_progress:
                self.progress(self._snapshot(now))
                next_progress = now + PROGRESS_EVERY_S
            await asyncio.sleep(max(0.0, min(boundary, self.end, next_progress) - clock()) + 1e-4)

    def _rotate(self, now: float) -> None:
        assert self.window is not None
        self.window.ended = now
        self.windows.append(self.window)
        self.window = Window(now)

    def _stop(self) -> None:
        self.stopped = True
        for task in list(self.sleeping):
            task.cancel()

    def _snapshot(self, now: float) -> dict[str, Any]:
        last = self.windows[-1].summary(self.measure_start) if self.windows else None
        done = [*self.windows, self.window] if self.window is not None else self.windows
        return {
            "phase": "warm-up" if now < self.measure_start else "measuring",
            "elapsed_s": now - self.t0,
            "total_s": self.end - self.t0,
            "started": self.counter,
            "measured": self.measured,
            "requests": self.cfg.requests,
            "ok": sum(w.ok for w in done),
            "errors": sum(sum(w.errors.values()) for w in done),
            "window": last,
        }

    async def _preflight(self) -> None:
        """Fail fast, with a clear message, when nothing listens at the URL."""
        conn = Connection(self.target, connect_timeout=min(self.cfg.timeout, 5.0))
        try:
            await conn.connect()
        except TransportError as exc:
            raise LoadError(f"cannot connect to {self.cfg.url}: {exc}") from None
        finally:
            conn.close()

    async def run(self) -> Result:
        cfg = self.cfg
        await self._preflight()
        engine = make_engine(cfg.engine, self.target, self.payloads, cfg.timeout, self.workers)
        await engine.start()
        senders = [engine.sender() for _ in range(self.workers)]
        self.t0 = time.perf_counter()
        self.measure_start = self.t0 + cfg.warmup
        self.end = self.measure_start + cfg.time_limit
        self.window = Window(self.measure_start)
        if cfg.rate is None:
            workers = [asyncio.ensure_future(self._closed_worker(s)) for s in senders]
        else:
            schedule = _arrivals(cfg, self.t0)
            workers = [asyncio.ensure_future(self._open_loop(senders, schedule))]
        controller = asyncio.ensure_future(self._controller())
        try:
            await asyncio.gather(*workers, return_exceptions=True)
        finally:
            self.stopped = True
            controller.cancel()
            for s in senders:
                s.close()
            await engine.aclose()
        self.window.ended = max(self.last_done, self.window.started)
        if self.window.ok or self.window.errors or not self.windows:
            self.windows.append(self.window)
        if len(self.snapshots) == 1 or (self.snapshots and not self.scrape_windows):
            await self._scrape()
        return self._result()

    def _result(self) -> Result:
        hist, errors, span = merge(self.windows)
        origin = self.measure_start
        summaries = [w.summary(origin) for w in self.windows]
        snaps = self.snapshots
        if self.scrape_windows and snaps and snaps[0] is not None:
            for k, summary in enumerate(summaries):
                if k + 1 < len(snaps):
                    summary["server"] = server_metrics.delta(snaps[k], snaps[k + 1])
        server = server_metrics.delta(snaps[0], snaps[-1]) if len(snaps) >= 2 else None
        return Result(
            mode=self.cfg.mode,
            load=self.cfg.load,
            duration_s=span,
            sent=self.measured,
            ok=int(hist.get_total_count()),
            errors=errors,
            histogram=hist,
            windows=summaries,
            schedule_lag_ms=latency_summary(self.lag) if self.cfg.rate is not None else None,
            client_queued=self.queued,
            server=server,
            config=self.cfg.to_dict(),
            error_samples=self.samples,
            raw_windows=self.windows,
            snapshots=self.snapshots,
        )
