"""What one enrolment costs a large gallery, and what a search costs with items enrolled since the last index.

    python benchmarks/gallery_enrol.py                      # 10 000 and 100 000 × 1280, ~1 min, ~3 GB
    python benchmarks/gallery_enrol.py --sizes 10000 --dim 512

In process, no server, one BLAS thread (as ``visionserve serve`` runs). Random unit vectors; the store writes
under a temporary directory. Prints two tables: an enrolment (``GalleryStore.update`` appending one item: read
or reuse the state, append, write atomically) and the build of the index the next search needs; then the
median and p90 of 200 searches (top 5) with 0 … 2 048 items scored exactly after the carried-over index.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from visionserve.service.galleries import Gallery, GalleryStore, Item


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def items(n: int) -> tuple[Item, ...]:
    return tuple(Item(f"i{i}", "l", "0" * 64) for i in range(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--enrolments", type=int, default=3, help="timed enrolments per size (median)")
    args = ap.parse_args()
    threadpool_limits(1)
    rng = np.random.default_rng(0)
    enrol_rows, search_rows = [], []
    for n in map(int, args.sizes.split(",")):
        vectors = unit(rng.standard_normal((n + 2048, args.dim)))
        with tempfile.TemporaryDirectory() as d:
            store = GalleryStore(Path(d))
            store.update("g", lambda cur, n=n, v=vectors: Gallery("g", "m", "1", items(n), v[:n]))
            started = time.perf_counter()
            store.load("g").warm()
            first = time.perf_counter() - started
            enrol, warm = [], []
            for k in range(args.enrolments):
                new = vectors[n + k]
                started = time.perf_counter()
                store.update("g", lambda cur, k=k, new=new: cur.with_item(Item(f"new{k}", "l", "0" * 64), new))
                enrol.append(time.perf_counter() - started)
                started = time.perf_counter()
                store.load("g").warm()
                warm.append(time.perf_counter() - started)
        enrol_rows.append(f"| {n} | {first * 1e3:.0f} | {np.median(enrol) * 1e3:.0f} | {np.median(warm) * 1e3:.1f} |")
        base = Gallery("g", "m", "1", items(n), vectors[:n]).warm()
        queries = unit(rng.standard_normal((200, args.dim)))
        for tail in (0, 1, 256, 512, 2048):
            g = Gallery("g", "m", "1", items(n + tail), vectors[:n + tail], base=base.codes) if tail else base
            times = []
            for q in queries:
                started = time.perf_counter()
                g.search(q, 5)
                times.append(time.perf_counter() - started)
            med, p90 = np.median(times) * 1e3, np.percentile(times, 90) * 1e3
            search_rows.append(f"| {n} | {tail} | {med:.2f} | {p90:.2f} |")
    print(f"\n{args.dim}-D, one thread\n")
    print("| items | index build (ms) | enrolment (ms, median) | index build after it (ms) |")
    print("| ---: | ---: | ---: | ---: |\n" + "\n".join(enrol_rows))
    print("\n| items indexed | enrolled since (exact) | search median (ms) | p90 (ms) |\n| ---: | ---: | ---: | ---: |")
    print("\n".join(search_rows))


if __name__ == "__main__":
    main()
