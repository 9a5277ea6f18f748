"""How close does the service get to the in-process ceiling, and what does batching buy?

- **ceiling**: decode + preprocess (the server's own Preprocessor, in a thread pool of the same size as the
  server's) pipelined with ONNX Runtime inference at the best batch size, same threads, no HTTP.
- **service**: ``visionserve serve`` over HTTP, closed loop (``loadtest``) at concurrency 1, 4 and at
  saturation.
- **naive**: the same server with ``max_batch_size 1`` (one inference per request, no batching).

Throughputs are medians over ``--repeats`` runs; ratios come from this one run. Not a test: the machine is
shared and noisy, so read the ratios, not the absolute numbers.

    .venv/bin/python benchmarks/serve_vs_ceiling.py --repository model_repository
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convert.samples import SAMPLES, encode, sample_image  # noqa: E402
from loadtest.config import LoadConfig  # noqa: E402
from loadtest.runner import run_load  # noqa: E402
from service.repository import load_entry, versions  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.conftest import start_server, stop_server  # noqa: E402


def images() -> list[bytes]:
    return [encode(sample_image(n)) for n in SAMPLES]


def ceiling(entry_dir: Path, data: list[bytes], batch: int, seconds: float, threads: int, decoders: int) -> float:
    """Images/s of decode+preprocess pipelined with inference (+ box decoding and NMS for detectors)."""
    from service import detection
    from service.imaging import Preprocessor
    from service.manifest import Manifest

    m = Manifest.read(entry_dir)
    pre = Preprocessor(m.input, m.preprocess)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(entry_dir / m.model_file), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: np.zeros((batch, *m.input.shape[1:]), np.float32)})
    done = 0
    with ThreadPoolExecutor(decoders) as pool:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            stream = pool.map(pre, (data[i % len(data)] for i in range(batch * 8)))
            chunk: list[tuple[np.ndarray, object]] = []
            for t in stream:  # decoding of later images overlaps inference of earlier batches
                chunk.append(t)
                if len(chunk) == batch:
                    outs = sess.run(None, {name: np.stack([x for x, _ in chunk])})
                    if m.task == "detect":
                        names = [o.name for o in sess.get_outputs()]
                        for i, (_, geo) in enumerate(chunk):
                            detection.decode(m, {n: o[i] for n, o in zip(names, outs)}, geo)
                    done += batch
                    chunk = []
        return done / (time.perf_counter() - start)


def service(url: str, model: str, kind: str, data: list[bytes], concurrency: int, seconds: float
            ) -> tuple[float, float, float]:
    r = run_load(LoadConfig(url=url, model=model, kind=kind, images=data, concurrency=concurrency,
                            duration=seconds, warmup=1.0, metrics=False))
    lat = r.latency_ms
    if r.error_count:
        print(f"  warning: {r.error_count} errors at concurrency {concurrency}: {r.errors}", file=sys.stderr)
    return r.throughput_rps, lat.get("p50") or float("nan"), lat.get("p99") or float("nan")


def median_runs(fn, repeats: int):  # type: ignore[no-untyped-def]
    runs = [fn() for _ in range(repeats)]
    if isinstance(runs[0], tuple):
        return tuple(statistics.median(col) for col in zip(*runs))
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--instances", type=int, default=2, help="ONNX Runtime sessions per model in the service")
    ap.add_argument("--saturation", type=int, default=32, help="concurrency used as 'saturation'")
    args = ap.parse_args()

    v = versions(args.repository, args.model)
    if not v:
        sys.exit(f"no model {args.model} in {args.repository} (run `make models`)")
    entry = load_entry(args.repository / args.model / v[-1])
    threads = os.cpu_count() or 1
    decoders = Settings().decode_threads
    kind = entry.manifest.task  # classify or detect
    data = images() if kind == "classify" else [
        p.read_bytes() for p in sorted((ROOT / "tests" / "data" / "shapes" / "images").glob("*.jpg"))]
    print(f"{args.model} v{v[-1]} ({kind}) | {threads} CPU threads for ORT, {decoders} decode threads | "
          f"{len(data)} JPEGs cycled | medians of {args.repeats} x {args.seconds:.0f} s", flush=True)

    best_b, best = 1, 0.0
    ceil_rows = []
    for b in (1, 4, 8, 16, 32):
        ips = median_runs(lambda b=b: ceiling(entry.directory, data, b, args.seconds / 2, threads, decoders),
                          args.repeats)
        ceil_rows.append((b, ips))
        if ips > best:
            best_b, best = b, ips
    print("ceiling (in-process): " + ", ".join(f"batch {b}: {ips:.1f}/s" for b, ips in ceil_rows), flush=True)

    rows = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    s = start_server(args.repository, tmp, env={"VISIONSERVE_DEFAULTS__INSTANCES": str(args.instances)})
    try:
        for c in (1, 4, args.saturation):
            rps, p50, p99 = median_runs(lambda c=c: service(s.url, args.model, kind, data, c, args.seconds),
                                        args.repeats)
            rows.append((f"service ({args.instances} instance(s)), concurrency {c}", rps, p50, p99))
    finally:
        stop_server(s)
    s = start_server(args.repository, tmp, env={"VISIONSERVE_DEFAULTS__MAX_BATCH_SIZE": "1",
                                                 "VISIONSERVE_DEFAULTS__INSTANCES": str(args.instances)})
    try:
        rps, p50, p99 = median_runs(lambda: service(s.url, args.model, kind, data, args.saturation, args.seconds),
                                    args.repeats)
        rows.append((f"naive (no batching), concurrency {args.saturation}", rps, p50, p99))
    finally:
        stop_server(s)

    print()
    print(f"| setup | images/s | p50 ms | p99 ms | vs ceiling ({best:.1f}/s at batch {best_b}) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| in-process ceiling, batch {best_b} | {best:.1f} | | | 1.00 |")
    for name, rps, p50, p99 in rows:
        print(f"| {name} | {rps:.1f} | {p50:.1f} | {p99:.1f} | {rps / best:.2f} |")
    naive = rows[-1][1]
    sat = rows[2][1]
    print(f"\nbatching buys {sat / naive:.2f}x over one inference per request at concurrency {args.saturation}")


if __name__ == "__main__":
    main()
