"""N-way 1-shot identification accuracy of an embedding model on an ImageFolder (``visionserve evaluate``).

One episode: pick N classes, enrol one random image of each (the "gallery"), and name every other image of
those classes by its most similar enrolled image (cosine). The answer is the mean accuracy over many
episodes, with its spread: one lucky or unlucky reference image moves a single episode a lot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionserve.service.imaging import Preprocessor
from visionserve.service.repository import ModelEntry
from visionserve.service.tasks.embed import EmbedPostprocess, l2_normalise

from .data import DatasetError, load_tensors, scan_folder
from .measure import predict, session
from .progress import bar


@dataclass(frozen=True)
class Episodes:
    ways: int = 5
    episodes: int = 500
    seed: int = 0


def embeddings(entry: ModelEntry, tensors: np.ndarray, threads: int = 2, batch: int = 16) -> np.ndarray:
    """Unit-length embeddings of preprocessed images, through the model's ONNX file."""
    post = entry.manifest.postprocess
    assert isinstance(post, EmbedPostprocess)
    sess = session(entry.model_path, threads)
    out = predict(sess, tensors, batch)
    return l2_normalise(out.reshape(len(out), -1))


def episode_accuracies(emb: np.ndarray, targets: np.ndarray, ep: Episodes) -> np.ndarray:
    """The accuracy of each of ``ep.episodes`` random N-way 1-shot episodes. The episodes depend only on
    ``targets`` and ``ep`` (not on ``emb``), so two models scored with the same ones are compared pairwise."""
    rng = np.random.default_rng(ep.seed)
    classes = np.unique(targets)
    ways = min(ep.ways, len(classes))
    if ways < 2:
        raise DatasetError("one-shot identification needs at least 2 classes")
    if min(int((targets == c).sum()) for c in classes) < 2:
        raise DatasetError("every class needs at least 2 images (one to enrol, one to identify)")
    accs = []
    for _ in range(ep.episodes):
        chosen = rng.choice(classes, ways, replace=False)
        support = np.array([rng.choice(np.flatnonzero(targets == c)) for c in chosen])
        query = np.setdiff1d(np.flatnonzero(np.isin(targets, chosen)), support)
        pred = chosen[(emb[query] @ emb[support].T).argmax(1)]
        accs.append(float((pred == targets[query]).mean()))
    return np.asarray(accs)


def one_shot(emb: np.ndarray, targets: np.ndarray, ep: Episodes) -> dict[str, float | int]:
    """Mean, spread and extremes of N-way 1-shot accuracy over random episodes."""
    a = episode_accuracies(emb, targets, ep)
    ways = min(ep.ways, len(np.unique(targets)))
    return {"ways": int(ways), "shots": 1, "episodes": len(a), "accuracy": round(float(a.mean()), 5),
            "std": round(float(a.std()), 5), "ci95": round(float(1.96 * a.std() / np.sqrt(len(a))), 5),
            "min": round(float(a.min()), 5), "max": round(float(a.max()), 5)}


def evaluate_embedding(entry: ModelEntry, dataset: Path, options: object) -> dict[str, object]:
    """``visionserve evaluate`` for embed models: N-way 1-shot accuracy (``options``: EvalOptions)."""
    m = entry.manifest
    images = scan_folder(dataset, what="evaluation folder")
    if not images.labelled or images.targets is None or images.classes is None:
        raise DatasetError(f"{dataset} is not an ImageFolder: one sub-folder of images per identity/class")
    prep = Preprocessor(m.input, m.preprocess, draft=False)
    with bar(f"embedding {len(images)} images with {m.name}", len(images)) as advance:
        x = load_tensors(images, prep, advance)
    emb = embeddings(entry, x, threads=getattr(options, "threads", 2))
    ep = Episodes(ways=getattr(options, "ways", 5), episodes=getattr(options, "episodes", 500),
                  seed=getattr(options, "seed", 0))
    result = one_shot(emb, np.asarray(images.targets), ep)
    return {"model": f"{m.name}:{m.version}", "task": "embed", "dataset": str(dataset), "images": len(images),
            "classes": len(images.classes), **result}
