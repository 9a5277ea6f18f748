"""``visionserve tune`` sweeps real servers and writes a config that ``serve --config`` reads (issue 12 item 6)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT
from visionserve.loadtest.tune import Candidate, Outcome, choose, grid
from visionserve.service.settings import load_settings

DIGITS_REPO = ROOT / "tests" / "data" / "digits_repo"


def test_grid_and_choice() -> None:
    cands = grid([1, 2], [1, 2], [1, 4], [0.0], cpus=1)
    assert Candidate(2, 2, 1, 0.0) not in cands  # 4 threads on 1 CPU: left out
    assert len(cands) == 6
    fast_slow = Outcome(Candidate(1, 1, 4, 0.0), 100.0, 40.0, 8, [])
    fast_quick = Outcome(Candidate(2, 1, 4, 0.0), 98.0, 20.0, 8, [])  # within 3 %: the lower p99 wins
    slower = Outcome(Candidate(1, 2, 1, 0.0), 80.0, 5.0, 2, [])
    none = Outcome(Candidate(2, 2, 1, 0.0), None, None, None, [])
    assert choose([fast_slow, fast_quick, slower, none]) is fast_quick
    assert choose([none]) is None


def test_tune_writes_a_config_serve_reads(tmp_path: Path) -> None:
    out = tmp_path / "serve.yaml"
    image = ROOT / "tests" / "data" / "digits"
    proc = subprocess.run(
        [sys.executable, "-m", "visionserve.service", "tune", "--repository", str(DIGITS_REPO), "--model", "digits",
         "--slo-p99-ms", "500", "--out", str(out), "--instances", "1,2", "--threads", "1", "--batch", "4",
         "--delay-ms", "0", "--duration", "1", "--max-steps", "2",
         *(["--image", str(image)] if image.exists() else [])],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[2/2]" in proc.stderr  # progress, one line per candidate
    report = json.loads((tmp_path / "serve-report" / "tune.json").read_text())
    assert len(report["outcomes"]) == 2
    for o in report["outcomes"]:
        assert o["best_rps"] and o["best_rps"] > 0 and o["curve"], o
        assert o["best_p99_ms"] <= 500
    winner = report["winner"]["candidate"]
    written = yaml.safe_load(out.read_text())["models"]["digits"]
    assert written == winner
    settings = load_settings(out, repository=DIGITS_REPO)  # what serve --config does
    model = settings.for_model("digits")
    assert (model.instances, model.intra_op_threads, model.preferred_batch_size) == (
        winner["instances"], winner["intra_op_threads"], winner["preferred_batch_size"])
    assert (tmp_path / "serve-report" / "tune.png").stat().st_size > 10_000
    assert "(chosen)" in (tmp_path / "serve-report" / "report.md").read_text()
