"""The held-out report's interval, and the slimming pass over QDQ graphs (small, built in milliseconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from visionserve.quantize.heldout import bootstrap_ci, held_out
from visionserve.quantize.slim import slim


def test_bootstrap_resamples_whole_photos_when_crops_are_grouped() -> None:
    # 10 photos × 30 crops; a photo's crops all agree or all disagree (crops of one photo are not independent)
    groups = np.repeat(np.arange(10), 30)
    values = np.repeat([1, 1, 1, 1, 1, 1, 1, 0, 0, 0], 30).astype(float)
    lo_i, hi_i = bootstrap_ci(values)
    lo_g, hi_g = bootstrap_ci(values, groups)
    assert lo_i <= 0.7 <= hi_i and lo_g <= 0.7 <= hi_g
    # by image the interval pretends to know far more than ten photos can tell
    assert (hi_g - lo_g) > 2.5 * (hi_i - lo_i)
    # all agree: no replicate can differ, yet 50 images do not prove 100 % (Wilson: ≥ 92.9 %)
    lo, hi = bootstrap_ci(np.ones(50), np.arange(50))
    assert hi == 1.0 and lo == pytest.approx(0.9287, abs=1e-3)


def test_held_out_interval_brackets_the_figure_and_uses_labels_when_known() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 5)).astype(np.float32)
    ref[np.arange(200), rng.integers(0, 5, 200)] += 6  # confident
    got = ref.copy()
    got[::20] = got[::20, ::-1]  # 10 answers change, one in each photo
    h = held_out(ref, got, None, list(np.arange(200) // 20), "test")
    assert h.fidelity.confident_images == 200 and h.groups == 10
    lo, hi = h.agreement_confident_ci
    assert lo <= h.fidelity.top1_agreement_confident <= hi < 1.0
    assert h.drop_ci == pytest.approx((1 - hi, 1 - lo))
    targets = ref.argmax(1)
    h = held_out(ref, got, targets, None, "test")
    assert h.fidelity.drop == pytest.approx(h.fidelity.fp32_top1 - h.fidelity.int8_top1)
    assert h.drop_ci[0] <= h.fidelity.drop <= h.drop_ci[1]
    assert "accuracy fp32" in h.summary()


def _qdq_model(path: Path) -> None:
    """x → Q/DQ (int8 activation, zero point -3) → Conv(W: a float weight quantized at run time, float bias) → y."""
    w = np.random.default_rng(1).normal(size=(4, 3, 3, 3)).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.float32(0.02), "xs"), numpy_helper.from_array(np.int8(-3), "xz"),
        numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
        numpy_helper.from_array(np.float32(0.02), "xs_copy"),  # a duplicate scale
        numpy_helper.from_array(np.ones(1000, np.float32), "unused"),
        numpy_helper.from_array(np.asarray([0.5, -0.25, 0.0, 1.0], np.float32), "b"),
        numpy_helper.from_array(np.float32(0.05), "ys"), numpy_helper.from_array(np.uint8(128), "yz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs_copy", "xz"], ["xd"]),
        helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=0),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_slim_gives_the_same_answers_from_a_smaller_fusable_graph(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.onnx", tmp_path / "b.onnx"
    _qdq_model(src)
    report = slim(src, dst)
    x = np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)

    def run(p: Path) -> np.ndarray:
        return ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    # the same values, up to the int32 bias's rounding (half of input scale × weight scale = 1e-4), which
    # can at most move an output across one step of its own scale
    assert np.abs(run(src) - run(dst)).max() <= 0.05 + 1e-6
    m = onnx.load(str(dst))
    inits = {t.name: t for t in m.graph.initializer}
    assert report.activations_to_uint8 == 1 and report.weights_folded == 1 and report.biases_to_int32 == 1
    assert inits["b_int32"].data_type == TensorProto.INT32 and "b" not in inits
    # and ONNX Runtime now fuses it into one integer convolution
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
    assert "QLinearConv" in {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}
    assert "w" not in inits and "unused" not in inits  # the float weight and the dead tensor are gone
    assert inits["wq"].data_type == TensorProto.INT8
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear")
    assert inits[q.input[2]].data_type == TensorProto.UINT8
    assert numpy_helper.to_array(inits[q.input[2]]) == 125  # -3 + 128
    assert report.bytes_after < report.bytes_before and dst.stat().st_size == report.bytes_after
    assert sum(n.op_type == "QuantizeLinear" for n in m.graph.node) == 2  # the weight's is folded away


def _coco_eval(dets_jitter: float, seed: int):
    """COCOeval over 30 synthetic images, 2 classes, with detections jittered around the truth."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, 31):
        images.append({"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"})
        for _ in range(int(rng.integers(1, 4))):
            x, y, w, h = (float(v) for v in rng.uniform([0, 0, 20, 20], [150, 150, 50, 50]))
            c = int(rng.integers(1, 3))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
            if rng.random() < 0.9:
                dx, dy = rng.normal(0, dets_jitter, 2)
                dets.append({"image_id": i, "category_id": c, "bbox": [x + dx, y + dy, w, h],
                             "score": float(rng.uniform(0.3, 1))})
        dets.append({"image_id": i, "category_id": int(rng.integers(1, 3)), "bbox": [5.0, 5.0, 30.0, 30.0],
                     "score": float(rng.uniform(0, 0.8))})  # a false positive now and then
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"},
                                                                          {"id": 2, "name": "b"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_map_bootstrap_reproduces_pycocotools_and_brackets_the_drop() -> None:
    from visionserve.quantize.map_bootstrap import drop_ci, map50, per_image

    ref, got = _coco_eval(1.0, 0), _coco_eval(6.0, 0)  # same truth; the second's boxes are looser
    everything = np.arange(30)
    # the re-accumulation over all images is COCO's own mAP@0.5
    assert map50(per_image(ref), everything) == pytest.approx(ref.stats[1], abs=1e-9)
    assert map50(per_image(got), everything) == pytest.approx(got.stats[1], abs=1e-9)
    drop = ref.stats[1] - got.stats[1]
    lo, hi = drop_ci(ref, got, reps=200)
    assert lo <= drop <= hi and hi > lo
    assert drop_ci(ref, ref, reps=50) == (0.0, 0.0)  # identical models: no drop in any replicate
