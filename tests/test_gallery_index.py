"""The gallery search: the 8-bit candidate scan plus exact re-scoring answers as the float32 brute force does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from visionserve.service.galleries import Gallery, Item
from visionserve.service.gallery_index import EXACT_ITEMS, TEMPLATE, CodeIndex


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def gallery(vectors: np.ndarray) -> Gallery:
    return Gallery("g", "m", "1", tuple(Item(f"i{i}", f"l{i % 7}", "0" * 64) for i in range(len(vectors))), vectors)


def test_template_is_the_scan_graph() -> None:
    model = onnx.load_from_string(TEMPLATE)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul",
                                                    "TopK"]
    assert {i.name for i in model.graph.initializer} == {"codes", "scales"}
    assert [i.name for i in model.graph.input] == ["query", "k"]
    assert [o.name for o in model.graph.output] == ["best", "top"]


@pytest.mark.parametrize("dim", [64, 1280])
def test_large_gallery_search_equals_brute_force(dim: int) -> None:
    rng = np.random.default_rng(dim)
    n = EXACT_ITEMS * 2
    # clustered, as real embeddings are: 40 centres, items scattered around them (near-ties are common)
    centres = unit(rng.standard_normal((40, dim)))
    vectors = unit(centres[rng.integers(0, 40, n)] + 0.35 * rng.standard_normal((n, dim)))
    g = gallery(vectors)
    assert len(g.items) > EXACT_ITEMS  # the index path, not the float scan
    for q in unit(vectors[rng.integers(0, n, 40)] + 0.3 * rng.standard_normal((40, dim))):
        exact = vectors @ q
        want = np.argsort(-exact, kind="stable")[:10]
        got = g.search(q, 10)
        assert [it.item for it, _ in got] == [f"i{i}" for i in want]
        np.testing.assert_allclose([s for _, s in got], exact[want], rtol=0, atol=1e-6)  # exact, not 8-bit


def test_codes_approximate_cosine_and_survive_zero_vectors() -> None:
    rng = np.random.default_rng(1)
    vectors = unit(rng.standard_normal((500, 256)))
    vectors[7] = 0.0  # a degenerate item must not poison the scales
    index = CodeIndex(vectors)
    q = vectors[3]
    top = index.candidates(q, 5)
    assert 3 in top and len(top) == 5
    assert len(index.candidates(q, 10_000)) == 500  # never more candidates than items


def test_small_gallery_is_searched_exactly_and_k_is_capped() -> None:
    rng = np.random.default_rng(2)
    vectors = unit(rng.standard_normal((5, 32)))
    got = gallery(vectors).search(vectors[2], 10)
    assert len(got) == 5 and got[0][0].item == "i2"
    assert got[0][1] == pytest.approx(1.0, abs=1e-6)
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
