"""The dynamic batcher: concurrent requests for one model become batches on its sessions.

- A lone request on an idle engine runs at once: a worker takes what is queued *now*, and only waits for
  more if ``max_delay_s`` asks for it. Requests that arrive while the engine is busy pile up in the queue
  and leave together as the next batch.
- One worker per runner (model instance), all on one bounded queue; a full queue refuses at once.
- The queue holds ``(item, future)`` pairs: a caller that gave up (cancelled future) is skipped, never
  breaks its neighbours; an item past its deadline is failed with DeadlineExceeded and not run.
- Shutdown drains: every accepted item is run before the workers stop.
- An item may come with a ``prepare`` function (decode + preprocess an encoded image) that the worker runs on
  its own thread just before inference: one pipeline per core, the decoded pixels still in that core's cache,
  no hand-off between a decode pool and the inference threads. A bad image fails only its own request.
- A lone item on an idle engine may run on ``solo``, a session that uses every core: c=1 latency without
  oversubscribing the cores under load. "Lone" means every worker idle, nothing else queued, and the
  requests in the system averaged over the last arrivals below 1.5: at 4 concurrent clients, requests also
  find the engine idle for an instant between batches, and sending those to the solo session cost 13 %
  throughput (142 vs 164 req/s, MobileNetV2 fp32, 2 cores).
- Two priorities (``service/lanes.py``): live requests, and background work (the masked images of an
  explanation; ``service/background.py``). A worker takes background work only when no live request waits
  and live work has been idle long enough (``Grace``), never mixes the two in a batch, and a live arrival
  terminates running background batches (ONNX Runtime's ``RunOptions.terminate``, checked between operators)
  and puts their items back: live requests never wait behind an explanation, and an idle engine still counts
  as idle for the solo session. Background items keep their deadlines.
- The workers are asyncio tasks that hand each batch to a thread. Worker threads that take their next batch
  themselves were tried: equal at 32 connections, 14-17 % slower at 4 (a worker woken by the first arrival
  leaves with a batch of one before the event loop has queued its neighbours).

Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .background import BackgroundLane, Grace
from .errors import DeadlineExceeded, Unavailable, VisionServeError
from .lanes import STOP, Lanes

log = logging.getLogger("visionserve.batcher")

RunBatch = Callable[[np.ndarray], Sequence[np.ndarray]]
Prepare = Callable[[Any], tuple[np.ndarray, Any]]


class InferenceFailed(VisionServeError):
    status_code = 500


@dataclass
class BatchStats:
    size: int
    queue_waits: list[float]
    inference_s: float
    prepare_s: list[float] = field(default_factory=list)  # per prepared item, on the worker's thread
    background: bool = False


@dataclass
class _Work:
    item: Any  # a tensor, or what ``prepare`` turns into one
    future: asyncio.Future[Any]
    deadline: float | None  # time.monotonic() seconds
    prepare: Prepare | None = None
    enqueued: float = field(default_factory=time.monotonic)
    background: bool = False


class _Preempted(Exception):
    """A background batch terminated for live work; its items go back to their lane."""


LOAD_ALPHA = 0.2  # weight of the newest arrival in the moving average of requests in the system
SOLO_BELOW = 1.5  # that average under which a lone request may take every core


class Batcher(BackgroundLane):
    def __init__(
        self,
        runners: Sequence[RunBatch],
        *,
        max_batch_size: int,
        max_queue: int = 256,
        max_delay_s: float = 0.0,
        split_outputs: bool = True,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "model",
        solo: RunBatch | None = None,
        background_options: Callable[[], Any] | None = None,
        background_batch: int | None = None,
        max_background: int = 8192,
        grace: Grace | None = None,
    ) -> None:
        """``background_options`` makes run options whose ``terminate = True`` (set from another thread) stops a
        run, as ``onnxruntime.RunOptions`` does; with it, background batches run as ``runner(batch, options)``
        and are preempted by live arrivals. Without it, a background batch runs to its end. Background work
        starts only once live work has been idle as long as ``grace`` says (``service/background.py``)."""
        if not runners:
            raise ValueError("a batcher needs at least one runner")
        self.runners = list(runners)
        self.solo = solo
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_delay_s = max_delay_s
        self.split_outputs = split_outputs
        self.on_batch = on_batch
        self.name = name
        self._init_background(len(self.runners), name, background_options, background_batch, max_batch_size,
                              max_background, grace)
        self._queue = Lanes(background_slots=len(self.runners), live_idle=self._live_idle)
        self._pending = 0  # accepted live items, not yet taken by a worker
        self._workers: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(max_workers=len(self.runners), thread_name_prefix=f"infer-{name}")
        self._closed = False
        self._busy = 0  # workers running a batch
        self._in_system = 0  # submitted, not yet answered
        self._load = 0.0  # moving average of _in_system, sampled at each arrival
        self.solo_runs = 0

    @property
    def depth(self) -> int:
        """Live items accepted and waiting for a worker."""
        return self._pending

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(r), name=f"batcher-{self.name}-{i}")
                         for i, r in enumerate(self.runners)]

    async def submit(self, item: Any, deadline: float | None = None, prepare: Prepare | None = None,
                     *, background: bool = False) -> Any:
        """Queue one item; returns its slice of every output, or ``(outputs, extra)`` when ``prepare`` (which
        returns ``(tensor, extra)``) turns the item into a tensor. Raises Unavailable when full or closed, and
        whatever ``prepare`` raised for this item. ``background``: run only when no live item waits."""
        if self._closed:
            raise Unavailable(f"model {self.name} is shutting down")
        if background:
            return await self._submit_background(item, deadline, prepare)
        if self._background_runs:
            self._preempt()
        if self._pending >= self.max_queue:
            raise Unavailable(f"model {self.name} is overloaded: {self._pending} requests queued")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._in_system == 0:
            self.grace.live_arrived(time.monotonic())
        self._pending += 1
        self._in_system += 1
        self._load += LOAD_ALPHA * (self._in_system - self._load)
        self._queue.put_live(_Work(item, future, deadline, prepare))
        try:
            return await future
        finally:
            self._in_system -= 1
            if self._in_system == 0:
                self.grace.live_left(time.monotonic())
                if self._queue.background:
                    self._wake_after_grace()

    async def stop(self) -> None:
        """Refuse new work, finish everything accepted, stop the workers."""
        self._closed = True
        for _ in self._workers:
            self._queue.put_stop()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        if self._background_tasks:
            await asyncio.gather(*self._background_tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)
        self._background_executor.shutdown(wait=True)

    # -- the loop ------------------------------------------------------------------------------------
    async def _work(self, runner: RunBatch) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is STOP:
                return
            if first.background:  # runs beside this worker, which goes straight back to the lanes: a live
                self._start_background(loop, runner, first)  # arrival never waits for a preempted run to return
                continue
            batch = [first]
            self._collect(batch)
            if self.max_delay_s > 0 and len(batch) < self.max_batch_size:
                await self._wait_for_more(batch, first.enqueued + self.max_delay_s)
            self._pending -= len(batch)
            live = self._admit(batch)
            if live:
                await self._run(loop, runner, live)

    def _collect(self, batch: list[_Work]) -> None:
        """Take the live items queued now, up to the batch size."""
        lane = self._queue.live
        while len(batch) < self.max_batch_size and lane:
            batch.append(lane.popleft())

    async def _wait_for_more(self, batch: list[_Work], until: float) -> None:
        while len(batch) < self.max_batch_size:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, 0.0005))  # the lanes wake workers, not batches being gathered
            self._collect(batch)

    def _admit(self, batch: list[_Work]) -> list[_Work]:
        now = time.monotonic()
        live = []
        for w in batch:
            if w.future.done():  # the caller gave up
                continue
            if w.deadline is not None and now >= w.deadline:
                w.future.set_exception(DeadlineExceeded("request deadline passed while queued"))
                continue
            live.append(w)
        return live

    async def _run(self, loop: asyncio.AbstractEventLoop, runner: RunBatch, live: list[_Work],
                   background: bool = False) -> None:
        started = time.monotonic()
        options = None
        if background and self.background_options is not None:
            options = self.background_options()
            self._background_runs.add(options)
        elif (not background and self.solo is not None and len(live) == 1 and self._busy == 0
              and self._queue.empty() and self._load < SOLO_BELOW):
            runner = self.solo  # alone on an idle engine (background batches are being stopped): every core
            self.solo_runs += 1
        busy = options is None  # a preemptible background batch does not make the engine busy
        if busy:
            self._busy += 1
        try:
            executor = self._background_executor if background else self._executor
            outputs, extras, failed, prepare_s = await loop.run_in_executor(executor, self._execute, runner, live,
                                                                             options)
        except Exception as e:
            if options is not None and options.terminate:
                raise _Preempted() from None
            log.exception("batch of %d failed on %s", len(live), self.name)
            own = getattr(e, "item_errors", {})  # items whose decode failed keep their own error
            err = e if isinstance(e, VisionServeError) else InferenceFailed(f"inference failed: {e}")
            for w in live:
                if not w.future.done():
                    w.future.set_exception(own.get(id(w), err))
            return
        finally:
            if options is not None:
                self._background_runs.discard(options)
            if busy:
                self._busy -= 1
        elapsed = time.monotonic() - started - sum(prepare_s)
        ran = [w for w in live if id(w) not in failed]
        for w in live:
            if id(w) in failed and not w.future.done():
                w.future.set_exception(failed[id(w)])
        for i, w in enumerate(ran):
            if w.future.done():
                continue
            result = [o[i] for o in outputs] if self.split_outputs else list(outputs)
            w.future.set_result((result, extras[i]) if w.prepare is not None else result)
        if self.on_batch is not None and ran:
            self.on_batch(BatchStats(len(ran), [started - w.enqueued for w in ran], elapsed, prepare_s, background))

    def _execute(self, runner: RunBatch, live: list[_Work], options: Any = None
                 ) -> tuple[Sequence[np.ndarray], list[Any], dict[int, BaseException], list[float]]:
        """On the worker's thread: prepare each item (a failure fails only that item), stack, run."""
        tensors: list[np.ndarray] = []
        extras: list[Any] = []
        prepare_s: list[float] = []
        failed: dict[int, BaseException] = {}
        if live[0].background:  # into this thread's own buffer, see service/background.py
            batch = self._stack_background(live, extras, failed, prepare_s)
            if batch is None:
                return [], [], failed, prepare_s
            return self._infer(runner, batch, options, failed), extras, failed, prepare_s
        for w in live:
            if w.prepare is None:
                tensors.append(w.item)
                extras.append(None)
                continue
            t0 = time.perf_counter()
            try:
                tensor, extra = w.prepare(w.item)
            except Exception as e:
                failed[id(w)] = e
                continue
            finally:
                prepare_s.append(time.perf_counter() - t0)
            tensors.append(tensor)
            extras.append(extra)
        if not tensors:
            return [], [], failed, prepare_s
        return self._infer(runner, np.stack(tensors), None, failed), extras, failed, prepare_s

    def _infer(self, runner: RunBatch, batch: np.ndarray, options: Any, failed: dict[int, BaseException]
               ) -> Sequence[np.ndarray]:
        try:
            outputs = runner(batch) if options is None else runner(batch, options)  # type: ignore[call-arg]
            if self.split_outputs:
                bad = [o.shape for o in outputs if o.shape[:1] != (len(batch),)]
                if bad:
                    raise InferenceFailed(f"model returned outputs {bad} for a batch of {len(batch)}")
        except Exception as e:
            e.item_errors = failed  # type: ignore[attr-defined]
            raise
        return outputs

