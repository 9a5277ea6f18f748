"""service/detection.py: NMS, box mapping through letterbox/stretch geometry, EXIF, formats, annotate.

numpy, Pillow and onnx/onnxruntime only: no torch, no trained model.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from visionserve.service.detection import annotate, box_iou, decode, nms, postprocess
from visionserve.service.imaging import Geometry, Preprocessor
from visionserve.service.manifest import DetectPostprocess, InputSpec, Manifest, Preprocess, Provenance, TensorSpec

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RAW = dict(scale=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # tensor values = pixel values


def manifest(post: DetectPostprocess, labels: list[str], size: int = 64, outputs: list[TensorSpec] | None = None,
             policy: str = "letterbox") -> Manifest:
    return Manifest(
        name="m", version="1", task="detect", input=InputSpec(name="input", shape=[-1, 3, size, size]),
        outputs=outputs or [TensorSpec(name=n, shape=[-1]) for n in post.outputs],
        preprocess=Preprocess(resize_policy=policy, **RAW), postprocess=post, labels=labels,  # type: ignore[arg-type]
        provenance=Provenance(source="test", onnx_sha256="0"),
    )


def identity(w: int = 64, h: int = 64) -> Geometry:
    return Geometry(w, h, 1.0, 1.0, 0.0, 0.0)


# -- NMS -----------------------------------------------------------------------------------------------
def reference_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, thr: float) -> list[int]:
    """Textbook greedy NMS, one pair at a time."""
    def iou(a: np.ndarray, b: np.ndarray) -> float:
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    keep: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if all(classes[k] != classes[i] or iou(boxes[k], boxes[i]) <= thr for k in keep):
            keep.append(i)
    return keep


@st.composite
def box_sets(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = draw(st.integers(0, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(1, 40, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / max(n, 1) + 0.01  # distinct: a unique greedy order
    classes = rng.integers(0, draw(st.integers(1, 3)), n)
    return boxes, scores, classes


@FAST
@given(box_sets(), st.floats(0.1, 0.9))
def test_nms_matches_textbook_greedy(data: tuple[np.ndarray, np.ndarray, np.ndarray], thr: float) -> None:
    boxes, scores, classes = data
    assert list(nms(boxes, scores, classes, thr)) == reference_nms(boxes, scores, classes, thr)


def test_nms_is_class_aware_and_capped() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    classes = np.array([0, 0, 1, 0])
    assert list(nms(boxes, scores, classes, 0.5)) == [0, 2, 3]  # the same-class twin goes, the other class stays
    assert list(nms(boxes, scores, classes, 0.5, max_detections=2)) == [0, 2]
    assert len(nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, int), 0.5)) == 0


def test_box_iou() -> None:
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [3, 3, 3, 3]], np.float32)
    np.testing.assert_allclose(box_iou(a, b)[0], [1.0, 1 / 3, 0.0, 0.0], rtol=1e-6)


# -- geometry ------------------------------------------------------------------------------------------
@FAST
@given(w=st.integers(20, 700), h=st.integers(20, 700), policy=st.sampled_from(["letterbox", "stretch"]),
       tw=st.sampled_from([64, 96]), th=st.sampled_from([64, 80]), seed=st.integers(0, 10**6))
def test_box_found_in_the_tensor_maps_back_to_the_drawn_box(w: int, h: int, policy: str, tw: int, th: int,
                                                            seed: int) -> None:
    """Draw a white box on a black image of any size, find it in the preprocessed tensor, map it back."""
    rng = np.random.default_rng(seed)
    bw, bh = rng.uniform(0.3, 0.8) * w, rng.uniform(0.3, 0.8) * h
    x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    img = Image.new("RGB", (w, h))
    ImageDraw.Draw(img).rectangle((round(x1), round(y1), round(x1 + bw) - 1, round(y1 + bh) - 1), fill="white")
    prep = Preprocessor(InputSpec(name="input", shape=[-1, 3, th, tw]),
                        Preprocess(resize_policy=policy, pad_value=0, **RAW))  # type: ignore[arg-type]
    tensor, geo = prep.from_image(img)
    assert (geo.width, geo.height) == (w, h)
    # a box under two tensor pixels wide can blur below the threshold and vanish: that is resampling, not mapping
    assume(bw * geo.scale_x >= 2 and bh * geo.scale_y >= 2)
    ys, xs = np.nonzero(tensor[0] > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)  # pixel extent
    back = geo.to_original(found)[0]
    drawn = np.array([round(x1), round(y1), round(x1 + bw), round(y1 + bh)])
    # one tensor pixel of resampling blur, in original pixels
    tol = np.array([1 / geo.scale_x, 1 / geo.scale_y] * 2) + 1.0
    assert np.all(np.abs(back - drawn) <= tol), (back, drawn, geo)


@FAST
@given(w=st.integers(1, 4000), h=st.integers(1, 4000), policy=st.sampled_from(["letterbox", "stretch"]),
       box=st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_geometry_round_trip(w: int, h: int, policy: str, box: list[float]) -> None:
    """original → tensor (as the preprocessor scales and pads) → original is the identity, inside the image."""
    prep = Preprocessor(InputSpec(name="input", shape=[-1, 3, 64, 96]),
                        Preprocess(resize_policy=policy))  # type: ignore[arg-type]
    geo = prep._geometry_and_pixels(Image.new("RGB", (w, h)), w, h)[1]
    xs, ys = sorted(box[0::2]), sorted(box[1::2])
    orig = np.array([[xs[0] * w, ys[0] * h, xs[1] * w, ys[1] * h]], np.float32)
    tensor = orig.copy()
    tensor[:, 0::2] = orig[:, 0::2] * geo.scale_x + geo.offset_x
    tensor[:, 1::2] = orig[:, 1::2] * geo.scale_y + geo.offset_y
    assert np.all(tensor[:, 0::2] <= 96 + 1e-3) and np.all(tensor[:, 1::2] <= 64 + 1e-3)
    np.testing.assert_allclose(geo.to_original(tensor), orig, atol=1e-3 * max(w, h))


def test_exif_rotated_image_boxes_in_oriented_pixels() -> None:
    """A phone photo: pixels stored landscape, EXIF says rotate 90° → detections in the upright frame."""
    upright = Image.new("RGB", (120, 200), (0, 0, 0))
    ImageDraw.Draw(upright).rectangle((20, 140, 59, 179), fill="white")  # box [20, 140, 60, 180] upright
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote (200 x 120)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()

    post = DetectPostprocess(format="visionserve", outputs=["boxes", "scores"])
    m = manifest(post, ["thing"], size=100)
    tensor, geo = Preprocessor(m.input, m.preprocess)(data)
    assert (geo.width, geo.height) == (120, 200)
    ys, xs = np.nonzero(tensor[0] > 127)
    boxes = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    dets = decode(m, {"boxes": boxes, "scores": np.array([[0.9]], np.float32)}, geo, 0.25, 0.45, 10)
    assert len(dets) == 1
    np.testing.assert_allclose(dets[0]["box"], [20, 140, 60, 180], atol=2.5)

    png = Image.open(io.BytesIO(annotate(data, dets)))
    assert png.format == "PNG" and png.size == (120, 200)  # drawn on the upright image


# -- formats -------------------------------------------------------------------------------------------
def test_visionserve_decode_clips_filters_and_maps() -> None:
    post = DetectPostprocess(format="visionserve", outputs=["boxes", "scores"])
    m = manifest(post, ["a", "b"])
    boxes = np.array([[10, 10, 30, 30], [11, 10, 31, 30], [-20, 5, 20, 40], [40, 40, 40, 50], [0, 0, 5, 5]],
                     np.float32)
    scores = np.array([[0.9, 0.1], [0.8, 0.3], [0.1, 0.7], [0.9, 0.0], [np.nan, 0.2]], np.float32)
    geo = Geometry(128, 64, 0.5, 0.5, 0.0, 16.0)  # a 128x64 image letterboxed into 64x64
    dets = decode(m, {"boxes": boxes, "scores": scores}, geo, 0.25, 0.45, 100)
    # box 1 suppressed by box 0 (same class); box 3 has no width; NaN score ignored; box 2 clipped at 0
    assert [(d["label"], d["score"]) for d in dets] == [("a", 0.9), ("b", 0.7), ("b", 0.3)]
    assert dets[0]["box"] == [20.0, 0.0, 60.0, 28.0]  # y1 = (10-16)/0.5 = -12, clipped to 0
    assert dets[1]["box"] == [0.0, 0.0, 40.0, 48.0]
    assert decode(m, {"boxes": boxes, "scores": scores}, geo, 0.85, 0.45, 100)[0]["score"] == 0.9
    assert len(decode(m, {"boxes": boxes, "scores": scores}, geo, 0.25, 0.45, 1)) == 1
    assert len(decode(m, {"boxes": boxes, "scores": scores}, geo, 0.25, 0.99, 100)) == 4  # loose NMS keeps both


def test_postprocess_without_manifest_equals_decode() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 14, (200, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, (200, 3)).astype(np.float32)
    m = manifest(DetectPostprocess(format="visionserve", outputs=["boxes", "scores"]), ["a", "b", "c"])
    assert postprocess(boxes, scores, identity(), labels=["a", "b", "c"]) == decode(
        m, {"boxes": boxes, "scores": scores}, identity(), 0.25, 0.45, 100)


def test_torchvision_format_is_used_as_it_came() -> None:
    post = DetectPostprocess(format="torchvision", outputs=["boxes", "labels", "scores"], nms="in_graph")
    m = manifest(post, ["__background__", "person", "bicycle"])
    out = {"boxes": np.array([[1, 2, 30, 40], [5, 5, 9, 9]], np.float32), "labels": np.array([2, 1]),
           "scores": np.array([0.8, 0.1], np.float32)}
    dets = decode(m, out, identity(), 0.25, 0.45, 100)
    assert dets == [{"index": 2, "label": "bicycle", "score": 0.8, "box": [1.0, 2.0, 30.0, 40.0]}]


# -- YOLO: a synthetic ONNX model with known constant outputs ------------------------------------------
def yolo_constant_model(path: str, head: np.ndarray) -> None:
    """[N, 3, 64, 64] → the constant ``head`` (without batch axis) repeated N times."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Shape", ["images"], ["shape"], start=0, end=1),
        helper.make_node("Concat", ["shape", "head_dims"], ["out_shape"], axis=0),
        helper.make_node("Expand", ["head", "out_shape"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "yolo_constant",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", *head.shape])],
        initializer=[numpy_helper.from_array(head[None].astype(np.float32), "head"),
                     numpy_helper.from_array(np.array(head.shape, np.int64), "head_dims")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


# cx, cy, w, h in 64x64 input pixels; 3 classes
ANCHORS = np.array([
    # cx  cy   w   h   c0   c1   c2
    [16, 24, 8, 16, 0.9, 0.0, 0.1],   # class 0, box [12, 16, 20, 32]
    [17, 24, 8, 16, 0.8, 0.0, 0.0],   # duplicate of the first: suppressed
    [17, 24, 8, 16, 0.0, 0.0, 0.6],   # same place, class 2: kept (class-aware)
    [48, 40, 20, 10, 0.0, 0.7, 0.0],  # class 1, box [38, 35, 58, 45]
    [40, 40, 4, 4, 0.1, 0.2, 0.2],    # below the threshold
], np.float32)


@pytest.mark.parametrize("layout", ["v8", "v5"])
def test_yolo_onnx_decodes_to_known_boxes(tmp_path, layout: str) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    if layout == "v8":  # [4 + C, A]
        head, objectness = ANCHORS.T.copy(), False
    else:  # [A, 5 + C]: score = objectness x class; the last anchor's 0.5 keeps it under the threshold
        obj = np.array([[1.0], [1.0], [1.0], [1.0], [0.5]], np.float32)
        head, objectness = np.concatenate([ANCHORS[:, :4], obj, ANCHORS[:, 4:]], 1), True
    path = str(tmp_path / "yolo.onnx")
    yolo_constant_model(path, head)
    post = DetectPostprocess(format="yolo", outputs=["output0"], objectness=objectness)
    m = manifest(post, ["zero", "one", "two"], size=64)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    # a 128x64 picture letterboxes into the 64x64 input at scale 0.5, 16 px of padding on top and bottom
    prep = Preprocessor(m.input, m.preprocess)
    buf = io.BytesIO()
    Image.new("RGB", (128, 64), (90, 90, 90)).save(buf, format="PNG")
    tensor, geo = prep(buf.getvalue())
    (out,) = sess.run(None, {"images": np.stack([tensor, tensor])})
    assert out.shape == (2, *head.shape)
    dets = decode(m, {"output0": out[1]}, geo, 0.25, 0.45, 100)
    got = [(d["label"], round(float(d["score"]), 3), d["box"]) for d in dets]
    assert got == [
        ("zero", 0.9, [24.0, 0.0, 40.0, 32.0]),  # y: (16-16)/0.5 = 0, (32-16)/0.5 = 32
        ("one", 0.7, [76.0, 38.0, 116.0, 58.0]),
        ("two", 0.6, [26.0, 0.0, 42.0, 32.0]),
    ]


def test_yolo_layout_mismatch_is_reported() -> None:
    post = DetectPostprocess(format="yolo", outputs=["output0"])
    m = manifest(post, ["a", "b"])
    with pytest.raises(ValueError, match="no axis of 6"):
        decode(m, {"output0": np.zeros((9, 100), np.float32)}, identity(), 0.25, 0.45, 100)


# -- annotate ------------------------------------------------------------------------------------------
def test_annotate_draws_boxes_and_labels() -> None:
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    dets = [{"index": 0, "label": "circle", "score": 0.93, "box": [50.0, 40.0, 150.0, 90.0]}]
    out = np.asarray(Image.open(io.BytesIO(annotate(img, dets))).convert("RGB"))
    assert out.shape == (100, 200, 3)
    assert out[65, 50].any() and out[90 - 1, 100].any()  # left and bottom edges drawn
    assert not out[65, 100].any()  # inside untouched
    assert out[30:40, 50:90].any()  # the label tag above the box
    assert annotate(img, []) and Image.open(io.BytesIO(annotate(img, []))).size == (200, 100)


def test_detection_module_never_imports_torch() -> None:
    code = "import sys, service.detection; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
