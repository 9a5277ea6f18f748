"""Model outputs → answers: probabilities and top-k for classifiers (detection lives in detection.py)."""

from __future__ import annotations

import numpy as np

from .manifest import ClassifyPostprocess, Manifest


def probabilities(logits: np.ndarray, activation: str, dtype: type = np.float32) -> np.ndarray:
    """Scores → probabilities along the last axis, computed in ``dtype``.

    The one implementation of the manifest's ``activation`` / ``score_activation`` (softmax, sigmoid,
    none): classify answers, detection scores (``detection.py``) and the int8 guard's confidence
    (``quantize/guard.py``, in float64) all call it.
    """
    x = logits.astype(dtype, copy=False)
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
