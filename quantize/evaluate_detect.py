"""COCO mAP of a repository detector, through exactly what the server does.

Each image file goes through the model's ``service.imaging.Preprocessor`` (EXIF, JPEG draft, letterbox or
stretch), batches of ``max_batch_size`` run in ONNX Runtime, and ``service.detection.decode`` maps each
image's slice back to original pixels; pycocotools scores the result.

    from visionserve.quantize.evaluate_detect import evaluate_detection
    evaluate_detection(entry, Path("tests/data/shapes/annotations.json"), Path("tests/data/shapes/images"))
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

from visionserve.service.detection import decode
from visionserve.service.imaging import Preprocessor
from visionserve.service.repository import ModelEntry

from .measure import session


def category_map(labels: list[str], categories: list[dict[str, Any]]) -> dict[int, int]:
    """Model class index → COCO category id: by name where the labels name the categories, else the index
    itself (torchvision's COCO detectors answer in category ids already)."""
    by_name = {c["name"]: int(c["id"]) for c in categories}
    ids = {int(c["id"]) for c in categories}
    mapping = {i: by_name[name] for i, name in enumerate(labels) if name in by_name}
    if not mapping:
        mapping = {i: i for i in ids}
    return mapping


def predict(entry: ModelEntry, files: list[Path], *, onnx_path: Path | None = None, score_threshold: float = 0.001,
            iou_threshold: float = 0.6, max_detections: int = 100, batch_size: int = 8, threads: int = 2
            ) -> tuple[list[list[dict[str, object]]], float]:
    """Detections per file (original pixels) and the seconds spent in inference + decoding."""
    m = entry.manifest
    sess = session(onnx_path or entry.model_path, threads)
    names = [o.name for o in sess.get_outputs()]
    batched = m.postprocess.batched  # torchvision's post-processed detectors answer for one image
    batch_size = min(batch_size, m.max_batch_size) if batched else 1
    prep = Preprocessor(m.input, m.preprocess)
    results: list[list[dict[str, object]]] = []
    spent = 0.0
    for start in range(0, len(files), batch_size):
        chunk = [prep(f.read_bytes()) for f in files[start:start + batch_size]]
        tensors = np.stack([t for t, _ in chunk])
        t0 = time.perf_counter()
        outs = sess.run(None, {m.input.name: tensors})
        for i, (_, geometry) in enumerate(chunk):
            one = {n: (o[i] if batched else o) for n, o in zip(names, outs)}
            results.append(decode(m, one, geometry, score_threshold, iou_threshold, max_detections))
        spent += time.perf_counter() - t0
    return results, spent


def evaluate_detection(entry: ModelEntry, coco_json: Path, images_dir: Path, *, onnx_path: Path | None = None,
                       score_threshold: float = 0.001, iou_threshold: float = 0.6, max_detections: int = 100,
                       threads: int = 2, sink: dict[str, Any] | None = None) -> dict[str, Any]:
    """mAP@0.5 and mAP@[.5:.95] (pycocotools) of ``entry`` (or ``onnx_path`` with its manifest) on a COCO set.

    Defaults follow the usual COCO protocol: a low score threshold and at most 100 detections an image.
    ``sink``, when given, receives the ``COCOeval`` object (``sink["coco_eval"]``), for a bootstrap.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco_json))
    image_ids = sorted(gt.getImgIds())
    files = [Path(images_dir) / gt.imgs[i]["file_name"] for i in image_ids]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {coco_json} are missing from {images_dir}, e.g. "
                                f"{missing[0]}")
    detections, infer_s = predict(entry, files, onnx_path=onnx_path, score_threshold=score_threshold,
                                  iou_threshold=iou_threshold, max_detections=max_detections, threads=threads)
    to_cat = category_map(entry.manifest.labels, gt.dataset.get("categories", []))
    results = [
        {"image_id": image_id, "category_id": to_cat[int(d["index"])], "score": float(d["score"]),  # type: ignore[call-overload, arg-type]
         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
        for image_id, dets in zip(image_ids, detections) for d in dets
        if int(d["index"]) in to_cat and (b := d["box"]) is not None  # type: ignore[call-overload]
    ]
    stats = [0.0] * 12
    per_class: dict[str, float] = {}
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(results), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = [float(s) for s in ev.stats]
        if sink is not None:
            sink["coco_eval"] = ev
        precision = ev.eval["precision"]  # [T, R, K, A, M]: IoU 0.5 is T=0, all areas, 100 dets
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[0, :, k, 0, -1]
            per_class[gt.cats[cat_id]["name"]] = round(float(p[p > -1].mean()), 4) if (p > -1).any() else -1.0
    return {
        "model": f"{entry.manifest.name}:{entry.manifest.version}",
        "onnx": str(onnx_path or entry.model_path),
        "images": len(files),
        "annotations": len(gt.getAnnIds()),
        "detections": len(results),
        "mAP@0.5": round(stats[1], 4),
        "mAP@[.5:.95]": round(stats[0], 4),
        "AP@0.5_per_class": per_class,
        "inference_images_per_second": round(len(files) / infer_s, 1) if infer_s else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
