"""When background work may start (``service.background.Grace``), driven by a fake clock: no timing."""

from __future__ import annotations

import numpy as np

from visionserve.service.background import Grace


def feed(grace: Grace, gaps: list[float], start: float = 100.0) -> float:
    """Live requests whose idle gaps are ``gaps`` (each request takes 10 ms); returns the time the last one left."""
    now = start
    for g in gaps:
        grace.live_left(now)
        now += g
        grace.live_arrived(now)
        now += 0.010
    grace.live_left(now)
    return now


def test_without_history_background_may_start_after_the_floor() -> None:
    grace = Grace(floor_s=0.005)
    grace.live_left(10.0)
    assert grace.quiet_at() == 10.005


def test_while_live_work_is_in_the_system_background_never_starts() -> None:
    grace = Grace()
    grace.live_left(1.0)
    grace.live_arrived(1.002)
    assert grace.quiet_at() == float("inf")


def test_a_closed_loop_client_gets_a_grace_beyond_its_usual_gaps() -> None:
    # a client that sends its next request 2-9 ms after each answer (a few stragglers at 9 ms), background
    # batches taking 20 ms: a 5 ms grace would start background work before a live arrival about half the time
    rng = np.random.default_rng(0)
    gaps = list(rng.uniform(0.002, 0.008, 250)) + [0.009] * 6
    grace = Grace(floor_s=0.005)
    grace.batch_ran(0.020)
    left = feed(grace, gaps)
    wait = grace.quiet_at() - left
    assert abs(wait - 0.009) < 1e-9  # just past the longest gaps seen: no live request is expected any more
    assert sum(g > wait for g in gaps) < 3


def test_poisson_arrivals_let_background_start_after_the_floor() -> None:
    # 20 req/s Poisson: idle gaps are exponential (mean 50 ms); a 20 ms batch ends before the next arrival
    # about two times in three wherever it starts, so waiting gains nothing
    rng = np.random.default_rng(1)
    grace = Grace(floor_s=0.005, max_hit=0.4)
    grace.batch_ran(0.020)
    left = feed(grace, list(rng.exponential(0.050, 256)))
    assert abs(grace.quiet_at() - left - 0.005) < 1e-9


def test_the_grace_is_capped_and_follows_the_batch_run_time() -> None:
    gaps = [0.030 + 0.0001 * i for i in range(256)]  # every gap 30-55.5 ms
    fits = Grace(ceiling_s=0.1)
    fits.batch_ran(0.010)  # a 10 ms batch started at 5 ms ends before any arrival seen: start at the floor
    left = feed(fits, gaps)
    assert abs(fits.quiet_at() - left - fits.floor_s) < 1e-9
    long_, capped = Grace(ceiling_s=0.1), Grace(ceiling_s=0.04)
    for g in (long_, capped):
        g.batch_ran(0.040)  # a 40 ms batch would be preempted by most arrivals: wait for the gaps to pass
    left = feed(long_, gaps)
    assert abs(long_.quiet_at() - left - gaps[-3]) < 1e-9  # fewer than 3 of the gaps seen were longer
    left = feed(capped, gaps)
    assert abs(capped.quiet_at() - left - 0.04) < 1e-9  # never later than the ceiling


def test_the_run_time_is_a_moving_average_of_finished_batches() -> None:
    grace = Grace()
    grace.batch_ran(0.010)
    assert grace.run_s == 0.010
    grace.batch_ran(0.020)
    assert abs(grace.run_s - 0.012) < 1e-12
