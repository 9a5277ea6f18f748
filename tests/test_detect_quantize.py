"""visionserve quantize on a detector: letterbox calibration, mAP@0.5 guard, refusal when it cannot hold."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from convert.detect_default import build_default_detector
from service.cli import app
from service.repository import load_entry, versions

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "tests" / "data" / "shapes"
runner = CliRunner()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("detect_quantize") / "repo"
    build_default_detector(path)
    return path


def _quantize(repo: Path, *extra: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [
        "quantize", "shapes_detector", "-r", str(repo), "--calibration", str(SHAPES / "images"),
        "--eval", str(SHAPES / "annotations.json"), "--eval-images", str(SHAPES / "images"), *extra,
    ])


def test_int8_detector_meets_the_map_guard(repo: Path) -> None:
    res = _quantize(repo, "--max-drop", "0.01")
    assert res.exit_code == 0, res.output
    entry = load_entry(repo / "shapes_detector_int8" / "1")
    m = entry.manifest
    assert m.task == "detect" and m.preprocess.resize_policy == "letterbox"  # the source's manifest
    notes = m.provenance.notes
    det, guard = notes["detection"], notes["guard"]
    assert guard["passed"] and guard["max_drop"] == 0.01
    assert det["mAP@0.5_drop"] <= 0.01
    assert det["int8"]["mAP@0.5"] >= 0.9 and det["fp32"]["mAP@0.5"] >= 0.9
    q = notes["quantization"]
    assert q["activation_type"] == "uint8"
    # the box-regression tail and the first (3-channel) convolution stay in float
    assert any("exp" in n.lower() for n in q["nodes_to_exclude"])
    assert len(q["nodes_to_exclude"]) >= 2
    assert notes["speed"]["int8"]["b8_ms"] > 0 and notes["speed"]["fp32"]["b8_ms"] > 0
    assert "mAP@0.5" in res.output


def test_impossible_budget_is_refused(repo: Path) -> None:
    res = _quantize(repo, "--max-drop", "-1", "--name", "shapes_impossible")
    assert res.exit_code == 2, res.output
    assert "cannot meet --max-drop" in res.output
    assert versions(repo, "shapes_impossible") == []


def test_detector_guard_needs_coco_json(repo: Path) -> None:
    res = runner.invoke(app, ["quantize", "shapes_detector", "-r", str(repo), "--calibration",
                              str(SHAPES / "images"), "--eval", str(SHAPES / "images")])
    assert res.exit_code == 2 and "COCO" in res.output


def test_torchvision_format_is_left_unquantized(repo: Path, tmp_path: Path) -> None:
    import json
    import shutil

    tv = tmp_path / "repo"
    shutil.copytree(repo / "shapes_detector", tv / "tv_detector")
    man = tv / "tv_detector" / "1" / "manifest.json"
    d = json.loads(man.read_text())
    d.update(name="tv_detector", max_batch_size=1)
    d["postprocess"].update(format="torchvision", nms="in_graph")  # the graph itself is not run
    man.write_text(json.dumps(d))
    res = runner.invoke(app, ["quantize", "tv_detector", "-r", str(tv), "--calibration", str(SHAPES / "images"),
                              "--eval", str(SHAPES / "annotations.json")])
    assert res.exit_code == 2 and "torchvision-format" in res.output, res.output
    assert versions(tv, "tv_detector_int8") == []
