"""evaluate: accuracy on an ImageFolder, checked against answers computed independently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnxruntime as ort
import pytest
from PIL import Image
from typer.testing import CliRunner

from visionserve.service.cli import app
from visionserve.service.imaging import Preprocessor
from visionserve.service.repository import load_entry

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "tests" / "data" / "digits"
REPO = ROOT / "tests" / "data" / "digits_repo"
runner = CliRunner()


def evaluate(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, ["evaluate", *args])
    return r.exit_code, r.output


def test_accuracy_matches_a_folder_built_with_known_mistakes(tmp_path: Path) -> None:
    """Put 15 images under the class the model predicts and 5 under another: top-1 must be exactly 75%."""
    entry = load_entry(REPO / "digits" / "1")
    prep = Preprocessor(entry.manifest.input, entry.manifest.preprocess)
    sess = ort.InferenceSession(str(entry.model_path), providers=["CPUExecutionProvider"])
    files = sorted(DIGITS.glob("test/*/*.png"))[::22][:20]
    for i, f in enumerate(files):
        pred = int(sess.run(None, {"input": prep(f.read_bytes())[0][None]})[0].argmax())
        cls = pred if i % 4 else (pred + 1) % 10  # every 4th one deliberately "mislabelled"
        (tmp_path / "ds" / str(cls)).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / "ds" / str(cls) / f"{i}.png")
    code, out = evaluate("digits", "-r", str(REPO), "-d", str(tmp_path / "ds"), "--json", str(tmp_path / "r.json"))
    assert code == 0, out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["images"] == 20 and res["top1"] == pytest.approx(0.75)
    assert res["top5"] >= res["top1"]
    assert sum(c["count"] for c in res["confusions"]) == 5
    assert "top-1 75.00%" in out


def test_committed_test_set_accuracy() -> None:
    from visionserve.quantize.evaluate import evaluate as run

    res = run(load_entry(REPO / "digits" / "1"), DIGITS / "test")
    assert res["images"] == sum(1 for _ in DIGITS.glob("test/*/*.png"))
    assert res["top1"] > 0.95  # the committed model scored 99.8 % when trained


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "cat").mkdir() or Image.new("RGB", (32, 32)).save(d / "cat" / "a.png"), "do not match"),
    (lambda d: Image.new("RGB", (32, 32)).save(d / "a.png"), "not an ImageFolder"),
    (lambda d: None, "holds no images"),
    (lambda d: (d / "3").mkdir() or (d / "3" / "x.png").write_bytes(b"garbage"), "x.png"),
])
def test_bad_datasets_fail_clearly(tmp_path: Path, make, message: str) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    make(d)
    code, out = evaluate("digits", "-r", str(REPO), "-d", str(d))
    assert code != 0
    assert message in out, out


def test_optimize_end_to_end_on_digits(tmp_path: Path) -> None:
    """prune → convert → quantize → evaluate: two entries and a report with every stage."""
    shutil.copytree(REPO, tmp_path / "repo")
    r = runner.invoke(app, [
        "optimize", "-r", str(tmp_path / "repo"), "-n", "digits_small", "--module", "examples.train_digits:digits_net",
        "--weights", str(DIGITS / "digits_cnn.pt"), "--labels", str(DIGITS / "labels.txt"), "--input-size", "32",
        "--resize", "32", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--calibration", str(DIGITS / "test"),
        "--ratio", "0.25", "--max-drop", "0.05", "--report", str(tmp_path / "rep"),
    ])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    stages = rep["stages"]
    assert list(stages) == ["original fp32", "pruned fp32", "int8"]
    assert stages["pruned fp32"]["macs_m"] < stages["original fp32"]["macs_m"]
    assert stages["int8"]["size_mb"] < stages["pruned fp32"]["size_mb"]
    assert all("top1" in s and s["b8_ms"] > 0 for s in stages.values())
    assert (tmp_path / "rep" / "report.md").read_text().count("|") > 20
    int8 = load_entry(tmp_path / "repo" / "digits_small" / "1").manifest
    assert int8.provenance.derived_from == "digits_small_fp32:1"
