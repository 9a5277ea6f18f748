"""The batcher's background lane: explanation work that runs only in live traffic's idle time.

- **When to start** (``Grace``): background work starts only once live work has been idle long enough that a
  live request is not expected within the next background batch's run time, judged from the recent live idle
  gaps. A closed-loop client whose next request follows its answer within a few ms finds the engine free
  rather than busy with a batch it must first stop; Poisson arrivals (no typical gap) let it start after the
  floor. Measured (one closed-loop client, busy 2-core machine): a 5 ms fixed grace let background batches
  start before 25-40 % of live requests, each then preempted.
- **Preemption**: a live arrival terminates running background batches (``RunOptions.terminate``, checked
  between operators) and their items go back to the head of the lane.
- **Where**: batches run as tasks beside the workers (a live arrival never waits for a preempted run to
  return), on threads of their own at the lowest OS priority (nice 19, and SCHED_IDLE where the kernel allows:
  a normal thread that wakes on their core preempts them at once). Each such thread assembles its batch in a
  buffer it keeps (no fresh 2.4 MB array per batch, whose allocation and copy held the GIL: a thread at the
  lowest priority that holds the GIL stalls the event loop, py-spy showed np.stack there), and prepare
  functions that can (``prepare.into(item, out)``, with ``prepare.shape`` and ``prepare.dtype``) write the
  tensor into it directly.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .errors import Unavailable

if TYPE_CHECKING:
    from .batcher import Batcher, RunBatch, _Work

T = TypeVar("T")


class Grace:
    """How long live work must have been idle before background work may start (all times monotonic seconds,
    passed in: the policy is a pure function of what it was told, so it is tested with a fake clock).

    Background work may start at idle time ``t ≥ floor_s`` once, among the recent live idle gaps longer than
    ``t``, at most ``max_hit`` end within the next background batch's run time (``t + run_s``), or fewer than
    ``unknown_below`` gaps were ever that long (the idle is longer than anything seen: nothing is expected).
    Never later than ``ceiling_s``: a background batch still gets its chance on a busy stream.
    """

    def __init__(self, floor_s: float = 0.005, ceiling_s: float = 0.1, max_hit: float = 0.3,
                 window: int = 256, unknown_below: int = 3, every: int = 16) -> None:
        self.floor_s, self.ceiling_s, self.max_hit = floor_s, ceiling_s, max_hit
        self.unknown_below, self.every = unknown_below, every
        self._gaps: deque[float] = deque(maxlen=window)
        self._new = 0
        self.run_s = 0.0  # moving average of a background batch's run time
        self.wait_s = floor_s  # the idle time from which background may start
        self._idle_since: float | None = 0.0  # None while live work is in the system

    def live_arrived(self, now: float) -> None:
        """A live request entered an engine with no live work: the gap since the last one left is recorded."""
        if self._idle_since is not None:
            self._gaps.append(now - self._idle_since)
            self._idle_since = None
            self._new += 1
            if self._new >= self.every:
                self._new = 0
                self.wait_s = self.decide()

    def live_left(self, now: float) -> None:
        """The last live request left the engine: an idle gap starts."""
        self._idle_since = now

    def batch_ran(self, seconds: float) -> None:
        """A background batch ran to its end in ``seconds``."""
        self.run_s = seconds if self.run_s == 0.0 else self.run_s + 0.2 * (seconds - self.run_s)

    def quiet_at(self) -> float:
        """The monotonic time from which background work may start (inf while live work is in the system)."""
        return float("inf") if self._idle_since is None else self._idle_since + self.wait_s

    def decide(self) -> float:
        """The idle time from which a live arrival is not expected within ``run_s``."""
        gaps = np.sort(np.fromiter(self._gaps, dtype=np.float64, count=len(self._gaps)))
        # the answer changes only where t or t + run_s crosses a gap: try those points (and the floor)
        t = np.concatenate([[self.floor_s], gaps, gaps - self.run_s])
        t = np.sort(t[(t >= self.floor_s) & (t < self.ceiling_s)])
        past = np.searchsorted(gaps, t, side="right")  # gaps that ended by t
        longer = len(gaps) - past
        within = np.searchsorted(gaps, t + self.run_s, side="right") - past
        ok = np.flatnonzero((longer < self.unknown_below) | (within <= self.max_hit * longer))
        return float(t[ok[0]]) if len(ok) else self.ceiling_s


class _Buffers(threading.local):
    """Each background thread's batch buffer, kept across batches."""

    batch: np.ndarray | None = None


class BackgroundLane:
    """The background half of ``Batcher`` (a mixin: it shares the batcher's lanes, workers and counters)."""

    def _init_background(self, runners: int, name: str, background_options: Callable[[], Any] | None,
                         background_batch: int | None, max_batch_size: int, max_background: int,
                         grace: Grace | None) -> None:
        self.background_options = background_options
        # 2, not the live batch size: a batch of 4 MobileNetV2 images takes ~40 ms on one core, longer than
        # most idle gaps, and a shorter batch is preempted sooner (the current operator is smaller)
        self.background_batch = background_batch or min(2, max_batch_size)
        self.max_background = max_background
        self.grace = grace or Grace()
        self._background_pending = 0
        self._background_runs: set[Any] = set()  # run options of the background batches running now
        self._background_tasks: set[asyncio.Task[None]] = set()
        self._background_executor = ThreadPoolExecutor(max_workers=runners, initializer=_lowest_priority,
                                                       thread_name_prefix=f"background-{name}")
        self._buffers = _Buffers()
        self.preemptions = 0  # background batches terminated for live work

    @property
    def background_depth(self) -> int:
        """Background items accepted and waiting for a worker."""
        return self._background_pending

    async def run_idle(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on a background thread (lowest OS priority): CPU work that must not slow live requests."""
        return await asyncio.get_running_loop().run_in_executor(self._background_executor, fn)

    async def _submit_background(self: Batcher, item: Any, deadline: float | None, prepare: Any) -> Any:
        from .batcher import _Work

        if self._background_pending >= self.max_background:
            raise Unavailable(f"model {self.name} has {self._background_pending} background items queued")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._background_pending += 1
        self._queue.put_background(_Work(item, future, deadline, prepare, background=True))
        self._wake_after_grace()
        return await future

    def _wake_after_grace(self: Batcher) -> None:
        """Background work waits for live work's grace to pass: wake a worker when it has."""
        wait = self.grace.quiet_at() - time.monotonic()
        if 0 < wait < float("inf") and self._busy == 0:
            asyncio.get_running_loop().call_later(wait + 0.0005, self._queue.wake)

    def _live_idle(self: Batcher) -> bool:
        return self._busy == 0 and (self._closed or time.monotonic() >= self.grace.quiet_at())

    def _preempt(self: Batcher) -> None:
        """A live item arrived: stop every running background batch (each worker puts its items back)."""
        for options in self._background_runs:
            if not options.terminate:
                options.terminate = True
                self.preemptions += 1

    def _start_background(self: Batcher, loop: asyncio.AbstractEventLoop, runner: RunBatch, first: _Work) -> None:
        """Take a background batch and run it as a task of its own (its slot is taken before this returns)."""
        lanes = self._queue
        batch = [first]
        while len(batch) < self.background_batch and lanes.background:
            batch.append(lanes.background.popleft())
        self._background_pending -= len(batch)
        live = self._admit(batch)
        if not live:
            return
        lanes.background_running += 1
        task = loop.create_task(self._run_background(loop, runner, live))
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    async def _run_background(self: Batcher, loop: asyncio.AbstractEventLoop, runner: RunBatch,
                              live: list[_Work]) -> None:
        from .batcher import _Preempted

        lanes = self._queue
        started = time.monotonic()
        try:
            await self._run(loop, runner, live, background=True)
            self.grace.batch_ran(time.monotonic() - started)
        except _Preempted:
            for w in reversed(live):
                if not w.future.done():
                    self._background_pending += 1
                    lanes.put_background(w, front=True)
        finally:
            lanes.background_running -= 1
            lanes.wake()  # a background slot is free ...
            self._wake_after_grace()  # ... or will be usable once live work's grace has passed

    def _stack_background(self, live: list[_Work], extras: list[Any], failed: dict[int, BaseException],
                          prepare_s: list[float]) -> np.ndarray | None:
        """On a background thread: prepare each item straight into this thread's batch buffer."""
        buf: np.ndarray | None = None
        n = 0
        for w in live:
            t0 = time.perf_counter()
            try:
                into = getattr(w.prepare, "into", None)
                if into is not None:  # it says what it makes: write it in place
                    if buf is None:
                        buf = self._buffer(len(live), w.prepare.shape, w.prepare.dtype)  # type: ignore[union-attr]
                    extras.append(into(w.item, buf[n]))
                else:
                    tensor, extra = w.prepare(w.item) if w.prepare is not None else (w.item, None)
                    if buf is None:
                        buf = self._buffer(len(live), tensor.shape, tensor.dtype)
                    np.copyto(buf[n], tensor)
                    extras.append(extra)
                n += 1
            except Exception as e:
                failed[id(w)] = e
            finally:
                if w.prepare is not None:
                    prepare_s.append(time.perf_counter() - t0)
        return None if buf is None or n == 0 else buf[:n]

    def _buffer(self, n: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        buf = self._buffers.batch
        if buf is None or buf.shape[0] < n or buf.shape[1:] != tuple(shape) or buf.dtype != dtype:
            buf = self._buffers.batch = np.empty((max(n, self.background_batch), *shape), dtype)
        return buf


def _lowest_priority() -> None:
    """Give the calling thread the lowest scheduling priority: nice 19 and, where allowed, SCHED_IDLE. Linux
    only, where both apply to that thread alone; elsewhere they would change the whole process, so skipped."""
    if sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except OSError:  # not permitted here: background work still yields through the lanes and preemption
        pass
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        pass
