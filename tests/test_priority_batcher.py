"""The batcher's two priorities: live requests never wait behind background (explanation) work."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from visionserve.service.batcher import Batcher
from visionserve.service.errors import DeadlineExceeded, Unavailable


class Options:
    """Stands in for onnxruntime.RunOptions: ``terminate = True`` from another thread stops the run."""

    def __init__(self) -> None:
        self.terminate = False


class Engine:
    """A fake model that records what it ran, in order; background runs can be held until terminated."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.terminated: list[list[float]] = []
        self.gate = threading.Event()
        self.hold_live = False
        self.hold_background = False
        self.started = threading.Event()

    def __call__(self, batch: np.ndarray, options: Options | None = None) -> list[np.ndarray]:
        values = [float(x) for x in batch[:, 0]]
        self.started.set()
        if options is not None and self.hold_background:
            while not options.terminate and not self.gate.is_set():
                time.sleep(0.001)
            if options.terminate:
                self.terminated.append(values)
                raise RuntimeError("Exiting due to terminate flag being set to true")
        elif options is None and self.hold_live:
            self.gate.wait(5)
        self.batches.append(values)
        return [batch * 2]


def item(v: float) -> np.ndarray:
    return np.array([v, 1.0], dtype=np.float32)


async def started(engine: Engine) -> None:
    while not engine.started.is_set():
        await asyncio.sleep(0.001)
    engine.started.clear()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_queued_live_items_run_before_older_background_items_and_never_share_a_batch() -> None:
    async def main() -> Engine:
        engine = Engine()
        engine.hold_live = True
        b = Batcher([engine], max_batch_size=4, background_options=Options, background_batch=4)
        b.start()
        first = asyncio.create_task(b.submit(item(0)))
        await started(engine)  # the engine is busy with a live batch
        background = [asyncio.create_task(b.submit(item(100 + v), background=True)) for v in range(6)]
        await asyncio.sleep(0.01)
        live = [asyncio.create_task(b.submit(item(v))) for v in range(1, 4)]  # arrive after the background
        await asyncio.sleep(0.01)
        assert (b.depth, b.background_depth) == (3, 6)
        engine.hold_live = False
        engine.gate.set()
        results = await asyncio.gather(first, *live, *background)
        for r, v in zip(results, [0, 1, 2, 3, *range(100, 106)]):
            np.testing.assert_allclose(r[0], item(v) * 2)
        await b.stop()
        return engine

    engine = run(main())
    assert engine.batches == [[0.0], [1.0, 2.0, 3.0], [100.0, 101.0, 102.0, 103.0], [104.0, 105.0]]


def test_a_live_arrival_preempts_running_background_work_which_then_finishes() -> None:
    async def main() -> tuple[Engine, Batcher]:
        engine = Engine()
        engine.hold_background = True
        b = Batcher([engine], max_batch_size=4, background_options=Options, background_batch=4)
        b.start()
        background = [asyncio.create_task(b.submit(item(100 + v), background=True)) for v in range(3)]
        await started(engine)  # a background batch is running (held)
        t0 = time.monotonic()
        live = await b.submit(item(7))
        waited = time.monotonic() - t0
        np.testing.assert_allclose(live[0], item(7) * 2)
        assert waited < 1.0  # the background batch was stopped, not waited for (it would hold until the gate)
        assert engine.batches[0] == [7.0]  # the live item ran first
        engine.gate.set()
        results = await asyncio.gather(*background)
        for r, v in zip(results, range(100, 103)):
            np.testing.assert_allclose(r[0], item(v) * 2)
        await b.stop()
        return engine, b

    engine, b = run(main())
    assert engine.terminated == [[100.0, 101.0, 102.0]]
    assert engine.batches == [[7.0], [100.0, 101.0, 102.0]]  # the preempted items ran again, in order
    assert b.preemptions == 1


def test_background_work_waits_while_a_live_batch_runs_on_another_worker() -> None:
    async def main() -> Engine:
        engine = Engine()
        engine.hold_live = True
        b = Batcher([engine, engine], max_batch_size=4, background_options=Options)
        b.start()
        first = asyncio.create_task(b.submit(item(0)))
        await started(engine)
        background = asyncio.create_task(b.submit(item(100), background=True))
        await asyncio.sleep(0.05)
        assert not background.done() and engine.batches == []  # an idle worker, but a live batch runs
        engine.gate.set()
        await asyncio.gather(first, background)
        await b.stop()
        return engine

    assert run(main()).batches == [[0.0], [100.0]]


def test_background_deadlines_and_bounds_and_the_live_queue_limit() -> None:
    async def main() -> None:
        engine = Engine()
        engine.hold_live = True
        b = Batcher([engine], max_batch_size=4, max_queue=2, max_background=3, background_options=Options)
        b.start()
        first = asyncio.create_task(b.submit(item(0)))
        await started(engine)
        late = asyncio.create_task(b.submit(item(100), time.monotonic() + 0.01, background=True))
        ok = [asyncio.create_task(b.submit(item(101 + v), background=True)) for v in range(2)]
        await asyncio.sleep(0.02)
        with pytest.raises(Unavailable):  # the background lane is full ...
            await b.submit(item(200), background=True)
        live = [asyncio.create_task(b.submit(item(v))) for v in (1, 2)]  # ... the live lane is not
        await asyncio.sleep(0.02)
        engine.gate.set()
        await asyncio.gather(first, *live, *ok)
        with pytest.raises(DeadlineExceeded):
            await late
        await b.stop()
        assert 100.0 not in [v for batch in engine.batches for v in batch]

    run(main())


def test_stop_runs_every_accepted_background_item() -> None:
    async def main() -> None:
        engine = Engine()
        engine.hold_live = True
        b = Batcher([engine, engine], max_batch_size=2, background_options=Options)
        b.start()
        first = asyncio.create_task(b.submit(item(0)))
        await started(engine)
        background = [asyncio.create_task(b.submit(item(100 + v), background=True)) for v in range(5)]
        await asyncio.sleep(0.01)
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0.01)
        engine.gate.set()
        await stopping
        assert first.done() and all(t.done() and not t.exception() for t in background)

    run(main())


@pytest.mark.skipif(not hasattr(os, "getpriority") or not sys.platform.startswith("linux"), reason="Linux threads")
def test_background_batches_run_on_threads_of_the_lowest_os_priority() -> None:
    seen: dict[str, int] = {}
    policy: dict[str, int] = {}

    def engine(batch: np.ndarray, options: Options | None = None) -> list[np.ndarray]:
        kind = "background" if options is not None else "live"
        seen[kind] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        policy[kind] = os.sched_getscheduler(threading.get_native_id())
        return [batch]

    async def main() -> None:
        b = Batcher([engine], max_batch_size=2, background_options=Options)
        b.start()
        await b.submit(item(1))
        await b.submit(item(2), background=True)
        await b.stop()

    run(main())
    assert seen["background"] == 19 and seen["live"] == os.getpriority(os.PRIO_PROCESS, 0)
    assert policy["background"] == os.SCHED_IDLE and policy["live"] == os.sched_getscheduler(0)


def test_background_items_are_prepared_into_a_buffer_each_thread_keeps() -> None:
    class Masked:
        """A prepare function that can also write its tensor into a given array."""

        shape, dtype = (2,), np.float32

        def __init__(self) -> None:
            self.called, self.into_called = 0, 0

        def __call__(self, v: float) -> tuple[np.ndarray, None]:
            self.called += 1
            return item(v), None

        def into(self, v: float, out: np.ndarray) -> None:
            self.into_called += 1
            out[:] = item(v)

    seen: list[np.ndarray] = []

    def engine(batch: np.ndarray, options: Options | None = None) -> list[np.ndarray]:
        seen.append(batch)
        return [batch * 2]

    async def main() -> list[Any]:
        b = Batcher([engine], max_batch_size=4, background_options=Options, background_batch=3)
        b.start()
        masked = Masked()
        results = await asyncio.gather(*(b.submit(100.0 + v, prepare=masked, background=True) for v in range(6)))
        await b.stop()
        assert (masked.called, masked.into_called) == (0, 6)  # every tensor written in place
        return results

    results = run(main())
    for (outputs, _), v in zip(results, range(6)):
        np.testing.assert_allclose(outputs[0], item(100.0 + v) * 2)
    assert [b.shape[0] for b in seen] == [3, 3]
    assert seen[0].base is not None and seen[0].base is seen[1].base  # one buffer, reused
