"""A procedural object-detection dataset: circles, squares, triangles and stars on textured backgrounds.

Every image is drawn from a seed, so a split is reproducible byte for byte; boxes are exact (the extent of
the polygon that was drawn). Images come in varied sizes and aspect ratios, so a letterboxing model sees
what a server would feed it. ``write_coco`` saves a split as image files plus a COCO json.

    python -m visionserve.convert.shapes.data --out /tmp/shapes --split test --count 200
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle", "star")
SPLIT_SEEDS = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
SUPERSAMPLE = 4  # masks are drawn at 4x and averaged down, so edges are anti-aliased and boxes exact


@dataclass
class Sample:
    image: Image.Image
    boxes: np.ndarray  # [K, 4] x1, y1, x2, y2 in pixels (continuous coordinates, pixel i spans [i, i+1))
    labels: np.ndarray  # [K] index into CLASSES
    meta: dict[str, object] = field(default_factory=dict)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Vertices [V, 2] of a shape of circumradius ``r`` (circles: a 64-gon, far finer than a pixel)."""
    if kind == "circle":
        n, radii = 64, np.full(64, r)
    elif kind == "square":
        n, radii = 4, np.full(4, r)
    elif kind == "triangle":
        n, radii = 3, np.full(3, r)
    else:  # star: five points, inner radius 0.45 r
        n, radii = 10, np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    t = angle + np.arange(n) * 2 * np.pi / n
    return np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], axis=1)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A textured, noisy background: smooth colour fields, stripes or blotches, plus pixel noise."""
    base = rng.uniform(0, 255, 3)
    gw, gh = int(rng.integers(2, 9)), int(rng.integers(2, 9))
    coarse = rng.normal(0, rng.uniform(10, 60), (gh, gw, 3)) + base
    field_ = np.asarray(Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    style = rng.integers(0, 3)
    if style == 1:  # stripes
        yy, xx = np.mgrid[0:h, 0:w]
        theta, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
        wave = np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period)
        field_ += (wave[..., None] * rng.uniform(5, 35) * rng.uniform(-1, 1, 3)).astype(np.float32)
    elif style == 2:  # blotchy texture
        fine = rng.normal(0, 1, (h // 4 + 1, w // 4 + 1)).astype(np.float32)
        fine_img = Image.fromarray(((fine + 3) * 40).clip(0, 255).astype(np.uint8)).resize((w, h))
        fine_img = fine_img.filter(ImageFilter.GaussianBlur(2))
        field_ += ((np.asarray(fine_img, np.float32) - 120) * rng.uniform(0.2, 0.6))[..., None]
    field_ += rng.normal(0, rng.uniform(2, 18), (h, w, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(field_, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 6))):  # distractor lines: not objects
        pts = rng.uniform(0, 1, 4) * [w, h, w, h]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.line([float(p) for p in pts], fill=colour, width=int(rng.integers(1, 4)))
    return np.asarray(img, dtype=np.float32)


def _overlap(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over the smaller box's area: how much of either box the other one covers."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.minimum(area(box), area(boxes))


def make_sample(seed: int, size: tuple[int, int] | None = None, max_objects: int = 6) -> Sample:
    """One image with 1..max_objects shapes; ``size`` (w, h) fixed, or random 192-416 px, aspect 0.75-1.33."""
    rng = np.random.default_rng(seed)
    if size is None:
        w = int(rng.integers(192, 417))
        h = int(np.clip(w / rng.uniform(0.75, 1.33), 160, 448))
    else:
        w, h = size
    pixels = _background(rng, w, h)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    want = int(rng.integers(1, max_objects + 1))
    short = min(w, h)
    for _ in range(want * 8):  # rejection sampling for placement
        if len(boxes) == want:
            break
        kind = int(rng.integers(0, len(CLASSES)))
        r = rng.uniform(0.05, 0.25) * short
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        poly = _polygon(CLASSES[kind], cx, cy, r, rng.uniform(0, 2 * np.pi))
        box = np.array([*poly.min(0), *poly.max(0)])
        if box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h:
            continue
        if len(boxes) and _overlap(box, np.array(boxes)).max() > 0.3:  # overlap, but never hide an object
            continue
        x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
        x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
        mask = Image.new("L", ((x1 - x0) * SUPERSAMPLE, (y1 - y0) * SUPERSAMPLE), 0)
        ImageDraw.Draw(mask).polygon([((x - x0) * SUPERSAMPLE, (y - y0) * SUPERSAMPLE) for x, y in poly], fill=255)
        alpha = np.asarray(mask.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), np.float32)[..., None] / 255
        bg = pixels[y0:y1, x0:x1]
        colour = rng.uniform(0, 255, 3)
        for _ in range(20):  # keep the object visible against its own surroundings
            if np.abs(colour - bg.reshape(-1, 3).mean(0)).sum() > 120:
                break
            colour = rng.uniform(0, 255, 3)
        fill = colour + rng.normal(0, rng.uniform(0, 15), bg.shape)
        if rng.random() < 0.3:  # shading gradient across the object
            fill += np.linspace(-30, 30, x1 - x0)[None, :, None] * rng.uniform(-1, 1)
        pixels[y0:y1, x0:x1] = bg * (1 - alpha) + fill * alpha
        boxes.append(box)
        labels.append(kind)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    buf = io.BytesIO()  # JPEG artefacts, as photographs have
    img.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return Sample(img, np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int64))


def split(name: str, count: int, start: int = 0) -> list[Sample]:
    """Samples ``start..start+count`` of a split; splits never share a seed."""
    base = SPLIT_SEEDS[name]
    return [make_sample(base + i) for i in range(start, start + count)]


def write_coco(samples: list[Sample], images_dir: Path, json_path: Path, quality: int = 90,
               prefix: str = "shapes") -> None:
    """Save images as JPEG and the annotations as a COCO json (category ids 1..4, boxes x, y, w, h)."""
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, s in enumerate(samples, start=1):
        file_name = f"{prefix}_{i:05d}.jpg"
        s.image.save(images_dir / file_name, quality=quality)
        images.append({"id": i, "file_name": file_name, "width": s.image.width, "height": s.image.height})
        for box, label in zip(s.boxes, s.labels):
            x1, y1, x2, y2 = (round(float(v), 2) for v in box)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": int(label) + 1,
                "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
                "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0,
            })
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", choices=sorted(SPLIT_SEEDS), default="test")
    p.add_argument("--count", type=int, default=200)
    args = p.parse_args()
    write_coco(split(args.split, args.count), args.out / "images", args.out / "annotations.json")
    print(f"wrote {args.count} {args.split} images to {args.out}")


if __name__ == "__main__":
    main()
