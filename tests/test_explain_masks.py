"""RISE's fast saliency sum (grouped by column shift) equals its definition, mask by mask."""

from __future__ import annotations

import numpy as np
import pytest

from visionserve.service.explain import Region, Rise


@pytest.mark.parametrize(("shape", "region"), [((224, 224), Region(0, 0, 224, 224)),
                                               ((224, 224), Region(10, 30, 200, 190)),
                                               ((128, 200), Region(0, 4, 160, 120))])
def test_rise_saliency_is_the_score_weighted_mean_of_its_masks(shape: tuple[int, int], region: Region) -> None:
    h, w = shape
    rise = Rise(h, w, region, 64, seed=3)
    scores = np.random.default_rng(1).random(64)
    centred = scores - scores.mean()
    masks = np.stack([rise(i) for i in range(64)]).astype(np.float64)
    expected = np.tensordot(centred, masks, axes=1) / np.maximum(masks.sum(axis=0), 1e-6)
    got = rise.saliency(scores, base=1.0)
    np.testing.assert_allclose(got, expected, atol=1e-7)
    outside = np.ones(shape, dtype=bool)
    outside[region.y0:region.y1, region.x0:region.x1] = False
    assert np.all(got[outside] == 0) and np.all(masks[:, outside] == 1)  # every mask keeps what is not image
    assert 0.3 < masks[:, ~outside].mean() < 0.7  # about half of the image kept
