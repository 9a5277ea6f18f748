"""Detection conversion (parity), the default shapes detector, COCO evaluation, the CLI's detect branch."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "tests" / "data" / "shapes"


@pytest.fixture(scope="module")
def shapes_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed shapes weights converted by build_default_detector (≈ 10 s, once)."""
    from visionserve.convert.detect_default import build_default_detector

    repo = tmp_path_factory.mktemp("detect_repo")
    build_default_detector(repo)
    return repo


def test_default_detector_manifest_and_idempotence(shapes_repo: Path) -> None:
    from visionserve.convert.detect_default import build_default_detector
    from visionserve.service.repository import load_entry

    entry = load_entry(shapes_repo / "shapes_detector" / "1", verify_checksum=True)
    m = entry.manifest
    assert m.task == "detect" and m.postprocess.format == "visionserve"  # type: ignore[union-attr]
    assert m.labels == ["circle", "square", "triangle", "star"]
    assert m.input.shape == [-1, 3, 256, 256] and m.preprocess.resize_policy == "letterbox"
    assert [o.shape for o in m.outputs] == [[-1, 1024, 4], [-1, 1024, 4]]  # dynamic batch
    p = m.provenance.parity
    assert p is not None and p.real_images > 0 and max(p.batch_sizes) > 1 and p.max_abs_error < 1e-2
    mtime = entry.model_path.stat().st_mtime_ns
    again = build_default_detector(shapes_repo)
    assert again.directory == entry.directory and again.model_path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (shapes_repo / "shapes_detector").iterdir()) == ["1"]


def test_evaluate_committed_weights_on_committed_split(shapes_repo: Path) -> None:
    from visionserve.quantize.evaluate_detect import evaluate_detection
    from visionserve.service.repository import load_entry

    entry = load_entry(shapes_repo / "shapes_detector" / "1")
    result = evaluate_detection(entry, SHAPES / "annotations.json", SHAPES / "images")
    assert result["images"] == 20 and result["annotations"] > 20
    assert result["mAP@0.5"] >= 0.9, result
    assert 0.5 < result["mAP@[.5:.95]"] <= result["mAP@0.5"], result
    assert set(result["AP@0.5_per_class"]) == {"circle", "square", "triangle", "star"}


def test_evaluate_is_sensitive_to_wrong_answers(shapes_repo: Path, tmp_path: Path) -> None:
    """The same model scored against shuffled ground truth must fall apart (the metric is not vacuous)."""
    from visionserve.quantize.evaluate_detect import evaluate_detection
    from visionserve.service.repository import load_entry

    entry = load_entry(shapes_repo / "shapes_detector" / "1")
    right = evaluate_detection(entry, SHAPES / "annotations.json", SHAPES / "images")["mAP@0.5"]

    def score(corrupt) -> float:  # type: ignore[no-untyped-def]
        coco = json.loads((SHAPES / "annotations.json").read_text())
        for a in coco["annotations"]:
            corrupt(a)
        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps(coco))
        return evaluate_detection(entry, wrong, SHAPES / "images")["mAP@0.5"]

    def wrong_class(a: dict) -> None:  # every object gets the wrong class
        a["category_id"] = a["category_id"] % 4 + 1

    def wrong_place(a: dict) -> None:  # every box moves by its own size (IoU 0 with the object)
        a["bbox"][0] += a["bbox"][2]
        a["bbox"][1] += a["bbox"][3]

    # a wrong class still matches the model's low-scored second guesses (scored down to 0.001), so it
    # keeps some AP; a misplaced box keeps none
    assert score(wrong_class) < right / 3
    assert score(wrong_place) < 0.05


def test_server_path_matches_pytorch_detections(shapes_repo: Path) -> None:
    """Preprocessor → ONNX Runtime → decode gives the boxes PyTorch gives on the same tensor."""
    import onnxruntime as ort
    import torch

    from visionserve.convert.detect_default import WEIGHTS
    from visionserve.convert.shapes.model import build
    from visionserve.service.detection import decode, postprocess
    from visionserve.service.imaging import Preprocessor
    from visionserve.service.repository import load_entry

    entry = load_entry(shapes_repo / "shapes_detector" / "1")
    m = entry.manifest
    files = sorted((SHAPES / "images").glob("*.jpg"))[:3]
    prep = Preprocessor(m.input, m.preprocess)
    items = [prep(f.read_bytes()) for f in files]
    batch = np.stack([t for t, _ in items])
    boxes, scores = ort.InferenceSession(str(entry.model_path), providers=["CPUExecutionProvider"]).run(
        None, {"input": batch})
    model = build()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    with torch.no_grad():
        tb, ts = (t.numpy() for t in model.eval()(torch.from_numpy(batch)))
    for i, (_, geo) in enumerate(items):
        ours = decode(m, {"boxes": boxes[i], "scores": scores[i]}, geo, 0.25, 0.45, 100)
        ref = postprocess(tb[i], ts[i], geo, labels=m.labels)
        assert ours and [d["label"] for d in ours] == [d["label"] for d in ref]
        np.testing.assert_allclose([d["box"] for d in ours], [d["box"] for d in ref], atol=0.05)
        assert all(0 <= d["box"][0] < d["box"][2] <= geo.width for d in ours)


def _torchvision_with_spread_scores(arch: str, size: int = 320):  # type: ignore[no-untyped-def]
    """A randomly initialised torchvision detector (5 classes) whose scores differ from anchor to anchor, so
    that the parity proof compares real detections: BatchNorm statistics come from a few random images (fresh
    BN makes every score equal, and any order would pass), and RetinaNet's classification prior (0.01, under
    its 0.05 score cut-off) is reset to 0.5."""
    import torch
    import torchvision

    torch.manual_seed(0)
    kwargs = {"min_size": size, "max_size": size} if arch.startswith("retinanet") else {}
    model = torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=5, **kwargs)
    head = getattr(model, "head", None)
    if arch.startswith("retinanet"):
        torch.nn.init.zeros_(model.head.classification_head.cls_logits.bias)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        x = model.transform(list(torch.rand(4, 3, size, size)))[0].tensors
        features = model.backbone(x)
        if head is not None:
            head(list(features.values()))
    return model.eval()


def _ssdlite_with_spread_scores():  # type: ignore[no-untyped-def]
    return _torchvision_with_spread_scores("ssdlite320_mobilenet_v3_large")


@pytest.mark.parametrize("arch", ["ssdlite320_mobilenet_v3_large", "retinanet_resnet50_fpn",
                                  "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_torchvision_detector_converts_with_parity(arch: str, tmp_path: Path) -> None:
    """SSDlite, RetinaNet and Faster R-CNN (randomly initialised): exported with their post-processing, proven
    detection by detection, and decoded by the server's path on a photograph."""
    import onnxruntime as ort

    from visionserve.convert.detect import convert_detector, default_preprocess
    from visionserve.convert.pipeline import ConvertOptions
    from visionserve.convert.sources import Source
    from visionserve.service.detection import decode
    from visionserve.service.imaging import Preprocessor
    from visionserve.service.manifest import DetectPostprocess

    labels = ["__background__", "a", "b", "c", "d"]
    opts = ConvertOptions(
        name="ssd", repository=tmp_path, task="detect", input_size=(320, 320),
        preprocess=default_preprocess("torchvision"), labels=labels,
        detect=DetectPostprocess(format="torchvision", outputs=["boxes", "labels", "scores"]),
    )
    source = Source(_torchvision_with_spread_scores(arch), f"torchvision:{arch}")
    entry = convert_detector(source, opts)
    m = entry.manifest
    assert m.max_batch_size == 1 and m.input.shape == [1, 3, 320, 320]
    assert m.postprocess.nms == "in_graph"  # type: ignore[union-attr]
    assert m.provenance.parity is not None and m.provenance.parity.real_images >= 1
    assert m.provenance.notes["parity_detections_compared"] > 100  # the proof compared real detections

    # the server's path on a photograph: outputs passed as they came, boxes inside the image
    img = ROOT / "examples" / "images" / "cat.jpg"
    tensor, geo = Preprocessor(m.input, m.preprocess)(img.read_bytes())
    sess = ort.InferenceSession(str(entry.model_path), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": tensor[None]})))
    dets = decode(m, outs, geo, 0.3, 0.45, 20)
    # SSD and Faster R-CNN never output class 0 (background); RetinaNet (sigmoid per class) may, untrained
    names = labels if arch.startswith("retinanet") else labels[1:]
    assert 0 < len(dets) <= 20 and all(d["label"] in names for d in dets)
    assert all(0 <= d["box"][0] < d["box"][2] <= geo.width and 0 <= d["box"][1] < d["box"][3] <= geo.height
               for d in dets)


def test_detection_parity_catches_a_wrong_export(tmp_path: Path) -> None:
    """Compare a model with the ONNX of a *different* model: the proof must fail."""
    import torch

    from visionserve.convert.detect import SingleImage, detection_parity, single_image_batches
    from visionserve.convert.parity import ParityError
    from visionserve.service.manifest import InputSpec, Preprocess

    model = SingleImage(_ssdlite_with_spread_scores()).eval()
    onnx_path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes about torchvision's transform
        torch.onnx.export(model, (torch.rand(1, 3, 320, 320),), str(onnx_path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["boxes", "labels", "scores"],
                          dynamic_axes={n: {0: "k"} for n in ("boxes", "labels", "scores")})
    with torch.no_grad():
        for p in model.detector.head.regression_head.parameters():
            p.add_(0.05)  # PyTorch now predicts other boxes than the ONNX file
    spec = InputSpec(name="input", shape=[1, 3, 320, 320])
    batches = single_image_batches(spec, Preprocess(resize_policy="stretch"), real_images=False)
    with pytest.raises(ParityError, match=r"no ONNX counterpart|detections in PyTorch"):
        detection_parity(model, str(onnx_path), batches, atol=1e-3, rtol=1e-3)


def test_cli_convert_detect_and_import_onnx(tmp_path: Path) -> None:
    from visionserve.service.cli import app
    from visionserve.service.repository import load_entry

    runner = CliRunner()
    repo = tmp_path / "repo"
    bad = runner.invoke(app, ["convert", "-r", str(repo), "-n", "x", "--task", "detect", "--module",
                              "visionserve.convert.shapes.model:build", "--detect-format", "detr"])
    assert bad.exit_code != 0 and "--detect-format" in bad.output

    # the shapes detector from its module and weights, as docs/detection.md shows
    ok = runner.invoke(app, ["convert", "-r", str(repo), "-n", "shapes", "--task", "detect", "--module",
                             "visionserve.convert.shapes.model:build", "--weights",
                             str(ROOT / "convert" / "shapes" / "shapes_detector.pt"),
                             "--labels", str(ROOT / "convert" / "shapes" / "labels.txt"), "--input-size", "256",
                             "--exporter", "legacy"])
    assert ok.exit_code == 0, ok.output
    assert "format visionserve" in ok.output and "parity over" in ok.output
    m = load_entry(repo / "shapes" / "1", verify_checksum=True).manifest
    assert m.labels[0] == "circle" and m.provenance.exporter == "legacy" and m.max_batch_size == 32

    # an ONNX file exported elsewhere (a YOLOv8-layout head), imported as it is
    from tests.test_detect_decode import ANCHORS, yolo_constant_model

    onnx_file = tmp_path / "yolo.onnx"
    yolo_constant_model(str(onnx_file), ANCHORS.T.copy())
    labels = tmp_path / "labels.txt"
    labels.write_text("zero\none\ntwo\n")
    ok = runner.invoke(app, ["convert", "-r", str(repo), "-n", "yolo", "--task", "detect", "--onnx",
                             str(onnx_file), "--detect-format", "yolo", "--output-names", "output0",
                             "--labels", str(labels), "--input-size", "64"])
    assert ok.exit_code == 0, ok.output
    m = load_entry(repo / "yolo" / "1", verify_checksum=True).manifest
    assert m.postprocess.format == "yolo" and m.input.name == "images"  # type: ignore[union-attr]
    assert m.preprocess.resize_policy == "letterbox" and m.preprocess.mean == (0.0, 0.0, 0.0)
    assert m.provenance.parity is None and m.max_batch_size == 32
