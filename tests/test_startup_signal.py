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

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.manifest import (
    ClassifyPostprocess,
    InputSpec,
    Manifest,
    Preprocess,
    Provenance,
    TensorSpec,
    sha256_file,
)
from service.repository import write_version
from tests.conftest import ROOT, free_port

SIZE, WIDTH, DEPTH = 192, 64, 40


def slow_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.05, (WIDTH, 3, 3, 3)).astype(np.float32), "w0")]
    nodes = [helper.make_node("Conv", ["input", "w0"], ["h0"], pads=[1, 1, 1, 1])]
    for i in range(1, DEPTH + 1):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.05, (WIDTH, WIDTH, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [f"h{i - 1}", f"w{i}"], [f"h{i}"], pads=[1, 1, 1, 1]))
    nodes += [helper.make_node("GlobalAveragePool", [f"h{DEPTH}"], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["logits"])]
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("slow_repo")

    def build(staging: Path, version: str) -> Manifest:
        path = staging / "model.onnx"
        slow_model(path)
        return Manifest(
            name="slow", version=version, task="classify",
            input=InputSpec(name="input", shape=[-1, 3, SIZE, SIZE]),
            outputs=[TensorSpec(name="logits", shape=[-1, WIDTH])],
            preprocess=Preprocess(), postprocess=ClassifyPostprocess(output="logits"),
            labels=[str(i) for i in range(WIDTH)], max_batch_size=16,
            provenance=Provenance(source="tests/test_startup_signal.py", onnx_sha256=sha256_file(path)),
        )

    write_version(repo, "slow", "1", build)
    return repo


def start(repo: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--repository", str(repo), "--port", str(free_port()), *extra],
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
