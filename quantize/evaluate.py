"""Accuracy of a repository model on a dataset, dispatched on the manifest's task.

Classification reads an ImageFolder, detection a COCO json. Each task names its evaluator
(``Task.evaluator = "module:function"`` in ``service.tasks``) — a function ``(entry, dataset_path, options) ->
dict`` — and ``visionserve evaluate`` finds it there.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionserve.service.imaging import Preprocessor
from visionserve.service.repository import ModelEntry

from .data import DatasetError, load_tensors, map_classes, scan_folder
from .guard import topk_hits
from .measure import predict, session
from .progress import bar


@dataclass(frozen=True)
class EvalOptions:
    batch: int = 8
    threads: int = 2
    limit: int | None = None  # evaluate at most this many images (spread over the classes)
    ways: int = 5  # embed: classes per one-shot episode
    episodes: int = 500  # embed: episodes to average over


Evaluator = Callable[[ModelEntry, Path, EvalOptions], dict[str, object]]


def evaluate(entry: ModelEntry, dataset: Path, options: EvalOptions | None = None) -> dict[str, object]:
    from visionserve.service.tasks import TASKS

    task = TASKS.get(entry.manifest.task)
    if task is None or not task.evaluator:
        raise DatasetError(f"evaluating {entry.manifest.task!r} models is not supported yet (known: "
                           f"{sorted(t.name for t in TASKS.values() if t.evaluator)})")
    module, func = task.evaluator.split(":")
    run: Evaluator = getattr(importlib.import_module(module), func)
    return run(entry, Path(dataset), options or EvalOptions())


def evaluate_classifier(entry: ModelEntry, dataset: Path, options: EvalOptions) -> dict[str, object]:
    """Top-1 / top-5 accuracy on an ImageFolder, per class, and the most frequent confusions."""
    m = entry.manifest
    images = scan_folder(dataset, what="evaluation folder")
    if not images.labelled or images.classes is None or images.targets is None:
        raise DatasetError(f"{dataset} is not an ImageFolder: put each class's images in a sub-folder "
                           "named after the class (its label or its index)")
    if options.limit and len(images) > options.limit:
        keep = np.linspace(0, len(images) - 1, options.limit).round().astype(int)
        images.items = [images.items[i] for i in keep]
        images.targets = [images.targets[i] for i in keep]
    sess = session(entry.model_path, options.threads)
    n_out = sess.get_outputs()[0].shape[-1]
    mapping = map_classes(images, m, n_out if isinstance(n_out, int) else 10**9)
    prep = Preprocessor(m.input, m.preprocess, draft=False)
    with bar(f"evaluating {m.name}: {len(images)} images", len(images)) as advance:
        x = load_tensors(images, prep, advance)
    logits = predict(sess, x, options.batch)
    targets = np.asarray([mapping[t] for t in images.targets])
    pred = logits.argmax(1)
    per_class = {}
    for ci, cname in enumerate(images.classes):
        sel = np.asarray(images.targets) == ci
        per_class[cname] = {"images": int(sel.sum()), "top1": round(float((pred[sel] == targets[sel]).mean()), 4)}
    confusions = Counter((m.label(int(t)), m.label(int(p))) for t, p in zip(targets, pred) if t != p)
    return {
        "model": f"{m.name}:{m.version}", "task": "classify", "dataset": str(dataset), "images": len(images),
        "classes": len(images.classes),
        "top1": round(float((pred == targets).mean()), 5),
        "top5": round(float(topk_hits(logits, targets, 5).mean()), 5),
        "per_class": per_class,
        "confusions": [{"true": t, "predicted": p, "count": c} for (t, p), c in confusions.most_common(10)],
    }


def evaluate_detector(entry: ModelEntry, dataset: Path, options: EvalOptions) -> dict[str, object]:
    """COCO mAP: ``dataset`` is the annotations JSON; images in ``images/`` beside it, or beside it directly."""
    from .evaluate_detect import evaluate_detection

    if not dataset.is_file() or dataset.suffix.lower() != ".json":
        raise DatasetError(f"a detector is evaluated on a COCO annotations .json file, got {dataset}")
    images = dataset.parent / "images"
    result = evaluate_detection(entry, dataset, images if images.is_dir() else dataset.parent,
                                threads=options.threads)
    return {"model": f"{entry.manifest.name}:{entry.manifest.version}", "task": "detect",
            "dataset": str(dataset), **result}


def render(result: dict[str, object]) -> str:
    """A short text summary for the terminal."""
    if result.get("task") != "classify":
        return "\n".join(f"{k}: {v}" for k, v in result.items() if not isinstance(v, (dict, list)))
    lines = [f"{result['model']} on {result['dataset']}: {result['images']} images, {result['classes']} classes",
             f"  top-1 {float(result['top1']):.2%}   top-5 {float(result['top5']):.2%}"]  # type: ignore[arg-type]
    per = result.get("per_class") or {}
    worst = sorted(per.items(), key=lambda kv: kv[1]["top1"])[:5]  # type: ignore[union-attr,index]
    if worst:
        lines.append("  weakest classes: " + ", ".join(f"{k} {v['top1']:.0%}" for k, v in worst))
    conf = result.get("confusions") or []
    if conf:
        lines.append("  most frequent confusions (true → predicted): " + ", ".join(
            f"{c['true']} → {c['predicted']} ×{c['count']}" for c in conf[:5]))  # type: ignore[union-attr]
    return "\n".join(lines)
