"""One softmax/sigmoid for the server's classify and detect answers and for the int8 guard.

Before, there were three: ``service/postprocess.py``, ``service/detection.py`` and ``quantize/guard.py`` (the
last always softmax, whatever the manifest said). The old formulas are written out here as references:
the shared function gives bit-identical numbers where the old ones ran, and the guard now follows the
manifest's activation.
"""

from __future__ import annotations

import numpy as np
import pytest

from visionserve.quantize import guard
from visionserve.service import detection, postprocess


def old_softmax_last_axis(x: np.ndarray) -> np.ndarray:  # postprocess.py and detection.py, float32
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def old_guard_softmax(x: np.ndarray) -> np.ndarray:  # quantize/guard.py, called on float64 copies
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture
def logits() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 4, (64, 1000)).astype(np.float32)
    x[0] = 0.0  # a flat row
    x[1, 3] = 80.0  # a near one-hot row (exp would overflow without the max shift)
    return x


def test_detection_uses_the_shared_function() -> None:
    assert detection._activate is postprocess.probabilities


@pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
def test_float32_answers_are_bit_identical_to_the_old_formulas(logits: np.ndarray, activation: str) -> None:
    ref = {"softmax": old_softmax_last_axis(logits), "sigmoid": 1.0 / (1.0 + np.exp(-logits)),
           "none": logits}[activation]
    got = postprocess.probabilities(logits, activation)
    assert got.dtype == np.float32 and np.array_equal(got, ref)
    scores = logits[:4].reshape(4, 250, 4)  # detection's [A, C] per image, float32 as decode passes them
    assert np.array_equal(detection._activate(scores[0], activation),
                          {"softmax": old_softmax_last_axis(scores[0]),
                           "sigmoid": 1.0 / (1.0 + np.exp(-scores[0])), "none": scores[0]}[activation])


def test_the_guard_confidence_is_the_old_float64_softmax(logits: np.ndarray) -> None:
    got = guard.confidence(logits, "softmax")
    assert got.dtype == np.float64
    assert np.array_equal(got, old_guard_softmax(logits.astype(np.float64)).max(1))


def test_the_guard_follows_the_manifest_activation() -> None:
    # a multi-label (sigmoid) head: one logit of 3 is a confident 0.95, but softmax over 1000 near-equal
    # classes would call it unconfident; and "none" reads the outputs as probabilities already
    x = np.full((30, 1000), 2.9, np.float32)
    x[:, 0] = 3.0
    assert (guard.confidence(x, "softmax") < guard.CONFIDENT).all()
    assert (guard.confidence(x, "sigmoid") > 0.95).all()
    f_soft = guard.fidelity(x, x, activation="softmax")
    f_sig = guard.fidelity(x, x, activation="sigmoid")
    assert f_soft.confident_images == 0 and f_sig.confident_images == 30
    p = np.full((30, 4), 0.1, np.float32)
    p[:, 2] = 0.7
    assert np.allclose(guard.confidence(p, "none"), 0.7)


def test_activation_of_reads_the_manifest() -> None:
    from visionserve.service.manifest import ClassifyPostprocess

    class M:
        postprocess = ClassifyPostprocess(output="logits", activation="sigmoid")

    assert guard.activation_of(M()) == "sigmoid"
    assert guard.activation_of(object()) == "softmax"
