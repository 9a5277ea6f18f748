"""Train the shapes detector on CPU in about five minutes, then report COCO mAP on the test split.

    python examples/train_shapes_detector.py                      # train (≈5.5 min on 2 cores) + evaluate
    python examples/train_shapes_detector.py --eval-only          # evaluate the committed weights
    python examples/train_shapes_detector.py --write-test-split   # (re)write tests/data/shapes

Data come from ``convert/shapes/data.py`` (procedural, seeded). Every image is letterboxed to 256x256 by
the server's own ``service.imaging.Preprocessor``, so training sees exactly what serving will feed the
model. Targets are FCOS-style: a location is positive for the smallest box that contains it and lies
near its centre; sigmoid focal loss for classes, GIoU for boxes, BCE for centerness.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from visionserve.convert.shapes import LABELS, WEIGHTS  # noqa: E402  (the committed weights live in the product)
from visionserve.convert.shapes.data import CLASSES, Sample, split, write_coco  # noqa: E402
from visionserve.convert.shapes.model import INPUT_SIZE, STRIDE, ShapesDetector  # noqa: E402
from visionserve.service.imaging import Preprocessor  # noqa: E402
from visionserve.service.manifest import InputSpec, Preprocess  # noqa: E402

TEST_SPLIT = ROOT / "tests" / "data" / "shapes"
SPEC = InputSpec(name="input", shape=[-1, 3, INPUT_SIZE, INPUT_SIZE])
# What the converted model's manifest will say (ImageNet statistics, letterbox with grey 114 padding).
PREPROCESS = Preprocess(resize_policy="letterbox")
_RAW = Preprocess(resize_policy="letterbox", scale=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def letterboxed(samples: list[Sample]) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """uint8 [N, H, W, 3] letterboxed pixels and the boxes mapped into them (the server's own geometry)."""
    raw = Preprocessor(SPEC.model_copy(update={"layout": "NHWC", "shape": [-1, INPUT_SIZE, INPUT_SIZE, 3]}),
                       _RAW, draft=False)
    images = np.empty((len(samples), INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    boxes = []
    for i, s in enumerate(samples):
        pixels, geo = raw.from_image(s.image)
        images[i] = pixels.astype(np.uint8)
        b = s.boxes.copy()
        b[:, 0::2] = b[:, 0::2] * geo.scale_x + geo.offset_x
        b[:, 1::2] = b[:, 1::2] * geo.scale_y + geo.offset_y
        boxes.append(b)
    return images, boxes, [s.labels for s in samples]


def normalise(batch: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC → the model's input, as the manifest's Preprocess does it."""
    x = batch.permute(0, 3, 1, 2).float() * PREPROCESS.scale
    mean = torch.tensor(PREPROCESS.mean).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def assign(centers: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, num_classes: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FCOS targets for one image: (class one-hot [A, C], box [A, 4], centerness [A], positive [A])."""
    a = centers.shape[0]
    cls_t = torch.zeros(a, num_classes)
    if boxes.numel() == 0:
        return cls_t, torch.zeros(a, 4), torch.zeros(a), torch.zeros(a, dtype=torch.bool)
    x, y = centers[:, :1], centers[:, 1:]
    ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], -1)  # [A, K, 4]
    wh = boxes[:, 2:] - boxes[:, :2]
    mid = (boxes[:, :2] + boxes[:, 2:]) / 2
    radius = torch.clamp(0.2 * wh.min(1).values, min=1.5 * STRIDE)
    near = ((x - mid[:, 0]).abs() < radius) & ((y - mid[:, 1]).abs() < radius)
    candidate = (ltrb.min(-1).values > 0) & near
    nearest = torch.cdist(mid, centers).argmin(1)  # every object gets at least its closest location
    candidate[nearest, torch.arange(len(boxes))] = True
    area = (wh[:, 0] * wh[:, 1]).expand(a, -1)
    cost = torch.where(candidate, area, torch.full_like(area, math.inf))
    best_cost, best = cost.min(1)
    positive = torch.isfinite(best_cost)
    cls_t[positive, labels[best[positive]]] = 1.0
    box_t = boxes[best]
    d = ltrb[torch.arange(a), best].clamp(min=1e-3)
    ctr_t = torch.sqrt((d[:, [0, 2]].min(1).values / d[:, [0, 2]].max(1).values)
                       * (d[:, [1, 3]].min(1).values / d[:, [1, 3]].max(1).values))
    return cls_t, box_t, ctr_t * positive, positive


def loss_fn(model: ShapesDetector, x: torch.Tensor, targets: list[tuple[torch.Tensor, ...]]
            ) -> tuple[torch.Tensor, dict[str, float]]:
    cls, reg, ctr = model.raw(x)
    cls_t, box_t, ctr_t, pos = (torch.stack(t) for t in zip(*targets))
    n_pos = max(1.0, float(pos.sum()))
    l_cls = sigmoid_focal_loss(cls, cls_t, reduction="sum") / n_pos
    pred = model.decode(reg)[pos]
    w = ctr_t[pos]
    l_box = (generalized_box_iou_loss(pred, box_t[pos], reduction="none") * w).sum() / w.sum().clamp(min=1e-6)
    l_ctr = F.binary_cross_entropy_with_logits(ctr[pos], ctr_t[pos], reduction="sum") / n_pos
    total = l_cls + 2.0 * l_box + l_ctr
    return total, {"cls": l_cls.item(), "box": l_box.item(), "ctr": l_ctr.item()}


def flip(images: np.ndarray, boxes: list[np.ndarray], rng: np.random.Generator
         ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Random horizontal and vertical flips (every class is symmetric enough to keep its name)."""
    images = images.copy()
    out = []
    for i, b in enumerate(boxes):
        b = b.copy()
        if rng.random() < 0.5:
            images[i] = images[i, :, ::-1]
            b[:, [0, 2]] = INPUT_SIZE - b[:, [2, 0]]
        if rng.random() < 0.5:
            images[i] = images[i, ::-1]
            b[:, [1, 3]] = INPUT_SIZE - b[:, [3, 1]]
        out.append(b)
    return images, out


def train(args: argparse.Namespace) -> ShapesDetector:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    print(f"generating {args.train_images} training images ...", flush=True)
    samples = []
    for start in range(0, args.train_images, 500):
        samples += split("train", min(500, args.train_images - start), start)
        print(f"  {len(samples)}/{args.train_images} ({time.perf_counter() - t0:.0f} s)", flush=True)
    images, boxes, labels = letterboxed(samples)
    del samples
    gen_s = time.perf_counter() - t0
    model = ShapesDetector().to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = 60
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    centers = model.centers
    t1 = time.perf_counter()
    order = rng.permutation(len(images))
    pos = 0
    running: dict[str, float] = {}
    for step in range(1, args.steps + 1):
        if pos + args.batch > len(order):
            order, pos = rng.permutation(len(images)), 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        batch, bxs = flip(images[idx], [boxes[i] for i in idx], rng)
        targets = [assign(centers, torch.from_numpy(b), torch.from_numpy(labels[i]), model.num_classes)
                   for b, i in zip(bxs, idx)]
        loss, parts = loss_fn(model, normalise(torch.from_numpy(batch)), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        for k, v in parts.items():
            running[k] = 0.9 * running.get(k, v) + 0.1 * v
        if step % 25 == 0 or step == args.steps:
            el = time.perf_counter() - t1
            print(f"step {step}/{args.steps}  loss cls {running['cls']:.3f} box {running['box']:.3f} "
                  f"ctr {running['ctr']:.3f}  lr {sched.get_last_lr()[0]:.2e}  {el:.0f} s, "
                  f"eta {el / step * (args.steps - step):.0f} s", flush=True)
    train_s = time.perf_counter() - t1
    model.eval()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, args.weights)
    print(f"saved {args.weights} ({args.weights.stat().st_size / 1e6:.2f} MB); data {gen_s:.0f} s, "
          f"training {train_s:.0f} s", flush=True)
    args.timing = {"generate_seconds": round(gen_s, 1), "train_seconds": round(train_s, 1),
                   "steps": args.steps, "batch": args.batch, "train_images": args.train_images}
    return model


def predict(model: ShapesDetector, samples: list[Sample], score_threshold: float = 0.01
            ) -> list[list[dict[str, object]]]:
    """Detections per sample in original pixels, through the server's preprocessing and decoding."""
    from visionserve.service.detection import postprocess

    prep = Preprocessor(SPEC, PREPROCESS, draft=False)
    out = []
    for start in range(0, len(samples), 16):
        chunk = samples[start:start + 16]
        tensors, geos = zip(*(prep.from_image(s.image) for s in chunk))
        with torch.no_grad():
            boxes, scores = model(torch.from_numpy(np.stack(tensors)))
        for b, s, g in zip(boxes.numpy(), scores.numpy(), geos):
            out.append(postprocess(b, s, g, score_threshold=score_threshold, iou_threshold=0.6,
                                   max_detections=100, labels=list(CLASSES)))
    return out


def coco_map(samples: list[Sample], detections: list[list[dict[str, object]]]) -> dict[str, float]:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "width": s.image.width, "height": s.image.height} for i, s in enumerate(samples)],
        "annotations": [
            {"id": k, "image_id": i, "category_id": int(lab) + 1, "iscrowd": 0,
             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
             "area": float((b[2] - b[0]) * (b[3] - b[1]))}
            for k, (i, b, lab) in enumerate(
                ((i, b, lab) for i, s in enumerate(samples) for b, lab in zip(s.boxes, s.labels)), start=1)
        ],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    results = [
        {"image_id": i, "category_id": int(d["index"]) + 1, "score": float(d["score"]),  # type: ignore[arg-type]
         "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]]}  # type: ignore[index]
        for i, dets in enumerate(detections) for d in dets
    ]
    if not results:
        return {"mAP@0.5": 0.0, "mAP@[.5:.95]": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"mAP@0.5": round(float(ev.stats[1]), 4), "mAP@[.5:.95]": round(float(ev.stats[0]), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--test-images", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--eval-only", action="store_true", help="evaluate --weights, do not train")
    p.add_argument("--write-test-split", action="store_true", help=f"write 20 test images to {TEST_SPLIT}")
    p.add_argument("--coco-out", type=Path, help="also write the whole test split as COCO json + images here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    LABELS.write_text("\n".join(CLASSES) + "\n")
    if args.write_test_split:
        write_coco(split("test", 20), TEST_SPLIT / "images", TEST_SPLIT / "annotations.json")
        print(f"wrote {TEST_SPLIT}")
        if not args.coco_out:
            return
    if args.coco_out:
        write_coco(split("test", args.test_images), args.coco_out / "images", args.coco_out / "annotations.json")
        print(f"wrote {args.coco_out}")
        return
    args.timing = None
    if args.eval_only:
        model = ShapesDetector()
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        model.eval()
    else:
        model = train(args)
    test = split("test", args.test_images)
    t = time.perf_counter()
    metrics = coco_map(test, predict(model, test))
    print(f"test split ({len(test)} images, {sum(len(s.boxes) for s in test)} objects): "
          f"mAP@0.5 {metrics['mAP@0.5']:.3f}, mAP@[.5:.95] {metrics['mAP@[.5:.95]']:.3f} "
          f"({time.perf_counter() - t:.0f} s)")
    if args.timing is not None:  # beside the weights: convert/shapes/shapes_detector.json for the committed ones
        report = {"test": {"images": len(test), **metrics}, **args.timing}
        args.weights.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
