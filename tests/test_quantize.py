"""quantize: guarded static int8 on the committed digits model (no training, no MobileNet)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from visionserve.service.cli import app
from visionserve.service.repository import load_entry, versions

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "tests" / "data" / "digits"
DIGITS_REPO = ROOT / "tests" / "data" / "digits_repo"
runner = CliRunner()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(DIGITS_REPO, dst)
    return dst


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Disjoint calibration (flat) and evaluation (ImageFolder) sets from the committed test images."""
    base = tmp_path_factory.mktemp("digits_split")
    cal, ev = base / "cal", base / "eval"
    cal.mkdir()
    for i, p in enumerate(sorted(DIGITS.glob("test/*/*.png"))):
        if i % 3 == 0:
            shutil.copy(p, cal / f"{p.parent.name}_{p.name}")
        else:
            (ev / p.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, ev / p.parent.name / p.name)
    return cal, ev


@pytest.fixture(scope="module")
def black(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deliberately bad calibration set: near-black images, so every activation range is far too small."""
    d = tmp_path_factory.mktemp("black")
    for i in range(4):
        Image.new("RGB", (32, 32), (i, i, i)).save(d / f"{i}.png")
    return d


def quantize(*args: str) -> tuple[int, str]:
    # the digits CNN is so small that int8's speed-up on a busy 2-core machine is noise: the speed guard has
    # its own tests below, every other test lets a slow int8 through
    guard = [] if any(a in ("--min-speedup", "--allow-slow") for a in args) else ["--allow-slow"]
    r = runner.invoke(app, ["quantize", *args, *guard])
    return r.exit_code, r.output


def test_quantize_writes_a_derived_qdq_entry(repo: Path, split: tuple[Path, Path]) -> None:
    cal, ev = split
    code, out = quantize("digits", "-r", str(repo), "--calibration", str(cal), "--eval", str(ev),
                         "--max-drop", "0.02", "--target", "x86-vnni")
    assert code == 0, out
    src = load_entry(repo / "digits" / "1").manifest
    entry = load_entry(repo / "digits_int8" / "1", verify_checksum=True)
    m = entry.manifest
    assert m.provenance.derived_from == "digits:1"
    assert (m.preprocess, m.labels, m.input, m.postprocess) == (src.preprocess, src.labels, src.input,
                                                                 src.postprocess)
    ops = {n.op_type for n in onnx.load(str(entry.model_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    notes = m.provenance.notes
    q, guard = notes["quantization"], notes["guard"]
    assert q["per_channel"] and q["target"] == "x86-vnni" and q["format"] == "QDQ"
    assert guard["passed"] is True
    fid = guard["fidelity"]
    assert fid["images"] + notes["held_out"]["fidelity"]["images"] == sum(1 for _ in ev.rglob("*.png"))
    assert fid["drop"] <= 0.02 and fid["drop_kind"] == "top-1 accuracy drop"
    assert 0.9 <= fid["int8_top1"] <= 1.0
    assert notes["calibration"]["images"] == sum(1 for _ in cal.glob("*.png"))


def test_guard_keeps_sensitive_nodes_in_float_after_bad_calibration(repo: Path, black: Path,
                                                                     split: tuple[Path, Path]) -> None:
    code, out = quantize("digits", "-r", str(repo), "--calibration", str(black), "--eval", str(split[1]),
                         "--max-drop", "0.02", "--max-excluded", "1.0", "--name", "fallback")
    assert code == 0, out
    guard = load_entry(repo / "fallback" / "1").manifest.provenance.notes["guard"]
    assert guard["fidelity_all_quantized"]["drop"] > 0.02  # the bad calibration really hurt
    assert guard["kept_in_float"], "the guard must have kept something in float"
    assert guard["fidelity"]["drop"] <= 0.02
    assert guard["steps"][0]["drop"] > guard["steps"][-1]["drop"]


def test_guard_refuses_when_the_budget_cannot_be_met(repo: Path, black: Path, split: tuple[Path, Path]) -> None:
    code, out = quantize("digits", "-r", str(repo), "--calibration", str(black), "--eval", str(split[1]),
                         "--max-drop", "0", "--max-excluded", "0", "--name", "refused")
    assert code != 0
    assert "cannot meet --max-drop" in out
    assert versions(repo, "refused") == []  # nothing half-written
    assert not any(p.name.startswith(".staging") for p in repo.iterdir())


def test_without_eval_calibration_selection_and_held_out_are_disjoint(repo: Path, split: tuple[Path, Path]) -> None:
    code, out = quantize("digits", "-r", str(repo), "--calibration", str(split[0]), "--max-drop", "0.05")
    assert code == 0, out
    notes = load_entry(repo / "digits_int8" / "1").manifest.provenance.notes
    n = sum(1 for _ in split[0].glob("*.png"))
    held = notes["held_out"]
    # three parts that add up to the folder: nothing is counted twice
    assert notes["calibration"]["images"] + notes["guard"]["fidelity"]["images"] + held["fidelity"]["images"] == n
    assert "guard selection" in notes["guard"]["evaluation"] and "held out" in held["source"]
    lo, hi = held["top1_agreement_confident_ci95"]
    assert lo <= held["fidelity"]["top1_agreement_confident"] <= hi
    assert "held out (" in out


def test_the_held_out_figure_is_reported_apart_from_the_guards(repo: Path, split: tuple[Path, Path]) -> None:
    """With --eval only, half of it selects and half is held out; the manifest reports both, separately."""
    cal, ev = split
    code, out = quantize("digits", "-r", str(repo), "--calibration", str(cal), "--eval", str(ev),
                         "--max-drop", "0.02")
    assert code == 0, out
    notes = load_entry(repo / "digits_int8" / "1").manifest.provenance.notes
    n_eval = sum(1 for _ in ev.rglob("*.png"))
    sel, held = notes["guard"]["fidelity"], notes["held_out"]["fidelity"]
    assert sel["images"] + held["images"] == n_eval and abs(sel["images"] - held["images"]) <= 1
    assert held["drop_kind"] == "top-1 accuracy drop"  # the labels travel with the held-out half
    lo, hi = notes["held_out"]["drop_ci95"]
    assert lo <= held["drop"] <= hi and hi - lo < 0.1
    assert notes["size"]["int8_bytes"] < notes["size"]["fp32_bytes"]


def test_speed_guard_refuses_int8_that_is_not_fast_enough(repo: Path, split: tuple[Path, Path]) -> None:
    # no int8 model is 1000× faster than its fp32: the guard must refuse and write nothing
    code, out = quantize("digits", "-r", str(repo), "--calibration", str(split[0]), "--eval", str(split[1]),
                         "--max-drop", "0.05", "--min-speedup", "1000")
    assert code != 0
    assert "not fast enough" in out and "--allow-slow" in out and "batch 8" in out
    assert versions(repo, "digits_int8") == []
    assert not any(p.name.startswith(".staging") for p in repo.iterdir())


def test_allow_slow_writes_it_and_records_the_measured_speed(repo: Path, split: tuple[Path, Path]) -> None:
    code, out = quantize("digits", "-r", str(repo), "--calibration", str(split[0]), "--eval", str(split[1]),
                         "--max-drop", "0.05", "--min-speedup", "1000", "--allow-slow", "--serving-batch", "4")
    assert code == 0, out
    speed = load_entry(repo / "digits_int8" / "1").manifest.provenance.notes["speed"]
    assert speed["ratio"]["serving_batch"] == 4
    assert 0 < speed["ratio"]["int8_vs_fp32_b4"] < 1000
    assert speed["fp32"]["b4_ms"] > 0 and speed["int8"]["b4_ms"] > 0


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "holds no images"),
    (lambda d: (d / "notes.txt").write_text("x"), "notes.txt"),
    (lambda d: (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really"), "broken.png"),
])
def test_bad_calibration_folders_fail_clearly(repo: Path, tmp_path: Path, make, message: str) -> None:
    d = tmp_path / "cal"
    d.mkdir()
    make(d)
    code, out = quantize("digits", "-r", str(repo), "--calibration", str(d), "--no-guard")
    assert code != 0
    assert message in out
    assert versions(repo, "digits_int8") == []


def test_unknown_model_target_and_method_fail_clearly(repo: Path, split: tuple[Path, Path]) -> None:
    for extra, message in ((["nope"], "not found"), (["digits", "--target", "gpu"], "unknown target"),
                           (["digits", "--method", "magic"], "unknown calibration method")):
        code, out = quantize(*extra, "-r", str(repo), "--calibration", str(split[0]))
        assert code != 0 and message in out, out


def test_an_onnx_file_is_accepted(tmp_path: Path, split: tuple[Path, Path]) -> None:
    src = DIGITS_REPO / "digits" / "1" / "model.onnx"
    code, out = quantize(str(src), "-r", str(tmp_path / "r"), "--calibration", str(split[0]), "--no-guard",
                         "--name", "from_file")
    assert code == 0, out
    m = load_entry(tmp_path / "r" / "from_file" / "1").manifest
    assert m.input.shape == [-1, 3, 32, 32]


def test_natural_sets_are_disjoint_by_photo() -> None:
    from visionserve.quantize.data import open_set
    from visionserve.quantize.natural import CALIBRATION_PHOTOS, HELD_OUT_PHOTOS, SELECTION_PHOTOS, photo, random_crops

    sets = [set(CALIBRATION_PHOTOS), set(SELECTION_PHOTOS), set(HELD_OUT_PHOTOS)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    # and by pixels, not only by name: no photo of one set is the same picture as one of another
    thumbs = {n: np.asarray(photo(n).resize((16, 16)), np.float32) for s in sets for n in s}
    for a in sets[2]:
        for b in sets[0] | sets[1]:
            assert np.abs(thumbs[a] - thumbs[b]).mean() > 5, (a, b)
    held = open_set("natural", role="held-out", count=70)
    assert held.groups is not None and len(set(held.groups)) == len(HELD_OUT_PHOTOS)
    img = Image.fromarray(np.zeros((100, 120, 3), np.uint8))
    crops = random_crops(img, 20, np.random.default_rng(0))
    assert len(crops) == 20 and len({c.size for c in crops}) > 5


def test_cli_module_imports_no_torch_or_onnxruntime() -> None:
    code = ("import sys, quantize.cli; bad = [m for m in ('torch', 'onnxruntime') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fidelity_drop_definitions() -> None:
    from visionserve.quantize.guard import fidelity

    ref = np.zeros((40, 3), np.float32)
    ref[:, 0] = 10  # all confident, class 0
    got = ref.copy()
    got[:4, 1] = 20  # 4 of 40 change their answer
    f = fidelity(ref, got)
    assert f.top1_agreement == pytest.approx(0.9) and f.drop == pytest.approx(0.1)
    f = fidelity(ref, got, targets=np.zeros(40, int))
    assert f.fp32_top1 == 1.0 and f.int8_top1 == pytest.approx(0.9) and f.drop == pytest.approx(0.1)
    print(json.dumps(f.as_dict()))


@pytest.mark.slow
def test_default_mobilenet_int8_meets_the_guard_and_is_idempotent(mobilenet_repo: Path, tmp_path: Path) -> None:
    """The one MobileNetV2 test: ``make models``' int8 entry (≈ 1 min on 2 cores)."""
    from visionserve.quantize.default import NAME, build_default_int8

    repo = tmp_path / "repo"
    shutil.copytree(mobilenet_repo / "mobilenet_v2", repo / "mobilenet_v2")
    build_default_int8(repo)
    m = load_entry(repo / NAME / "1", verify_checksum=True).manifest
    guard = m.provenance.notes["guard"]
    assert guard["passed"] and m.provenance.derived_from == "mobilenet_v2:1"
    assert guard["fidelity"]["top1_agreement_confident"] >= 0.97
    assert guard["fidelity"]["confident_images"] >= 100
    # the reported figure is the held-out one: other photos than calibration's and the guard's
    notes = m.provenance.notes
    held = notes["held_out"]
    assert "held-out photos" in held["source"] and held["groups"] == 7
    assert held["fidelity"]["confident_images"] >= 200
    assert held["fidelity"]["top1_agreement_confident"] >= 0.97
    assert held["top1_agreement_confident_ci95"][0] >= 0.9
    assert notes["size"]["ratio"] <= 0.30  # int8 weights, no float copies left behind
    assert notes["speed"]["ratio"]["serving_batch"] == 8
    build_default_int8(repo)  # a valid entry is kept, not rebuilt
    assert versions(repo, NAME) == ["1"]


def test_synthetic_calibration_needs_no_images(repo: Path, split: tuple[Path, Path]) -> None:
    """Inputs distilled from the digits CNN's BatchNorm statistics calibrate it; no calibration image is read."""
    code, out = quantize("digits", "-r", str(repo), "--calibration", "synthetic", "--weights",
                         str(DIGITS / "digits_cnn.pt"), "--eval", str(split[1]), "--max-drop", "0.02")
    assert code == 0, out
    notes = load_entry(repo / "digits_int8" / "1").manifest.provenance.notes
    assert notes["calibration"]["source"].startswith("synthetic") and notes["calibration"]["images"] == 32
    held = notes["held_out"]["fidelity"]
    assert held["drop_kind"] == "top-1 accuracy drop" and held["drop"] <= 0.02


def test_synthetic_calibration_refuses_missing_or_foreign_weights(repo: Path, split: tuple[Path, Path]) -> None:
    code, out = quantize("digits", "-r", str(repo), "--calibration", "synthetic", "--eval", str(split[1]))
    assert code != 0 and "--weights" in out
    code, out = quantize("digits", "-r", str(repo), "--calibration", "synthetic", "--eval", str(split[1]),
                         "--weights", str(ROOT / "convert" / "shapes" / "shapes_detector.pt"))
    assert code != 0 and "not the weights" in out
    assert versions(repo, "digits_int8") == []
