"""/detect over real HTTP through the same batcher: boxes in the original image's pixels."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .conftest import ROOT, Server

SHAPES = ROOT / "tests" / "data" / "shapes"
JPEG = {"Content-Type": "image/jpeg"}


def coco() -> tuple[list[dict], dict[int, list[dict]], dict[int, str]]:
    d = json.loads((SHAPES / "annotations.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for a in d["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    return d["images"], by_image, {c["id"]: c["name"] for c in d["categories"]}


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def detect(server: Server, data: bytes, params: str = "") -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/shapes_detector/detect{params}", content=data, headers=JPEG,
                      timeout=30)


def matched(dets: list[dict], truth: list[dict], names: dict[int, str]) -> float:
    """Fraction of ground-truth objects found by a same-class detection with IoU ≥ 0.5."""
    hits = 0
    for t in truth:
        box = xyxy(t["bbox"])
        if any(d["label"] == names[t["category_id"]] and iou(d["box"], box) >= 0.5 for d in dets):
            hits += 1
    return hits / len(truth)


def test_test_split_round_trips_with_boxes_on_the_objects(server: Server) -> None:
    images, truth, names = coco()

    async def all_at_once() -> list[httpx.Response]:  # concurrent: they share batches
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(
                f"{server.url}/v1/models/shapes_detector/detect", content=(SHAPES / "images" / i["file_name"])
                .read_bytes(), headers=JPEG) for i in images))

    found = []
    for info, r in zip(images, asyncio.run(all_at_once())):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["image"] == {"width": info["width"], "height": info["height"]}
        for d in body["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= info["width"] and 0 <= y1 <= y2 <= info["height"]
        objects = truth.get(info["id"], [])
        found.append((matched(body["detections"], objects, names) if objects else 1.0, len(objects)))
    # at the trained model's quality (0.98 mAP@0.5): 70 of the 72 objects, every object in 18 of the 20 images
    recall = sum(f * n for f, n in found) / sum(n for _, n in found)
    assert recall >= 0.95, found
    assert sum(f == 1.0 for f, _ in found) >= 17, found


def test_exif_rotated_and_non_square_images_map_back(server: Server) -> None:
    images, truth, names = coco()
    info = next(i for i in images if i["width"] != i["height"] and len(truth.get(i["id"], [])) >= 1)
    img = Image.open(SHAPES / "images" / info["file_name"]).convert("RGB")
    # stored rotated, with EXIF orientation 6 ("rotate 90° clockwise to display"): displays as the original
    stored = img.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif)
    r = detect(server, buf.getvalue())
    assert r.status_code == 200
    body = r.json()
    assert body["image"] == {"width": info["width"], "height": info["height"]}
    assert matched(body["detections"], truth[info["id"]], names) >= 0.5


def test_thresholds_and_max_detections_are_honoured(server: Server) -> None:
    images, _, _ = coco()
    data = (SHAPES / "images" / images[0]["file_name"]).read_bytes()
    loose = detect(server, data, "?score_threshold=0.01&max_detections=100").json()["detections"]
    strict = detect(server, data, "?score_threshold=0.6").json()["detections"]
    assert all(d["score"] >= 0.6 for d in strict) and len(strict) <= len(loose)
    assert [d["score"] for d in loose] == sorted((d["score"] for d in loose), reverse=True)
    assert len(detect(server, data, "?score_threshold=0.01&max_detections=2").json()["detections"]) <= 2


def test_annotate_returns_a_png_of_the_image(server: Server) -> None:
    images, _, _ = coco()
    r = detect(server, (SHAPES / "images" / images[0]["file_name"]).read_bytes(), "?annotate=true")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (images[0]["width"], images[0]["height"])


@pytest.mark.parametrize("params, status", [("?score_threshold=2", 422), ("?iou_threshold=-1", 422),
                                            ("?max_detections=0", 422), ("?max_detections=x", 422)])
def test_bad_parameters(server: Server, params: str, status: int) -> None:
    r = detect(server, (ROOT / "examples" / "images" / "cat.jpg").read_bytes(), params)
    assert r.status_code == status and "error" in r.json()


def test_wrong_task_and_bad_image(server: Server, tmp_path: Path) -> None:
    cat = (ROOT / "examples" / "images" / "cat.jpg").read_bytes()
    r = httpx.post(f"{server.url}/v1/models/shapes_detector/classify", content=cat, headers=JPEG)
    assert r.status_code == 422 and "detect" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/models/mobilenet_v2/detect", content=cat, headers=JPEG)
    assert r.status_code == 422 and "classify" in r.json()["error"]
    assert detect(server, cat[:3000]).status_code == 400
