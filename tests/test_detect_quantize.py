"""visionserve quantize on a detector: letterbox calibration, mAP@0.5 guard, refusal when it cannot hold."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from visionserve.convert.detect_default import build_default_detector
from visionserve.service.cli import app
from visionserve.service.repository import load_entry, versions

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "tests" / "data" / "shapes"
runner = CliRunner()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("detect_quantize") / "repo"
    build_default_detector(path)
    return path


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 images of the *val* split: calibration never sees the images the guard evaluates on (test split)."""
    from visionserve.convert.shapes.data import split, write_coco

    out = tmp_path_factory.mktemp("shapes_val")
    write_coco(split("val", 16), out / "images", out / "annotations.json")
    return out / "images"


def _quantize(repo: Path, calibration: Path, *extra: str):  # type: ignore[no-untyped-def]
    # the speed guard is tested in test_quantize.py; here a loaded machine must not fail an accuracy test
    return runner.invoke(app, [
        "quantize", "shapes_detector", "-r", str(repo), "--calibration", str(calibration),
        "--eval", str(SHAPES / "annotations.json"), "--eval-images", str(SHAPES / "images"), "--allow-slow",
        *extra,
    ])


def test_int8_detector_meets_the_map_guard(repo: Path, calibration: Path) -> None:
    res = _quantize(repo, calibration, "--max-drop", "0.01")
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


def test_impossible_budget_is_refused(repo: Path, calibration: Path) -> None:
    res = _quantize(repo, calibration, "--max-drop", "-1", "--name", "shapes_impossible")
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


def _head_model(layout: str):  # type: ignore[no-untyped-def]
    """A tiny conv detector as ONNX: stem (3-channel conv) → body conv → box and class 1x1 convs.

    ``visionserve``: two outputs, ``boxes`` (Exp of the box conv) and ``scores`` (Sigmoid of the class conv).
    ``yolo``: one output ``output0`` [N, 4 + C, A], boxes and class scores concatenated (v8 head layout).
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name: str, *shape: int):  # type: ignore[no-untyped-def]
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("Conv", ["input", "w_stem"], ["stem"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["stem"], ["stem_r"], name="stem_relu"),
        helper.make_node("Conv", ["stem_r", "w_body"], ["body"], name="body", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["body"], ["body_r"], name="body_relu"),
        helper.make_node("Conv", ["body_r", "w_box"], ["box"], name="box_conv"),
        helper.make_node("Conv", ["body_r", "w_cls"], ["cls"], name="cls_conv"),
        helper.make_node("Sigmoid", ["cls"], ["cls_s"], name="cls_sigmoid"),
    ]
    inits = [w("w_stem", 8, 3, 3, 3), w("w_body", 8, 8, 3, 3), w("w_box", 4, 8, 1, 1), w("w_cls", 3, 8, 1, 1),
             numpy_helper.from_array(np.array([0, 4, -1], np.int64), "box_shape"),
             numpy_helper.from_array(np.array([0, 3, -1], np.int64), "cls_shape")]
    if layout == "yolo":
        nodes += [
            helper.make_node("Reshape", ["box", "box_shape"], ["box_flat"], name="box_reshape"),
            helper.make_node("Reshape", ["cls_s", "cls_shape"], ["cls_flat"], name="cls_reshape"),
            helper.make_node("Concat", ["box_flat", "cls_flat"], ["output0"], name="concat", axis=1),
        ]
        outputs = [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["n", 7, 64])]
    else:
        nodes += [
            helper.make_node("Exp", ["box"], ["box_e"], name="box_exp"),
            helper.make_node("Reshape", ["box_e", "box_shape"], ["boxes"], name="box_reshape"),
            helper.make_node("Reshape", ["cls_s", "cls_shape"], ["scores"], name="cls_reshape"),
        ]
        outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["n", 4, 64]),
                   helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 3, 64])]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                            ["n", 3, 16, 16])],
                              outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("layout", ["visionserve", "yolo"])
def test_float_nodes_keep_the_box_path_per_layout(layout: str, tmp_path: Path) -> None:
    """The box path stays float in both layouts; only where boxes and scores share an output (YOLO) does the
    class convolution stay float too. The 3-channel stem stays float, the body is quantised; and the
    quantised model runs with exactly those nodes in float."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from visionserve.quantize.detect import float_nodes

    model = _head_model(layout)
    onnx.checker.check_model(model)
    keep = set(float_nodes(model, "output0" if layout == "yolo" else "boxes"))
    assert {"stem", "box_conv", "box_reshape"} <= keep
    assert "body" not in keep and "body_relu" not in keep
    assert ("cls_conv" in keep) == (layout == "yolo")
    assert ("box_exp" in keep) == (layout == "visionserve")

    src, dst = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(model, str(src))
    rng = np.random.default_rng(1)
    data = iter([{"input": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)])

    class Reader(CalibrationDataReader):
        def get_next(self):  # type: ignore[no-untyped-def]
            return next(data, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=sorted(keep))
    q = onnx.load(str(dst))
    dq_fed = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    quantised_convs = {n.name for n in q.graph.node if n.op_type == "Conv" and n.input[1] in dq_fed}
    assert quantised_convs == {"body"} | ({"cls_conv"} if layout == "visionserve" else set())
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert [r.shape for r in ref] == [g.shape for g in got]


def test_default_int8_detector_follows_the_latest_source(repo: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``make models`` builds shapes_detector_int8 once, keeps it while it derives from the latest
    shapes_detector, and builds a new version when the source gets a new one (new weights)."""
    import shutil

    from visionserve.quantize import default

    monkeypatch.setattr(default, "DETECTOR_CALIBRATION", 8)
    monkeypatch.setattr(default, "DETECTOR_GUARD", 20)
    own = tmp_path / "repo"
    shutil.copytree(repo / "shapes_detector", own / "shapes_detector")
    default.build_default_detector_int8(own)
    first = load_entry(own / "shapes_detector_int8" / "1")
    assert first.manifest.provenance.derived_from == "shapes_detector:1"
    assert first.manifest.provenance.notes["guard"]["passed"]
    default.build_default_detector_int8(own)
    assert versions(own, "shapes_detector_int8") == ["1"]  # up to date: kept

    shutil.copytree(own / "shapes_detector" / "1", own / "shapes_detector" / "2")
    man = own / "shapes_detector" / "2" / "manifest.json"
    man.write_text(man.read_text().replace('"version": "1"', '"version": "2"'))
    default.build_default_detector_int8(own)
    assert versions(own, "shapes_detector_int8") == ["1", "2"]
    assert load_entry(own / "shapes_detector_int8" / "2").manifest.provenance.derived_from == "shapes_detector:2"
