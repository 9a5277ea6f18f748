"""Explanations (issue 17): how long one takes, whether it points at the object, and what it costs live traffic.

One ``visionserve serve`` with its defaults over the repository, then, in one run:

1. **time**: one explanation of examples/images/cat.jpg per model and method, server otherwise idle; median
   of ``--repeats`` (default settings: 144 occlusion patches, 128 RISE masks, 224-pixel MobileNetV2).
2. **pointing game**: ``--trials`` composites (the cat's face, 112 px, pasted at a random place on a 320 x 320
   noise canvas): is the saliency peak on the face, and the saliency mass inside it ÷ its area share.
3. **live p99**: classify requests (``visionserve loadtest``: one client at a time, and an open loop with
   Poisson arrivals) alone, then with explanations running back to back beside them, alternated A B A B over
   ``--rounds``; medians.

    .venv/bin/python benchmarks/explain.py --repository model_repository [--load c:1,rate:30] [--rounds 3]

Not a test: read the table. Everything stays on 127.0.0.1 and every loop is bounded.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from hdrh.histogram import HdrHistogram

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.server import CAT, start_server, stop_server  # noqa: E402
from tests.composites import cat_object, composite, mass_ratio, pointing_hit  # noqa: E402


def explain(url: str, model: str, data: bytes, params: str) -> tuple[float, dict]:  # type: ignore[type-arg]
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/models/{model}/explain?{params}", content=data, timeout=120)
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()


def timing(url: str, models: list[str], repeats: int) -> list[str]:
    rows = ["| model | method | masked images | median s | min s |", "| --- | --- | --- | --- | --- |"]
    data = CAT.read_bytes()
    for model in models:
        for method in ("occlusion", "rise"):
            explain(url, model, data, f"method={method}")  # warm
            runs = [explain(url, model, data, f"method={method}") for _ in range(repeats)]
            secs = [t for t, _ in runs]
            rows.append(f"| {model} | {method} | {runs[0][1]['masks']} | {statistics.median(secs):.2f} | "
                        f"{min(secs):.2f} |")
    return rows


def pointing(url: str, models: list[str], trials: int) -> list[str]:
    obj = cat_object(112)
    buf = io.BytesIO()
    obj.save(buf, format="PNG")
    rows = ["| model | method | trials | peak on the object | mass ratio median | min | trials with ratio ≥ 2 |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for model in models:
        target = httpx.post(f"{url}/v1/models/{model}/classify", content=buf.getvalue(),
                            timeout=30).json()["predictions"][0]["index"]
        for method in ("occlusion", "rise"):
            rng = np.random.default_rng(2026)
            hits, ratios = 0, []
            for _ in range(trials):
                data, box = composite(rng, obj)
                _, body = explain(url, model, data, f"method={method}&target={target}")
                g = np.asarray(body["saliency"])
                hits += pointing_hit(g, box, 320, 320)
                ratios.append(mass_ratio(g, box, 320, 320))
            rows.append(f"| {model} | {method} | {trials} | {hits / trials:.0%} | {statistics.median(ratios):.2f} | "
                        f"{min(ratios):.2f} | {sum(r >= 2 for r in ratios) / trials:.0%} |")
    return rows


def live_p99(url: str, model: str, load: str, duration: float, tmp: Path, tag: str) -> dict:  # type: ignore[type-arg]
    """``load``: ``rate:R`` (open loop, Poisson) or ``c:N`` (closed loop, N in flight)."""
    out = tmp / f"{tag}.json"
    kind, value = load.split(":")
    shape = ["--rate", value, "--arrival", "poisson"] if kind == "rate" else ["--concurrency", value]
    subprocess.run([sys.executable, "-m", "visionserve.service", "loadtest", url, "--model", model, "--image", str(CAT),
                    *shape, "--duration", str(duration), "--json", str(out),
                    "-q", "--timeout", "30"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   timeout=duration + 120)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def pool(runs: list[dict]) -> HdrHistogram:  # type: ignore[type-arg]
    """The latency histograms of several rounds added up: a p99 over all their requests."""
    total = HdrHistogram.decode(runs[0]["histogram_us"])
    for r in runs[1:]:
        total.add(HdrHistogram.decode(r["histogram_us"]))
    return total


def beside(url: str, model: str, method: str, stop: threading.Event, done: list[float]) -> None:
    """Explanations back to back until ``stop`` (each bounded by its own deadline)."""
    data = CAT.read_bytes()
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = client.post(f"{url}/v1/models/{model}/explain?method={method}", content=data)
            if r.status_code == 200:
                done.append(time.perf_counter() - t0)


def interference(url: str, model: str, method: str, load: str, duration: float, rounds: int) -> list[str]:
    alone, with_, finished = [], [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        live_p99(url, model, load, 3, tmp, "warm")
        for i in range(rounds):
            alone.append(live_p99(url, model, load, duration, tmp, f"a{i}"))
            stop, done = threading.Event(), []  # type: ignore[var-annotated]
            t = threading.Thread(target=beside, args=(url, model, method, stop, done), daemon=True)
            t.start()
            time.sleep(0.5)
            with_.append(live_p99(url, model, load, duration, tmp, f"b{i}"))
            stop.set()
            t.join(150)
            finished.append(len(done) / (duration + 0.5))
    what = f"{load[5:]} req/s, Poisson" if load.startswith("rate:") else f"{load[2:]} in flight, closed loop"
    rows = [f"| live classify ({what}) | requests | p50 ms | p99 ms (all rounds pooled) | median of the rounds' p99 "
            "ms | p99 ms of each round | live queue wait, mean ms (server) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    pooled = {}
    for name, runs in (("alone", alone), (f"beside back-to-back {method} explanations", with_)):
        h = pool(runs)
        pooled[name] = h.get_value_at_percentile(99) / 1000
        each = ", ".join(f"{r['latency_ms']['p99']:.0f}" for r in runs)
        waits = [r["server"]["queue_wait_ms_mean"] for r in runs if (r.get("server") or {}).get("queue_wait_ms_mean")
                 is not None]
        wait = f"{statistics.median(waits):.2f}" if waits else "n/a"
        rows.append(f"| {name} | {h.get_total_count()} | {h.get_value_at_percentile(50) / 1000:.1f} | "
                    f"{pooled[name]:.1f} | {statistics.median(r['latency_ms']['p99'] for r in runs):.1f} | {each} | "
                    f"{wait} |")
    p_a, p_b = pooled.values()
    # each round's beside / alone: the two halves of a round share the machine's mood, rounds far apart may not
    paired = sorted(b["latency_ms"]["p99"] / a["latency_ms"]["p99"] for a, b in zip(alone, with_))
    q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (paired[0],) * 3
    rows.append(f"\nlive p99 ratio (beside / alone, pooled): {p_b / p_a:.3f}; median of the rounds' own ratios: "
                f"{statistics.median(paired):.3f} (quartiles {q1:.3f}-{q3:.3f}); explanations finished beside the "
                f"live load: {statistics.median(finished):.2f} per second")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--models", default="mobilenet_v2,mobilenet_v2_int8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--load", default="c:1,rate:30", help="live loads: c:N (closed loop) or rate:R (open loop)")
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--method", default="rise", help="explanations beside the live load")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: time,pointing,live")
    args = ap.parse_args()
    models = args.models.split(",")
    skip = set(filter(None, args.skip.split(",")))
    with tempfile.TemporaryDirectory() as d:
        server = start_server(args.repository, Path(d))
        try:
            if "time" not in skip:
                print("\n".join(["## One explanation of cat.jpg (451 x 300), server otherwise idle", "",
                                 *timing(server.url, models, args.repeats), ""]), flush=True)
            if "pointing" not in skip:
                print("\n".join(["## Pointing game: the cat's face (112 px) on 320 x 320 noise", "",
                                 *pointing(server.url, models, args.trials), ""]), flush=True)
            for load in args.load.split(",") if "live" not in skip else []:
                print("\n".join([f"## Live traffic ({load}) beside explanations", "",
                                 *interference(server.url, models[0], args.method, load, args.duration,
                                               args.rounds), ""]), flush=True)
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
