"""The gallery search: the 8-bit candidate scan plus exact re-scoring answers as the float32 brute force does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from visionserve.service.galleries import Gallery, GalleryStore, Item
from visionserve.service.gallery_index import EXACT_ITEMS, TAIL_ITEMS, TEMPLATE, CodeIndex


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


def clustered(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    centres = unit(rng.standard_normal((40, dim)))
    return unit(centres[rng.integers(0, 40, n)] + 0.35 * rng.standard_normal((n, dim)))


def assert_searches_like_brute_force(g: Gallery, queries: np.ndarray) -> None:
    for q in queries:
        exact = g.vectors @ q
        want = np.argsort(-exact, kind="stable")[:10]
        got = g.search(q, 10)
        assert [it.item for it, _ in got] == [g.items[i].item for i in want]
        np.testing.assert_allclose([s for _, s in got], exact[want], rtol=0, atol=1e-6)


def test_enrolments_keep_the_index_and_score_the_new_items_exactly() -> None:
    rng = np.random.default_rng(5)
    vectors = clustered(rng, EXACT_ITEMS + 300, 64)
    g = gallery(vectors).warm()
    built = g.codes
    extra = clustered(rng, TAIL_ITEMS + 1, 64)
    for i, v in enumerate(extra[:TAIL_ITEMS]):  # up to TAIL_ITEMS appended: the same index, no rebuild
        g = g.with_item(Item(f"new{i}", "x", "0" * 64), v)
    assert g.codes is built and len(built) == len(vectors)
    # queries near the appended items, which only the exact tail can find, and near the old ones
    assert_searches_like_brute_force(g, unit(np.concatenate([extra[:20], vectors[:20]])
                                             + 0.2 * rng.standard_normal((40, 64))))
    assert g.search(extra[7], 1)[0][0].item == "new7"
    g = g.with_item(Item("one-too-many", "x", "0" * 64), extra[-1])
    assert g.codes is not built and len(g.codes) == len(g.items)  # rebuilt whole
    assert_searches_like_brute_force(g, extra[-3:])


@pytest.mark.parametrize("change", ["delete", "replace", "reembed"])
def test_changing_an_indexed_item_rebuilds_the_index(change: str) -> None:
    rng = np.random.default_rng(6)
    g = gallery(clustered(rng, EXACT_ITEMS + 50, 64)).warm()
    g = g.with_item(Item("appended", "x", "0" * 64), unit(rng.standard_normal(64))).warm()  # carries the index
    moved = unit(rng.standard_normal(64))
    if change == "delete":  # every row after item 0 moves up by one: an index carried over would be off by one
        g = g.without("i0")
    elif change == "replace":
        g = g.with_item(Item("i3", "x", "0" * 64), moved)
    else:
        g = g.reembedded("2", unit(g.vectors[:, ::-1].copy()))
    assert len(g.codes) == len(g.items)
    assert_searches_like_brute_force(g, unit(g.vectors[rng.integers(0, len(g.items), 20)]
                                             + 0.2 * rng.standard_normal((20, 64))))
    if change == "replace":
        assert g.search(moved, 1)[0][0].item == "i3"


def test_store_enrolment_carries_the_index_and_still_sees_other_writers(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    a, b = GalleryStore(tmp_path), GalleryStore(tmp_path)  # two server processes sharing one data directory
    a.update("g", lambda cur: gallery(clustered(rng, EXACT_ITEMS + 10, 32)))
    built = a.load("g").warm().codes
    new = unit(rng.standard_normal((3, 32)))
    a.update("g", lambda cur: cur.with_item(Item("x1", "x", "0" * 64), new[0]))
    assert a.load("g").codes is built  # the cached state was changed, not a re-read copy: no rebuild
    b.update("g", lambda cur: cur.with_item(Item("x2", "x", "0" * 64), new[1]))
    seen = a.update("g", lambda cur: cur.with_item(Item("x3", "x", "0" * 64), new[2]))
    assert seen is not None and [it.item for it in seen.items[-3:]] == ["x1", "x2", "x3"]  # b's write was read
    assert_searches_like_brute_force(a.load("g"), new)
