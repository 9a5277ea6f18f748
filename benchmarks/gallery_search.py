"""Brute-force cosine search (what galleries use) against ANN indexes, on random unit vectors.

    python benchmarks/gallery_search.py [--dim 1280] [--sizes 1000,10000,100000] [--queries 200]

For each gallery size: numpy brute force (one matrix-vector product per query, as ``Gallery.search`` does up
to 2 048 items), what galleries do beyond that (``service.gallery_index``: an 8-bit scan in onnxruntime picks
max(64, 4k) candidates, scored exactly from float32),
FAISS ``IndexFlatIP`` (exact, BLAS), FAISS ``IndexScalarQuantizer`` 8-bit (a brute force over int8 codes, a
quarter of the memory traffic) and hnswlib HNSW at two search widths (approximate) where installed
(``pip install visionserve[ann]``, or ``faiss-cpu hnswlib``: an optional extra, not in the serve image).
Reports the build time, the median and p90 latency of one query, and recall@10 against the exact answer.
Brute force and the indexes are timed alternately, query by query, so that machine noise hits them alike.

Random vectors are the hard case for an ANN index (no clusters to exploit); real embeddings give it better
recall at the same settings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visionserve.service.gallery_index import MIN_CANDIDATES, CodeIndex


def unit(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(vectors: np.ndarray) -> Callable[[np.ndarray, int], np.ndarray]:
    def search(q: np.ndarray, k: int) -> np.ndarray:
        sims = vectors @ q
        top = np.argpartition(-sims, k - 1)[:k]
        return top[np.argsort(-sims[top])]

    return search


def indexes(vectors: np.ndarray, use: set[str]) -> dict[str, tuple[float, Callable[[np.ndarray, int], np.ndarray]]]:
    """name → (build seconds, search function)."""
    out: dict[str, tuple[float, Callable[[np.ndarray, int], np.ndarray]]] = {"numpy brute force": (0.0, brute(vectors))}
    dim = vectors.shape[1]
    t = time.perf_counter()
    codes = CodeIndex(vectors)

    def galleries(q: np.ndarray, k: int) -> np.ndarray:
        rows = codes.candidates(q, max(MIN_CANDIDATES, 4 * k))
        sims = (vectors[rows] * q).sum(axis=1)
        return rows[np.argsort(-sims)[:k]]

    out["galleries: 8-bit scan + exact re-score"] = (time.perf_counter() - t, galleries)
    try:
        if "faiss" not in use:
            raise ImportError
        import faiss

        faiss.omp_set_num_threads(1)  # one query at a time, as a request is served; no thread fan-out
        t = time.perf_counter()
        flat = faiss.IndexFlatIP(dim)
        flat.add(vectors)
        out["faiss flat (exact)"] = (time.perf_counter() - t,
                                     lambda q, k: flat.search(q[None], k)[1][0])
        t = time.perf_counter()
        sq8 = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        sq8.train(vectors)
        sq8.add(vectors)
        out["faiss SQ8 flat (int8 codes)"] = (time.perf_counter() - t, lambda q, k: sq8.search(q[None], k)[1][0])
    except ImportError:
        print("faiss not installed or not asked for: skipped")
    try:
        if "hnswlib" not in use:
            raise ImportError
        import hnswlib

        t = time.perf_counter()
        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(max_elements=len(vectors), ef_construction=80, M=16, random_seed=0)
        index.add_items(vectors, num_threads=2)
        index.set_num_threads(1)
        build = time.perf_counter() - t

        def hnsw(ef: int) -> Callable[[np.ndarray, int], np.ndarray]:
            def search(q: np.ndarray, k: int) -> np.ndarray:
                index.set_ef(ef)
                return index.knn_query(q[None], k)[0][0]

            return search

        out["hnswlib M16 ef64"] = (build, hnsw(64))
        out["hnswlib M16 ef400"] = (build, hnsw(400))
    except ImportError:
        print("hnswlib not installed or not asked for: skipped")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1280, help="embedding size (MobileNetV2 features: 1280)")
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--use", default="faiss,hnswlib", help="which ANN libraries to measure (run them apart "
                    "if loading both in one process misbehaves)")
    args = ap.parse_args()
    threadpool_limits(1, user_api="blas")  # one query at a time on one thread, as the server runs it
    rng = np.random.default_rng(0)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        print(f"{n:,} items: building indexes", flush=True)
        vectors = unit(n, args.dim, rng)
        queries = unit(args.queries, args.dim, rng)
        found = indexes(vectors, set(args.use.split(",")))
        exact = brute(vectors)
        truth = [set(exact(q, args.k).tolist()) for q in queries]
        times: dict[str, list[float]] = {name: [] for name in found}
        hits: dict[str, int] = dict.fromkeys(found, 0)
        for i, q in enumerate(queries):  # alternate the methods query by query
            for name, (_, search) in found.items():
                t = time.perf_counter()
                got = search(q, args.k)
                times[name].append(time.perf_counter() - t)
                hits[name] += len(truth[i] & set(np.asarray(got).tolist()))
        for name, (build_s, _) in found.items():
            ts = sorted(times[name])
            rows.append((n, name, build_s, statistics.median(ts) * 1e3, ts[int(0.9 * len(ts))] * 1e3,
                         hits[name] / (args.k * len(queries))))
            print(f"  {n:,} items, {name}: {rows[-1][3]:.3f} ms median, recall {rows[-1][5]:.3f}", flush=True)
        del found, vectors
    print(f"\n{args.queries} queries, dim {args.dim}, top-{args.k}, one query at a time on one thread\n")
    print(f"| items | method | build s | median ms | p90 ms | recall@{args.k} |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for n, name, build_s, med, p90, recall in rows:
        print(f"| {n:,} | {name} | {build_s:.1f} | {med:.3f} | {p90:.3f} | {recall:.3f} |")


if __name__ == "__main__":
    main()
