"""The batcher: no waiting window when idle, batching under load, cancellation, deadlines, draining."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visionserve.service.batcher import Batcher, InferenceFailed
from visionserve.service.errors import DeadlineExceeded, Unavailable


class Recorder:
    """A fake model: doubles its input, records batch sizes, can be held to simulate a busy engine."""

    def __init__(self, hold_first: bool = False) -> None:
        self.sizes: list[int] = []
        self.seen: list[float] = []
        self.gate = threading.Event()
        self.started = threading.Event()
        self.hold_first = hold_first

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        self.started.set()
        if self.hold_first and not self.sizes:
            self.gate.wait(5)
        self.sizes.append(batch.shape[0])
        self.seen.extend(float(x) for x in batch[:, 0])
        return [batch * 2, batch.sum(axis=1)]


def item(v: float) -> np.ndarray:
    return np.array([v, 1.0], dtype=np.float32)


async def wait_started(rec: Recorder) -> None:
    while not rec.started.is_set():
        await asyncio.sleep(0.001)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_lone_requests_run_at_once_without_a_window() -> None:
    async def main() -> list[int]:
        rec = Recorder()
        b = Batcher([rec], max_batch_size=8)
        b.start()
        for v in range(3):  # one at a time: each is a batch of one, no waiting for company
            out = await asyncio.wait_for(b.submit(item(v)), 2)
            np.testing.assert_allclose(out[0], item(v) * 2)
            assert out[1] == pytest.approx(v + 1)
        await b.stop()
        return rec.sizes

    assert run(main()) == [1, 1, 1]


def test_requests_arriving_while_busy_leave_together() -> None:
    async def main() -> tuple[list[int], list[np.ndarray]]:
        rec = Recorder(hold_first=True)
        b = Batcher([rec], max_batch_size=4)
        b.start()
        first = asyncio.create_task(b.submit(item(0)))
        await wait_started(rec)
        rest = [asyncio.create_task(b.submit(item(v))) for v in range(1, 7)]
        await asyncio.sleep(0.05)
        assert b.depth == 6
        rec.gate.set()
        results = await asyncio.gather(first, *rest)
        await b.stop()
        return rec.sizes, [r[0] for r in results]

    sizes, outs = run(main())
    assert sizes == [1, 4, 2]  # capped at max_batch_size, FIFO
    for v, o in enumerate(outs):
        np.testing.assert_allclose(o, item(v) * 2)


def test_a_caller_cancelled_mid_batch_does_not_hurt_the_others() -> None:
    async def main() -> list[np.ndarray]:
        rec = Recorder(hold_first=True)
        b = Batcher([rec], max_batch_size=8)
        b.start()
        tasks = [asyncio.create_task(b.submit(item(v))) for v in range(4)]
        await wait_started(rec)  # the batch of the first item is running
        queued = [asyncio.create_task(b.submit(item(v))) for v in range(4, 8)]
        await asyncio.sleep(0.01)
        tasks[0].cancel()  # gives up mid-batch
        queued[1].cancel()  # gives up while queued: must be skipped, not run
        rec.gate.set()
        done = await asyncio.gather(*tasks[1:], queued[0], *queued[2:], return_exceptions=True)
        await b.stop()
        assert 5.0 not in rec.seen
        return done

    done = run(main())
    assert all(isinstance(d, list) for d in done), done


def test_deadline_passed_while_queued_is_dropped_unrun() -> None:
    async def main() -> None:
        rec = Recorder(hold_first=True)
        b = Batcher([rec], max_batch_size=8)
        b.start()
        first = asyncio.create_task(b.submit(item(0)))
        await wait_started(rec)
        late = asyncio.create_task(b.submit(item(42), deadline=time.monotonic() + 0.01))
        ok = asyncio.create_task(b.submit(item(7)))
        await asyncio.sleep(0.05)
        rec.gate.set()
        with pytest.raises(DeadlineExceeded):
            await late
        await first
        assert (await ok)[1] == pytest.approx(8)
        await b.stop()
        assert 42.0 not in rec.seen

    run(main())


def test_full_queue_refuses_at_once() -> None:
    async def main() -> None:
        rec = Recorder(hold_first=True)
        b = Batcher([rec], max_batch_size=2, max_queue=3)
        b.start()
        first = asyncio.create_task(b.submit(item(0)))
        await wait_started(rec)
        queued = [asyncio.create_task(b.submit(item(v))) for v in range(1, 4)]
        await asyncio.sleep(0.01)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(b.submit(item(9)), 0.5)
        rec.gate.set()
        await asyncio.gather(first, *queued)
        await b.stop()

    run(main())


def test_wrong_output_count_fails_every_caller_of_the_batch() -> None:
    def broken(batch: np.ndarray) -> list[np.ndarray]:
        return [batch[:1]]

    async def main() -> list[object]:
        b = Batcher([broken], max_batch_size=8)
        b.start()
        res = await asyncio.gather(*(b.submit(item(v)) for v in range(3)), return_exceptions=True)
        await b.stop()
        return res

    res = run(main())
    assert any(isinstance(r, InferenceFailed) for r in res)
    assert not any(isinstance(r, list) and len(r[0]) != 2 for r in res)


def test_stop_finishes_everything_accepted_and_refuses_new_work() -> None:
    async def main() -> None:
        rec = Recorder(hold_first=True)
        b = Batcher([rec], max_batch_size=3)
        b.start()
        tasks = [asyncio.create_task(b.submit(item(v))) for v in range(10)]
        await wait_started(rec)
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0.01)
        with pytest.raises(Unavailable):
            await b.submit(item(99))
        rec.gate.set()
        await stopping
        assert all(t.done() and not t.exception() for t in tasks)
        assert sorted(rec.seen) == list(range(10))

    run(main())


def test_max_delay_gathers_a_fuller_batch() -> None:
    async def main() -> list[int]:
        rec = Recorder()
        b = Batcher([rec], max_batch_size=8, max_delay_s=0.2)
        b.start()
        first = asyncio.create_task(b.submit(item(0)))
        await asyncio.sleep(0.02)
        second = asyncio.create_task(b.submit(item(1)))
        await asyncio.gather(first, second)
        await b.stop()
        return rec.sizes

    assert run(main()) == [2]


def test_two_instances_run_in_parallel() -> None:
    barrier = threading.Barrier(2, timeout=5)

    def model(batch: np.ndarray) -> list[np.ndarray]:
        barrier.wait()  # only returns if both instances are inside at the same time
        return [batch]

    async def main() -> None:
        b = Batcher([model, model], max_batch_size=1)
        b.start()
        await asyncio.wait_for(asyncio.gather(b.submit(item(0)), b.submit(item(1))), 5)
        await b.stop()

    run(main())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(-100, 100, width=32), st.integers(0, 3)), min_size=1, max_size=24),
       st.integers(1, 6))
def test_any_interleaving_gives_the_answers_of_one_by_one(values: list[tuple[float, int]], max_batch: int) -> None:
    async def main() -> list[list[np.ndarray]]:
        b = Batcher([Recorder()], max_batch_size=max_batch)
        b.start()

        async def client(v: float, pause: int) -> list[np.ndarray]:
            for _ in range(pause):
                await asyncio.sleep(0)
            return await b.submit(item(v))

        res = await asyncio.gather(*(client(v, p) for v, p in values))
        await b.stop()
        return res

    for (v, _), out in zip(values, run(main())):
        np.testing.assert_allclose(out[0], item(v) * 2, rtol=1e-6)
        assert out[1] == pytest.approx(float(np.float32(v)) + 1, rel=1e-5, abs=1e-5)


def test_lone_requests_take_the_solo_session_and_a_burst_does_not() -> None:
    async def main() -> None:
        rec, solo = Recorder(), Recorder()
        b = Batcher([rec, rec], max_batch_size=4, solo=solo)
        b.start()
        for v in range(3):  # one at a time: each alone on an idle engine
            assert (await b.submit(item(v)))[0].tolist() == [2 * v, 2.0]
        assert (b.solo_runs, solo.sizes, rec.sizes) == (3, [1, 1, 1], [])
        await asyncio.gather(*(b.submit(item(v)) for v in range(16)))  # a burst: batches on the workers
        assert b.solo_runs == 3 and sum(rec.sizes) == 16 and max(rec.sizes) == 4
        await b.submit(item(99))  # right after the burst the engine is idle, but load was just high
        assert b.solo_runs == 3
        for v in range(20):  # the moving average of requests in the system decays: lone again
            await b.submit(item(v))
        assert b.solo_runs > 3
        await b.stop()

    run(main())


def test_a_bad_item_in_a_prepared_batch_fails_alone() -> None:
    """Workers decode (``prepare``) on their own thread: one undecodable item among good ones gets its own
    error, the others their answers and what prepare returned beside the tensor."""
    from visionserve.service.errors import BadImage

    def prepare(raw: float) -> tuple[np.ndarray, str]:
        if raw < 0:
            raise BadImage(f"cannot decode {raw}")
        return item(raw), f"geometry of {raw}"

    async def main() -> None:
        rec = Recorder(hold_first=True)
        b = Batcher([rec], max_batch_size=8)
        b.start()
        first = asyncio.create_task(b.submit(0.0, prepare=prepare))
        await wait_started(rec)  # the engine is busy: the next four leave together
        rest = [asyncio.create_task(b.submit(v, prepare=prepare)) for v in (1.0, -1.0, 2.0, 3.0)]
        await asyncio.sleep(0.01)
        rec.gate.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        await b.stop()
        assert rec.sizes == [1, 3]  # the bad one never reached the model
        assert isinstance(results[2], BadImage)
        for r, v in zip([results[0], *results[1:2], *results[3:]], (0.0, 1.0, 2.0, 3.0)):
            outputs, extra = r
            assert outputs[0].tolist() == [2 * v, 2.0] and extra == f"geometry of {v}"

    run(main())


def test_an_inference_failure_keeps_the_decode_errors_of_its_batch() -> None:
    from visionserve.service.errors import BadImage

    def prepare(raw: float) -> tuple[np.ndarray, None]:
        if raw < 0:
            raise BadImage("undecodable")
        return item(raw), None

    def broken(batch: np.ndarray) -> list[np.ndarray]:
        raise RuntimeError("the engine fell over")

    async def main() -> None:
        b = Batcher([broken], max_batch_size=8)
        tasks = [asyncio.create_task(b.submit(v, prepare=prepare)) for v in (1.0, -1.0)]
        await asyncio.sleep(0.01)  # both queued before any worker exists: one batch
        b.start()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await b.stop()
        assert isinstance(results[0], InferenceFailed) and "fell over" in str(results[0])
        assert isinstance(results[1], BadImage)  # a 400 for the bad image, not the batch's 500

    run(main())
