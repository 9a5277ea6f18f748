"""A/B of two source trees serving the same repository: is the candidate's serving path slower?

Serves ``--repository`` from the baseline tree (A, e.g. ``git -C /work/main archive HEAD | tar -x -C /tmp/a``)
and from the candidate tree (B, default: this one), both at once on two ports (an idle server costs nothing),
and drives them in turn with ``visionserve loadtest`` (closed loop) — A B A B … for every target, ``--runs``
times — so that drift in the machine's load falls on both alike. Prints the medians and the ratio B / A per
target of throughput, latency and the server process's CPU time per request (its own user + system time ÷
the requests it counted: the least sensitive to other processes on a shared machine). Not a test: read the
ratios, and the spread of the runs beside them.

    .venv/bin/python benchmarks/ab_trees.py --baseline /tmp/a --repository model_repository \\
        --targets classify:mobilenet_v2,detect:shapes_detector --runs 3 --duration 6 --concurrency 8

Everything stays on 127.0.0.1; every run is bounded (server start 180 s, each load run ``--duration`` +
warm-up + 60 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from server import start_server  # noqa: E402
from trees import importable  # noqa: E402

IMAGE = ROOT / "examples" / "images" / "cat.jpg"


def start(tree: Path, repository: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``visionserve serve`` from ``tree``'s own code (``trees.importable``)."""
    env, package = importable(tree)
    server = start_server(repository, tmp, env=env, module=package, cwd=tree, timeout=180)
    return server.process, server.url


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, every thread of it (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def answered(url: str) -> float:
    """Requests the server has counted (``visionserve_requests_total``, every label)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("visionserve_requests_total{"))


def load(url: str, pid: int, kind: str, model: str, args: argparse.Namespace, out: Path) -> dict:
    """One closed-loop run of the candidate tree's load generator against ``url``, and the server's CPU time
    per request over it (warm-up included: CPU time and the server's request count cover the same span)."""
    cpu0, n0 = cpu_seconds(pid), answered(url)
    cmd = [sys.executable, "-m", "visionserve.service", "loadtest", url, "--model", model, "--kind", kind, "--image",
           str(args.image), "--concurrency", str(args.concurrency), "--duration", str(args.duration),
           "--warmup", str(args.warmup), "--json", str(out), "-q", "--no-metrics"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True,
                   timeout=args.duration + args.warmup + 60)
    cpu1, n1 = cpu_seconds(pid), answered(url)
    data = json.loads(out.read_text())
    return {"rps": data["throughput_rps"], "p50": data["latency_ms"]["p50"], "p99": data["latency_ms"]["p99"],
            "cpu_ms": 1000 * (cpu1 - cpu0) / max(n1 - n0, 1),
            "errors": sum((data.get("errors") or {}).values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="source tree A (e.g. an archive of main)")
    ap.add_argument("--candidate", type=Path, default=ROOT, help="source tree B (default: this tree)")
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--targets", default="classify:mobilenet_v2,detect:shapes_detector",
                    help="kind:model pairs, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="runs per tree and target (A B A B …)")
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--image", type=Path, default=IMAGE)
    ap.add_argument("--json", type=Path, help="write every run here")
    args = ap.parse_args()
    targets = [tuple(t.split(":", 1)) for t in args.targets.split(",") if t.strip()]
    trees = {"A": args.baseline.resolve(), "B": args.candidate.resolve()}
    runs: dict[str, dict[str, list[dict]]] = {f"{k}:{m}": {"A": [], "B": []} for k, m in targets}
    with tempfile.TemporaryDirectory(prefix="ab-trees-") as tmp:
        servers = {}
        try:
            for name, tree in trees.items():
                servers[name] = start(tree, args.repository.resolve(), Path(tmp))
            for i in range(args.runs):
                for kind, model in targets:
                    # alternate which tree goes first, so neither always follows the other
                    for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
                        proc, url = servers[name]
                        r = load(url, proc.pid, kind, model, args, Path(tmp) / f"{name}-{kind}-{i}.json")
                        runs[f"{kind}:{model}"][name].append(r)
                        print(f"run {i + 1} {kind}:{model} {name}: {r['rps']:.1f} req/s, p50 {r['p50']:.1f} ms, "
                              f"p99 {r['p99']:.1f} ms, server CPU {r['cpu_ms']:.2f} ms/request, errors {r['errors']}",
                              flush=True)
        finally:
            for proc, _ in servers.values():
                stop(proc)
    print(f"\nA = {trees['A']}\nB = {trees['B']}\nmedians of {args.runs} alternated runs, c={args.concurrency}, "
          f"{args.duration:g} s each\n")
    print("| target | A req/s | B req/s | B/A | A p50 ms | B p50 ms | B/A | A p99 ms | B p99 ms | B/A "
          "| A CPU ms/req | B CPU ms/req | B/A |")
    print("| --- |" + " ---: |" * 12)
    for target, by in runs.items():
        row = [target]
        for key in ("rps", "p50", "p99", "cpu_ms"):
            a = statistics.median(r[key] for r in by["A"])
            b = statistics.median(r[key] for r in by["B"])
            row += [f"{a:.1f}", f"{b:.1f}", f"{b / a:.3f}"]
        print("| " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(json.dumps({"trees": {k: str(v) for k, v in trees.items()}, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
