"""The example scripts run the way their docstrings and docs/ say: ``python examples/<script>.py`` from the
repository root, with only the installed package on the path (the training scripts import each other through
``examples.``, which is not in the wheel)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "examples").glob("*.py") if "argparse" in p.read_text())


def test_every_script_with_a_command_line_is_found() -> None:
    assert {p.name for p in SCRIPTS} >= {"train_digits_oneshot.py", "search_digits_oneshot.py",
                                         "plot_digits_oneshot.py", "train_shapes_detector.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_runs_as_documented(script: Path, tmp_path: Path) -> None:
    # from another directory, so that neither the cwd nor an installed 'examples' makes the imports work
    r = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
