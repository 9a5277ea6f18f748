"""Model outputs → answers: probabilities and top-k for classifiers (detection lives in detection.py)."""

from __future__ import annotations

import numpy as np

from .manifest import ClassifyPostprocess, Manifest


def probabilities(logits: np.ndarray, activation: str) -> np.ndarray:
    """Scores → probabilities along the last axis."""
    x = logits.astype(np.float32, copy=False)
    if activation == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    return x


def top_k(manifest: Manifest, output: np.ndarray, k: int) -> list[dict[str, object]]:
    """One image's classifier output → the k best ``{index, label, score}``, scores descending."""
    post = manifest.postprocess
    assert isinstance(post, ClassifyPostprocess)
    probs = probabilities(output.reshape(-1), post.activation)
    k = min(k, probs.shape[0])
    idx = np.argpartition(-probs, k - 1)[:k]
    idx = idx[np.argsort(-probs[idx], kind="stable")]
    return [{"index": int(i), "label": manifest.label(int(i)), "score": float(probs[i])} for i in idx]
