"""quantize on an embedding model: the committed digits one-shot model, guarded on cosine and on one-shot.

ONNX Runtime's MinMax (``--method minmax``) keeps these runs to seconds (NNCF, the default on VNNI, imports
torch); the guard is the same whichever method made the graph.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from visionserve.service.cli import app
from visionserve.service.repository import load_entry

ROOT = Path(__file__).resolve().parent.parent
REPO = ROOT / "tests" / "data" / "digits_oneshot_repo"
UNSEEN = ROOT / "tests" / "data" / "digits_oneshot" / "unseen"  # digits 5-9, never trained on
runner = CliRunner()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(REPO, dst)
    return dst


def quantize(repo: Path, *extra: str) -> tuple[int, str]:
    # no --eval: the unseen folder (an ImageFolder of 5 classes) is split into calibration, selection and
    # held-out images; the tiny model's speed-up is noise on a busy machine (the speed guard has its own tests)
    r = runner.invoke(app, ["quantize", "digits_oneshot", "-r", str(repo), "--calibration", str(UNSEEN),
                            "--limit", "160", "--method", "minmax", "--episodes", "200", "--allow-slow",
                            "--threads", "1", *extra])
    return r.exit_code, r.output


def embed(path: Path, x: np.ndarray) -> np.ndarray:
    from visionserve.convert.ort_cpu import cpu_session

    s = cpu_session(path, 1)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_embed_int8_reports_cosine_and_one_shot_and_stays_a_unit_embedding(repo: Path) -> None:
    code, out = quantize(repo)
    assert code == 0, out
    entry = load_entry(repo / "digits_oneshot_int8" / "1")
    m = entry.manifest
    assert m.task == "embed" and m.postprocess.normalized  # type: ignore[union-attr]
    notes = m.provenance.notes
    guard, held = notes["guard"], notes["held_out"]
    assert guard["metric"] == "cosine" and guard["min_cosine"] == pytest.approx(0.97)  # type: ignore[index]
    assert guard["passed"] is True  # type: ignore[index]
    f = held["fidelity"]  # type: ignore[index]
    assert 0.97 <= f["cosine_mean"] <= 1.0 and f["cosine_min"] <= f["cosine_p5"] <= f["cosine_mean"]
    lo, hi = held["cosine_mean_ci95"]  # type: ignore[index]
    assert lo <= f["cosine_mean"] <= hi and hi - lo < 0.05
    plo, phi = held["cosine_p5_ci95"]  # type: ignore[index]
    assert plo <= phi
    # one-shot over the held-out classes (5 digits), the same episodes for both models
    assert f["ways"] == 5 and f["episodes"] == 200
    assert 0.4 < f["fp32_oneshot"] <= 1.0 and 0.4 < f["int8_oneshot"] <= 1.0
    assert f["oneshot_drop"] == pytest.approx(f["fp32_oneshot"] - f["int8_oneshot"], abs=1e-5)
    assert f["oneshot_drop"] <= 0.02
    assert "held out" in out and "1-shot" in out
    assert notes["speed"]["ratio"]["serving_batch"] == 8  # type: ignore[index]

    # the reported cosine is what the files give: recompute on some unseen images, outside the tool
    from visionserve.quantize.data import load_tensors, scan_folder
    from visionserve.service.imaging import Preprocessor

    images = scan_folder(UNSEEN)
    images.items = images.items[::30]
    x = load_tensors(images, Preprocessor(m.input, m.preprocess, draft=False))
    ref, got = embed(REPO / "digits_oneshot" / "1" / "model.onnx", x), embed(entry.model_path, x)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)  # normalisation stays in the int8 graph
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert abs(float(cos.mean()) - f["cosine_mean"]) < 0.01 and cos.min() > 0.9


@pytest.mark.parametrize("flags, message", [
    # the selection guard cannot reach it and may keep nothing in float: the fallback fails at once
    (["--min-cosine", "0.99999", "--max-excluded", "0"], "cannot meet"),
    # a one-shot budget no model can meet (int8 would have to beat fp32 by 100 points)
    (["--max-oneshot-drop", "-1"], "1-shot accuracy fell"),
])
def test_a_failing_embed_guard_refuses_and_writes_nothing(repo: Path, flags: list[str], message: str) -> None:
    code, out = quantize(repo, *flags)
    assert code == 2, out
    assert message in out
    assert not (repo / "digits_oneshot_int8").exists()


def test_the_held_out_figures_gate_too() -> None:
    # the selection set decides what stays in float; the held-out set can still refuse the result
    from visionserve.quantize.guard_embed import EmbedFidelity, gate
    from visionserve.quantize.int8 import QuantizeError

    good_sel = EmbedFidelity(100, 0.995, 0.99, 0.98, 0.8, 0.8, 5, 100)

    def held(cos: float, fp32: float, int8: float) -> EmbedFidelity:
        return EmbedFidelity(100, cos, cos - 0.01, cos - 0.02, fp32, int8, 5, 100)

    gate(held(0.99, 0.80, 0.79), good_sel, 0.02, 0.02)  # inside both budgets
    with pytest.raises(QuantizeError, match=r"held-out.*under --min-cosine 0.98"):
        gate(held(0.97, 0.80, 0.80), good_sel, 0.02, 0.02)
    with pytest.raises(QuantizeError, match=r"held-out.*fell 5.00 pt"):
        gate(held(0.99, 0.80, 0.75), good_sel, 0.02, 0.02)
    with pytest.raises(QuantizeError, match=r"selection.*fell"):  # no held-out set: the selection set gates
        gate(None, EmbedFidelity(100, 0.995, 0.99, 0.98, 0.8, 0.7, 5, 100), 0.02, 0.02)
    gate(held(0.5, 0.9, 0.1), good_sel, None, None)  # --no-guard: nothing to check


def test_bad_embed_guard_options_fail_clearly(repo: Path) -> None:
    for flags, message in ((["--min-cosine", "1.5"], "--min-cosine"), (["--ways", "1"], "--ways")):
        code, out = quantize(repo, *flags)
        assert code == 2 and message in out, out


def test_embed_fidelity_and_intervals() -> None:
    from visionserve.quantize.evaluate_embed import Episodes
    from visionserve.quantize.guard_embed import bootstrap_percentile_ci, cosines, embed_fidelity, embed_held_out

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    classes = np.repeat(np.arange(4), 10)
    ref = centres[classes] + 0.3 * rng.normal(size=(40, 16))
    assert np.allclose(cosines(ref, 3 * ref), 1.0)  # scale does not matter, direction does
    noisy = ref + 2.0 * rng.normal(size=ref.shape)
    f_same = embed_fidelity(ref, ref, classes, Episodes(episodes=50))
    f_noisy = embed_fidelity(ref, noisy, classes, Episodes(episodes=50))
    assert f_same.cosine_mean == pytest.approx(1.0) and f_same.oneshot_drop == 0.0 and f_same.drop < 1e-12
    assert f_noisy.cosine_mean < 0.9 and f_noisy.drop == pytest.approx(1 - f_noisy.cosine_mean)
    assert f_noisy.int8_oneshot < f_noisy.fp32_oneshot  # noise that breaks the directions breaks one-shot
    assert embed_fidelity(ref, noisy).oneshot_drop is None  # no classes, no one-shot
    h = embed_held_out(ref, noisy, classes, list(classes), "test", Episodes(episodes=50))
    lo, hi = h.cosine_mean_ci
    assert lo < f_noisy.cosine_mean < hi and h.groups == 4
    # resampling 4 groups whole gives a wider interval than resampling 40 images one by one
    c = cosines(ref, noisy)
    g_lo, g_hi = bootstrap_percentile_ci(c, 50, classes)
    i_lo, i_hi = bootstrap_percentile_ci(c, 50)
    assert g_lo <= g_hi and i_lo <= i_hi
    assert json.dumps(h.as_dict())  # the manifest can hold it
