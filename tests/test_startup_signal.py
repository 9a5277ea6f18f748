"""SIGTERM while models are still loading or warming up stops the server within seconds (issue 11).

The model here is built to be slow: forty 64→64 3×3 convolutions at 192×192 (≈ 200 GFLOP per image), so one
warm-up run at its max batch takes far longer than the few seconds the server may take to stop.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.onnx_builders import write_conv_stack

SIZE, WIDTH, DEPTH = 192, 64, 40


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_conv_stack(tmp_path_factory.mktemp("slow_repo"), "slow", size=SIZE, width=WIDTH, depth=DEPTH)


def start(repo: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "visionserve.service",
         "serve", "--repository", str(repo), "--port", str(free_port()), *extra],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, env={"PYTHONUNBUFFERED": "1",
                                                                       "PATH": "/usr/bin:/bin"},
    )


def wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{text!r} never logged:\n{log.read_text()}")


@pytest.mark.parametrize("instances", ["1", "2"])
def test_sigterm_during_warmup_stops_within_seconds(slow_repo: Path, tmp_path: Path, instances: str) -> None:
    log = tmp_path / "serve.log"
    proc = start(slow_repo, log, "--instances", instances)
    try:
        wait_for(log, "Application startup complete", proc)
        time.sleep(1.0)  # inside the warm-up at batch 16 (tens of seconds on a 2-core machine)
        assert "ready" not in log.read_text().split("Application startup complete")[1], "warm-up was too quick"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert rc == 0, out
    assert took < 5.0, f"took {took:.1f} s to stop during warm-up:\n{out}"
    assert "loading cancelled" in out
    assert "model slow version 1 ready" not in out
