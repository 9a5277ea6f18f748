"""The load generator against a server with known, injected behaviour (latency, slow requests, stalls, 503s)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from tests.test_loadtest_support import JPEG, test_server
from visionserve.loadtest import metrics as server_metrics
from visionserve.loadtest.config import ConfigError, LoadConfig, LoadError
from visionserve.loadtest.payloads import build_payload
from visionserve.loadtest.runner import run_load
from visionserve.loadtest.stats import Result, Window
from visionserve.loadtest.sweep import SweepSpec, is_stable, parse_sweep, run_sweep


def config(url: str, **kw: object) -> LoadConfig:
    base = LoadConfig(url=url, model="m", images=[JPEG], warmup=0.2, metrics=False)
    return replace(base, **kw)  # type: ignore[arg-type]


def fraction_at_least(r: Result, ms: float) -> float:
    hist = r.histogram
    over = sum(
        it.count_added_in_this_iter_step for it in hist.get_recorded_iterator() if it.value_iterated_to >= ms * 1e3
    )
    return over / hist.get_total_count()


def test_percentiles_match_injected_latency() -> None:
    # every 20th request takes 60 ms, the rest 10 ms: p50/p90 ≈ 10 ms, p99 ≈ 60 ms, 5 % slow
    with test_server(latency_ms=10, slow_every=20, slow_ms=60) as url:
        r = run_load(config(url, concurrency=2, duration=2.5))
    lat = r.latency_ms
    assert r.error_count == 0 and r.ok > 150
    assert 10.0 <= lat["min"] <= lat["p50"] <= 10.0 + 8.0
    assert lat["p90"] < 30.0
    assert 60.0 <= lat["p99"] <= 60.0 + 20.0
    assert 0.03 <= fraction_at_least(r, 50.0) <= 0.07
    assert r.throughput_rps == pytest.approx(r.ok / r.duration_s)


def test_open_loop_shows_the_stall_that_closed_loop_hides() -> None:
    # the server freezes for 1 s at the end of every 2.5 s: requests arriving then wait it out
    with test_server(latency_ms=5, stall_period_s=2.5, stall_s=1.0) as url:
        closed = run_load(config(url, concurrency=4, duration=3.0))
        opened = run_load(config(url, rate=100, duration=3.0))
    p99_closed, p99_open = closed.percentile_ms(99), opened.percentile_ms(99)
    # closed loop: only the 4 requests in flight saw each stall, so the tail hides it...
    assert closed.latency_ms["max"] >= 400.0  # ...though the stall did happen during the run
    assert p99_closed < 100.0
    # open loop: everything scheduled during a stall counts from its intended send time
    assert p99_open >= 500.0
    assert p99_open > 10 * p99_closed
    # the schedule did not slow down with the server: 100 req/s x 3 s were all sent and answered
    assert opened.sent == pytest.approx(300, abs=2) and opened.ok == opened.sent


def test_poisson_arrivals_hold_the_rate() -> None:
    with test_server(latency_ms=1) as url:
        r = run_load(config(url, rate=200, arrival="poisson", duration=2.0, seed=7))
    assert r.mode == "open" and r.load == 200
    assert r.throughput_rps == pytest.approx(200, rel=0.2)
    assert r.schedule_lag_ms is not None and r.schedule_lag_ms["p50"] is not None


def test_errors_counted_by_status_code() -> None:
    with test_server(latency_ms=1, error_every=5) as url:
        r = run_load(config(url, concurrency=2, requests=300, duration=30))
    assert r.sent == 300 and r.ok + r.error_count == 300
    assert set(r.errors) == {"503"}
    assert abs(r.errors["503"] - 60) <= 2
    assert "overloaded" in r.error_samples["503"]
    d = r.to_dict()
    assert d["errors"] == {"503": r.errors["503"]} and d["error_rate"] == pytest.approx(r.errors["503"] / 300)


def test_timeouts_are_errors_and_the_run_stays_bounded() -> None:
    with test_server(latency_ms=5000) as url:
        t0 = time.monotonic()
        r = run_load(config(url, concurrency=3, duration=0.5, warmup=0, timeout=0.3))
        elapsed = time.monotonic() - t0
    assert r.ok == 0 and r.errors.get("timeout", 0) >= 3
    assert elapsed < 3.0


def test_refused_connection_fails_fast_and_clearly() -> None:
    with test_server() as url:
        pass  # the port is free again
    with pytest.raises(LoadError, match="cannot connect"):
        run_load(config(url, concurrency=1, duration=1))


@pytest.mark.parametrize("kind", ["classify", "detect", "infer", "infer-binary"])
def test_every_request_kind_is_encoded_as_the_contract_says(kind: str) -> None:
    # the test server answers 400 to a body that breaks the contract
    with test_server(latency_ms=0) as url:
        r = run_load(config(url, kind=kind, concurrency=2, requests=40, warmup=0))
    assert r.ok == 40, r.error_samples


def test_binary_infer_body_matches_tritonclient() -> None:
    np = pytest.importorskip("numpy")
    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.http._utils import _get_inference_request

    inp = httpclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([JPEG], dtype=object), binary_data=True)
    theirs, json_size = _get_inference_request([inp], "", None, 0, False, False, 0, None, None)
    ours = build_payload("infer-binary", "m", JPEG)
    n = int(ours.headers["Inference-Header-Content-Length"])
    assert ours.body[n:] == theirs[json_size:]
    assert json.loads(ours.body[:n])["inputs"] == json.loads(theirs[:json_size])["inputs"]
    assert ours.path == "/v2/models/m/infer"


def test_server_view_from_metrics_deltas() -> None:
    # the test server reports queue = 40 %, inference = 60 % of its 2 ms, one batch of 4 per 4 requests,
    # and a decoy model with batch size 100 that must be filtered out
    with test_server(latency_ms=2, batch_size=4) as url:
        r = run_load(config(url, concurrency=2, duration=1.0, metrics=True))
    s = r.server
    assert s is not None
    assert s["batch_size_mean"] == pytest.approx(4.0)
    assert s["queue_wait_ms_mean"] == pytest.approx(0.8)
    assert s["inference_ms_mean"] == pytest.approx(1.2)
    assert s["request_duration_ms_mean"] == pytest.approx(2.0)
    # the scrapes bracket the measurement, so the server counted about what the client measured
    assert abs(s["requests"] - r.ok) <= 6


def test_missing_metrics_are_tolerated() -> None:
    with test_server(latency_ms=1, no_metrics=True) as url:
        r = run_load(config(url, concurrency=1, duration=0.5, metrics=True))
    assert r.ok > 0 and r.server is None


def test_prometheus_parsing_filters_by_model() -> None:
    text = "\n".join(
        [
            "# TYPE visionserve_batch_size histogram",
            'visionserve_batch_size_bucket{model="a",version="1",le="+Inf"} 2',
            'visionserve_batch_size_sum{model="a",version="1"} 6',
            'visionserve_batch_size_count{model="a",version="1"} 2',
            'visionserve_batch_size_sum{model="a",version="2"} 4',
            'visionserve_batch_size_count{model="a",version="2"} 2',
            'visionserve_batch_size_sum{model="b",version="1",note="x\\"y"} 1000',
            'visionserve_batch_size_count{model="b",version="1",note="x\\"y"} 1',
            "visionserve_inference_seconds_sum 2.5",
            "visionserve_inference_seconds_count 5",
        ]
    )
    before = server_metrics.parse("", "a")
    after = server_metrics.parse(text, "a")
    assert after["visionserve_batch_size_sum"] == 10 and after["visionserve_batch_size_count"] == 4
    view = server_metrics.delta(before, after)
    assert view == {"batch_size_mean": 2.5, "batches": 4, "inference_ms_mean": 500.0}
    assert server_metrics.parse(text, "a", version="2")["visionserve_batch_size_sum"] == 4
    assert server_metrics.delta(before, server_metrics.parse("other_metric 1\n", "a")) is None
    assert server_metrics.delta(None, after) is None


def test_result_json_round_trip_keeps_the_histogram() -> None:
    with test_server(latency_ms=3) as url:
        r = run_load(config(url, concurrency=2, duration=0.6))
    again = Result.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again.latency_ms == r.latency_ms
    assert again.ok == r.ok and again.throughput_rps == pytest.approx(r.throughput_rps, rel=1e-3)


def _window(ok: int, latency_ms: float, span: float = 1.0) -> Window:
    w = Window(0.0)
    w.ended = span
    for _ in range(ok):
        w.record_ok(latency_ms / 1e3)
    return w


def test_stability_needs_three_windows_within_tolerance() -> None:
    steady = [_window(100, 10), _window(102, 10.5), _window(98, 9.8)]
    assert is_stable(steady, 0.1)
    assert not is_stable(steady[:2], 0.1)
    assert not is_stable([*steady[:2], _window(60, 10)], 0.1)  # throughput moved
    assert not is_stable([*steady[:2], _window(100, 20)], 0.1)  # p99 moved
    assert not is_stable([*steady[:2], _window(0, 10)], 0.1)


def test_auto_sweep_doubles_until_throughput_stops_rising(monkeypatch: pytest.MonkeyPatch) -> None:
    import visionserve.loadtest.sweep as sweep_mod

    curve = {1: (100, 5.0), 2: (190, 6.0), 4: (350, 9.0), 8: (360, 40.0), 16: (365, 80.0)}
    levels: list[int] = []

    def fake_step(cfg: LoadConfig, tolerance: float, max_windows: int, progress: object) -> Result:
        level = cfg.concurrency or 0
        levels.append(level)
        rps, p99 = curve[level]
        w = _window(rps, p99)
        from visionserve.loadtest.stats import merge

        hist, errors, span = merge([w])
        return Result("closed", level, span, rps, rps, errors, hist, stable=True)

    monkeypatch.setattr(sweep_mod, "run_step", fake_step)
    base = LoadConfig(model="m", images=[JPEG])
    flat = run_sweep(base, SweepSpec("closed", None, 1), slo_p99_ms=None)
    assert levels == [1, 2, 4, 8] and "stopped rising" in flat.stopped_because
    assert flat.best is not None and flat.best.load == 8  # no SLO: the highest throughput
    levels.clear()
    slo = run_sweep(base, SweepSpec("closed", None, 1), slo_p99_ms=20)
    assert levels == [1, 2, 4, 8] and "SLO" in slo.stopped_because
    assert slo.best is not None and slo.best.load == 4  # 8 has more throughput but p99 40 ms > 20


def test_list_sweep_against_the_server(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with test_server(latency_ms=5, batch_size=2) as url:
        base = config(url, window=0.3, warmup=0.1, metrics=True)
        sweep = run_sweep(base, parse_sweep("rate:50,100", None, None), slo_p99_ms=1.0, max_windows=5)
    assert [s.load for s in sweep.steps] == [50, 100] and sweep.mode == "open"
    for step in sweep.steps:
        assert step.throughput_rps == pytest.approx(step.load, rel=0.3)
        assert step.server is not None and step.server["batch_size_mean"] == pytest.approx(2.0)
    assert sweep.best is None  # 5 ms of latency never meets a 1 ms SLO
    d = sweep.to_dict()
    assert d["best"] is None and len(d["steps"]) == 2

    from visionserve.loadtest.report import write_report

    report = write_report(tmp_path / "rep", d)
    assert "No level met the SLO" in report.read_text()
    for png in ("latency_vs_throughput.png", "latency_distribution.png", "batch_size_vs_load.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"concurrency": 2, "rate": 10.0}, "not both"),
        ({"rate": -1.0}, "--rate"),
        ({"concurrency": 0}, "--concurrency"),
        ({"kind": "segment"}, "--kind"),
        ({"duration": 0.0}, "--duration"),
        ({"requests": 0}, "--requests"),
        ({"metrics_url": "ftp://x"}, "URL"),
        ({"model": ""}, "--model"),
        ({"images": None}, "--image"),
        ({"image": "/nonexistent/dir", "images": None}, "no such file"),
        ({"arrival": "bursty", "rate": 5.0}, "--arrival"),
    ],
)
def test_bad_configs_are_rejected_with_a_clear_message(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config("http://127.0.0.1:9", **kw).validate()


def test_bad_sweeps_are_rejected() -> None:
    for text in ("1,x", "rates:1,2", "0,1", "1.5,2"):
        with pytest.raises(ConfigError):
            parse_sweep(text, None, None)
    assert parse_sweep("10,20", 5.0, None).mode == "open"
    assert parse_sweep("auto", None, 4) == SweepSpec("closed", None, 4.0)
