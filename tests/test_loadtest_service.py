"""The load generator against a real running visionserve: every request kind, and the server's own view."""

from __future__ import annotations

import pytest

from visionserve.loadtest.config import LoadConfig
from visionserve.loadtest.runner import run_load

from .conftest import ROOT, Server

IMAGES = ROOT / "examples" / "images"


@pytest.mark.parametrize("kind", ["classify", "infer", "infer-binary"])
def test_closed_loop_every_kind_without_errors(server: Server, kind: str) -> None:
    r = run_load(LoadConfig(url=server.url, model="mobilenet_v2", kind=kind, image=IMAGES, concurrency=4,
                            duration=2.0, warmup=0.5))
    assert r.error_count == 0, (r.errors, r.error_samples)
    assert r.ok >= 4 and r.throughput_rps > 0
    assert r.percentile_ms(50) <= r.percentile_ms(99) <= r.latency_ms["max"]
    # the server's own view, from /metrics deltas, agrees with what was sent
    assert r.server is not None
    assert r.server["batch_size_mean"] >= 1.0 and r.server["inference_ms_mean"] > 0
    assert r.server["requests"] >= r.ok


def test_open_loop_detect_and_bounded(server: Server) -> None:
    r = run_load(LoadConfig(url=server.url, model="shapes_detector", kind="detect",
                            image=ROOT / "tests" / "data" / "shapes" / "images", rate=10, duration=2.0, warmup=0.5))
    assert r.error_count == 0, r.errors
    assert 10 <= r.sent <= 30  # 10/s for 2 s, measured part only
    assert r.duration_s < 10
