"""Do decode + preprocess really run in parallel with inference? (Pillow and numpy release the GIL.)

Times N images three ways, in one run, medians of repeats:
- decode+preprocess alone (the server's Preprocessor, in the server's decode pool),
- inference alone (batch 1, the server's thread count),
- both at once, as the server runs them: the decode pool feeding an inference thread.
If they overlap, "both" takes less than the sum of the two, approaching the larger one.

    .venv/bin/python benchmarks/overlap.py --repository model_repository
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visionserve.convert.samples import SAMPLES, encode, sample_image  # noqa: E402
from visionserve.service.imaging import Preprocessor  # noqa: E402
from visionserve.service.manifest import Manifest  # noqa: E402
from visionserve.service.repository import versions  # noqa: E402
from visionserve.service.settings import Settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ort-threads", type=int, default=1,
                    help="intra-op threads (1 leaves a core for decoding, as with 2 instances on 2 cores)")
    args = ap.parse_args()
    d = args.repository / args.model / versions(args.repository, args.model)[-1]
    m = Manifest.read(d)
    pre = Preprocessor(m.input, m.preprocess)
    data = [encode(sample_image(SAMPLES[i % len(SAMPLES)]).resize((1600, 1200))) for i in range(args.images)]
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.ort_threads
    sess = ort.InferenceSession(str(d / m.model_file), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = pre(data[0])[0][None]
    sess.run(None, {name: x})
    pool = ThreadPoolExecutor(Settings().decode_threads)

    def decode_only() -> float:
        t = time.perf_counter()
        list(pool.map(lambda b: pre(b)[0], data))
        return time.perf_counter() - t

    def infer_only() -> float:
        t = time.perf_counter()
        for _ in data:
            sess.run(None, {name: x})
        return time.perf_counter() - t

    def both() -> float:
        q: queue.Queue[np.ndarray | None] = queue.Queue()

        def consume() -> None:
            while (item := q.get()) is not None:
                sess.run(None, {name: item[None]})

        t = time.perf_counter()
        worker = threading.Thread(target=consume)
        worker.start()
        for tensor in pool.map(lambda b: pre(b)[0], data):
            q.put(tensor)
        q.put(None)
        worker.join()
        return time.perf_counter() - t

    dec = statistics.median(decode_only() for _ in range(args.repeats))
    inf = statistics.median(infer_only() for _ in range(args.repeats))
    tog = statistics.median(both() for _ in range(args.repeats))
    print(f"{args.images} JPEGs of 1600x1200, {os.cpu_count()} cores, {Settings().decode_threads} decode threads, "
          f"{args.ort_threads} ORT thread(s), medians of {args.repeats}")
    print("| work | seconds |\n| --- | ---: |")
    print(f"| decode + preprocess alone | {dec:.2f} |\n| inference alone | {inf:.2f} |")
    print(f"| sum if they did not overlap | {dec + inf:.2f} |\n| both, as the server runs them | {tog:.2f} |")
    print(f"\noverlap: both together take {tog / (dec + inf):.0%} of the serial sum "
          f"(100 % = no overlap, {max(dec, inf) / (dec + inf):.0%} = perfect)")


if __name__ == "__main__":
    main()
