"""CPU time per request of the service's own request path, in-process, A/B between two source trees.

The load test (``benchmarks/ab_trees.py``) measures the whole server; on a shared 2-core machine its throughput
swings by ±50 % from one run to the next. This measures only what a change to the routes, the data plane or
the tasks can change: requests sent one at a time through the ASGI app (``httpx.ASGITransport``: no sockets, no
uvicorn) to models whose inference is small — a 16×16 convolution classifier built here, and the repository's
detector, if given — and the process's CPU time (every thread: decode, batcher, ONNX Runtime, handler) per
request. Each tree runs in its own process, alternated A B B A A B … over ``--rounds``; medians, and the median
of each round's ratio.

    .venv/bin/python benchmarks/request_path.py --baseline /tmp/main-tree [--detector REPO/shapes_detector]

Not a test: read the ratio B / A.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from trees import importable  # noqa: E402

# run inside one tree's process (``python -c CHILD REPO N TARGETS``, cwd = the tree; PKG: trees.importable)
CHILD = r'''
import asyncio, io, json, sys, time
import httpx
from PIL import Image
from PKG.http.app import create_app
from PKG.settings import Settings

repo, n = sys.argv[1], int(sys.argv[2])
targets = json.loads(sys.argv[3])
buf = io.BytesIO()
Image.new("RGB", (64, 48), (120, 30, 200)).save(buf, "PNG")
png = buf.getvalue()
app = create_app(Settings(repository=repo, data_dir=repo + "/.data", log_level="warning"))

async def main():
    out = {}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=60) as c:
            for _ in range(600):
                if (await c.get("/v2/health/ready")).status_code == 200 and \
                        len((await c.get("/v1/models")).json()["models"]) == len(targets):
                    break
                await asyncio.sleep(0.1)
            for kind, model, query in targets:
                url = f"/v1/models/{model}/{kind}{query}"
                for _ in range(max(20, n // 10)):  # warm-up
                    assert (await c.post(url, content=png, headers={"Content-Type": "image/png"})).status_code == 200
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(n):
                    r = await c.post(url, content=png, headers={"Content-Type": "image/png"})
                    assert r.status_code == 200, r.text
                out[f"{kind}:{model}"] = {"cpu_us": 1e6 * (time.process_time() - cpu) / n,
                                          "wall_us": 1e6 * (time.perf_counter() - wall) / n}
    print(json.dumps(out))

asyncio.run(main())
'''


def build_repository(repo: Path, detector: Path | None) -> list[list[str]]:
    sys.path.insert(0, str(ROOT))
    from tests.onnx_builders import write_conv_stack

    write_conv_stack(repo, "tiny", size=16, width=8, depth=1)
    targets = [["classify", "tiny", "?top_k=3"]]
    if detector is not None:
        shutil.copytree(detector, repo / detector.name)
        targets.append(["detect", detector.name, "?score_threshold=0.25"])
    return targets


def run(tree: Path, repo: Path, n: int, targets: list[list[str]]) -> dict[str, dict[str, float]]:
    # no solo session: its spin-waiting threads would bill CPU time that is not the request path's
    env, package = importable(tree)
    env.update({"OMP_NUM_THREADS": "1", "VISIONSERVE_DEFAULTS__SOLO_THREADS": "0"})
    child = CHILD.replace("PKG", package)
    r = subprocess.run([sys.executable, "-c", child, str(repo), str(n), json.dumps(targets)], cwd=tree, env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{tree}: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="source tree A")
    ap.add_argument("--candidate", type=Path, default=ROOT, help="source tree B (default: this tree)")
    ap.add_argument("--detector", type=Path, help="a detector model directory to include (REPO/NAME)")
    ap.add_argument("--requests", type=int, default=400, help="requests per target and round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    trees = {"A": args.baseline.resolve(), "B": args.candidate.resolve()}
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(prefix="request-path-") as tmp:
        repo = Path(tmp) / "repo"
        targets = build_repository(repo, args.detector)
        for i in range(args.rounds):
            for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                for target, fig in run(trees[name], repo, args.requests, targets).items():
                    samples.setdefault(target, {"A": [], "B": []})[name].append(fig)
                    print(f"round {i + 1} {name} {target}: {fig['cpu_us']:.0f} µs CPU, {fig['wall_us']:.0f} µs wall "
                          "per request", flush=True)
    print(f"\nA = {trees['A']}\nB = {trees['B']}\nmedians of {args.rounds} alternated rounds of {args.requests} "
          "sequential requests, in-process\n")
    # B/A of the medians, and the median of each round's B/A (A and B of a round ran back to back: the
    # machine's drift over the whole run cancels in the pair)
    print("| target | A CPU µs/req | B CPU µs/req | B/A | paired B/A "
          "| A wall µs/req | B wall µs/req | B/A | paired B/A |")
    print("| --- |" + " ---: |" * 8)
    for target, by in samples.items():
        row = [target]
        for key in ("cpu_us", "wall_us"):
            a = statistics.median(s[key] for s in by["A"])
            b = statistics.median(s[key] for s in by["B"])
            paired = statistics.median(y[key] / x[key] for x, y in zip(by["A"], by["B"]))
            row += [f"{a:.0f}", f"{b:.0f}", f"{b / a:.3f}", f"{paired:.3f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
