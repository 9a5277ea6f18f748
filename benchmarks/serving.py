"""Serving efficiency against the physical limit and an independent naive server (issue 12).

What it measures, in one run, on this machine:

- **physical limit** = usable cores ÷ (CPU ms per image of decode + preprocess, as the server does it, + CPU
  ms per image of inference at the best batch on one thread). No server can beat it: it is the work itself.
- **naive**: ``benchmarks/naive_server.py``, an independent FastAPI + uvicorn server (one ONNX Runtime
  session on every core, one inference per request in the thread pool, Pillow + numpy preprocessing).
- **visionserve**: ``visionserve serve`` with its defaults, on a repository holding only the model measured.

Load comes from ``wrk`` (closed loop, one client thread, the same JPEG in every POST) at 1, 4 and 32
connections, servers alone in turn and alternated A B A B over ``--rounds``; figures are medians over the
rounds. Then an open loop (``visionserve loadtest --rate``) at 0.8 × visionserve's saturation rate, RSS of
each server after warm-up and after load, CPU ms per request (the server process's own CPU time ÷ requests),
and visionserve's int8 throughput pinned to one core vs two (``taskset``). Not a test: read the ratios.

    .venv/bin/python benchmarks/serving.py --repository model_repository [--duration 8] [--rounds 2]

Needs ``wrk`` (``apt-get install -y wrk``) and ``taskset``; everything stays on 127.0.0.1, every run is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visionserve.service.cpus import available_cpus  # noqa: E402
from visionserve.service.imaging import Preprocessor  # noqa: E402
from visionserve.service.manifest import Manifest  # noqa: E402
from visionserve.service.repository import valid_entries  # noqa: E402

IMAGE = ROOT / "examples" / "images" / "cat.jpg"
LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "image/jpeg"
local f = io.open("{image}", "rb")
wrk.body = f:read("*all")
f:close()
"""


def free_port() -> int:
    """A port nothing listens on now (benchmarks do not import the tests' fixtures)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- in-process: the physical limit ----------------------------------------------------------------------
def cpu_ms(fn, repeats: int, rounds: int = 5) -> float:  # type: ignore[no-untyped-def]
    """Median CPU milliseconds of one call (this thread's CPU time, so other load does not count)."""
    vals = []
    for _ in range(rounds):
        t = time.thread_time()
        for _ in range(repeats):
            fn()
        vals.append((time.thread_time() - t) / repeats * 1000)
    return statistics.median(vals)


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@dataclass
class Limit:
    pre_ms: float
    infer_ms: dict[int, float]  # batch -> CPU ms per image on one thread
    single_ms: float  # wall ms: decode + preprocess + inference of one image, inference on every core
    cores: int

    @property
    def best_batch(self) -> int:
        return min(self.infer_ms, key=self.infer_ms.__getitem__)

    @property
    def per_image_ms(self) -> float:
        return self.pre_ms + self.infer_ms[self.best_batch]

    @property
    def img_s(self) -> float:
        return self.cores * 1000 / self.per_image_ms


def physical_limit(entry_dir: Path, data: bytes, cores: int) -> Limit:
    m = Manifest.read(entry_dir)
    pre = Preprocessor(m.input, m.preprocess)
    tensor = pre(data)[0]
    pre_ms = cpu_ms(lambda: pre(data), 100)
    one = session(entry_dir / m.model_file, 1)
    name = one.get_inputs()[0].name
    infer = {}
    for b in (1, 2, 4, 8, 16):
        x = np.stack([tensor] * b)
        one.run(None, {name: x})
        infer[b] = cpu_ms(lambda x=x: one.run(None, {name: x}), max(3, 32 // b)) / b
    every = session(entry_dir / m.model_file, cores)
    every.run(None, {name: tensor[None]})
    walls = []
    for _ in range(60):
        t = time.perf_counter()
        every.run(None, {name: pre(data)[0][None]})
        walls.append((time.perf_counter() - t) * 1000)
    return Limit(pre_ms, infer, statistics.median(walls), cores)


# -- servers ---------------------------------------------------------------------------------------------
@dataclass
class Running:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start(name: str, cmd: list[str], url: str, ready_path: str, tmp: Path, env: dict[str, str] | None = None
          ) -> Running:
    log = tmp / f"{name}.log"
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{log.read_text()}")
        try:
            if httpx.get(url + ready_path, timeout=1).status_code == 200:
                return Running(name, proc, url, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{name} not ready:\n{log.read_text()}")


def start_naive(entry_dir: Path, tmp: Path, pin: str | None = None) -> tuple[Running, str]:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "naive_server.py"), str(entry_dir), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    return start("naive", [*(["taskset", "-c", pin] if pin else []), *cmd], url, "/ready", tmp), url + "/classify"


def start_visionserve(entry_dir: Path, tmp: Path, pin: str | None = None, config: Path | None = None
                      ) -> tuple[Running, str]:
    repo = tmp / f"repo-{entry_dir.parent.name}"
    if not repo.exists():
        (repo / entry_dir.parent.name).mkdir(parents=True)
        (repo / entry_dir.parent.name / entry_dir.name).symlink_to(entry_dir.resolve())
    port = free_port()
    cmd = [str(ROOT / ".venv" / "bin" / "visionserve"), "serve", "--repository", str(repo), "--port", str(port),
           "--log-level", "warning", *(["--config", str(config)] if config else [])]
    url = f"http://127.0.0.1:{port}"
    running = start("visionserve", [*(["taskset", "-c", pin] if pin else []), *cmd], url, "/v2/health/ready", tmp)
    return running, f"{url}/v1/models/{entry_dir.parent.name}/classify"


# -- load ------------------------------------------------------------------------------------------------
@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms_per_req: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(server: Running, url: str, connections: int, seconds: float, lua: Path) -> Load:
    cpu0 = server.cpu_s()
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--latency", "--timeout", "10s",
                          "-s", str(lua), url], capture_output=True, text=True, timeout=seconds + 60).stdout
    cpu1 = server.cpu_s()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors += sum(map(int, m.groups())) if m else 0
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    return Load(rps, _ms(pct["50"]), _ms(pct["99"]), errors, (cpu1 - cpu0) * 1000 / max(1, total))


def open_loop(url: str, rate: float, seconds: float) -> Load:
    from visionserve.loadtest.config import LoadConfig
    from visionserve.loadtest.runner import run_load

    model = url.rsplit("/", 2)[-2]
    base = url.split("/v1/")[0]
    r = run_load(LoadConfig(url=base, model=model, kind="classify", images=[IMAGE.read_bytes()], rate=rate,
                            duration=seconds, warmup=1.0, metrics=False))
    lat = r.latency_ms
    return Load(r.throughput_rps, lat["p50"], lat["p99"], r.error_count)


def median_load(loads: list[Load]) -> Load:
    return Load(*(statistics.median(getattr(x, f) for x in loads) for f in ("rps", "p50_ms", "p99_ms")),
                sum(x.errors for x in loads), statistics.median(x.cpu_ms_per_req for x in loads))


# -- the run ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--fp32", default="mobilenet_v2")
    ap.add_argument("--int8", default="mobilenet_v2_int8")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=2, help="A B A B rounds (medians)")
    ap.add_argument("--connections", default="1,4,32")
    ap.add_argument("--config", type=Path, help="a serve --config file for visionserve")
    ap.add_argument("--skip-taskset", action="store_true")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install -y wrk")
    conns = [int(c) for c in args.connections.split(",")]
    cores = available_cpus()
    data = IMAGE.read_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="vs-bench-"))
    lua = tmp / "post.lua"
    lua.write_text(LUA.format(image=IMAGE))
    entries = {k: next(valid_entries(args.repository, name)).directory for k, name in
               (("fp32", args.fp32), ("int8", args.int8))}
    print(f"machine: {cores} usable cores; image {IMAGE.name} ({len(data)} bytes); wrk -t1; "
          f"{args.rounds} rounds x {args.duration:.0f} s", flush=True)

    limits = {k: physical_limit(d, data, cores) for k, d in entries.items()}
    for k, lim in limits.items():
        print(f"{k}: decode+preprocess {lim.pre_ms:.2f} ms CPU/img; inference (1 thread) "
              + ", ".join(f"b{b} {v:.2f}" for b, v in lim.infer_ms.items())
              + f" ms/img; limit {lim.img_s:.0f} img/s; in-process single image {lim.single_ms:.2f} ms", flush=True)

    results: dict[str, dict[str, object]] = {"limit": {k: vars(v) | {"img_s": v.img_s} for k, v in limits.items()}}
    runs: dict[tuple[str, int], list[Load]] = {}
    rss: dict[str, list[float]] = {}
    sat: dict[str, float] = {}

    def measure(label: str, starter, entry: Path, conns_: list[int]) -> None:  # type: ignore[no-untyped-def]
        server, url = starter(entry, tmp)
        try:
            rss.setdefault(f"{label} after warm-up", []).append(server.rss_mib())
            wrk(server, url, 4, 2, lua)  # warm the connection path
            for c in conns_:
                load = wrk(server, url, c, args.duration, lua)
                runs.setdefault((label, c), []).append(load)
                print(f"  {label:18s} c={c:<3d} {load.rps:7.1f} req/s  p50 {load.p50_ms:6.1f} ms  p99 "
                      f"{load.p99_ms:6.1f} ms  CPU {load.cpu_ms_per_req:5.2f} ms/req  errors {load.errors}", flush=True)
            rss.setdefault(f"{label} after load", []).append(server.rss_mib())
        finally:
            server.stop()

    for r in range(args.rounds):
        print(f"round {r + 1}", flush=True)
        measure("naive fp32", start_naive, entries["fp32"], conns)
        measure("visionserve fp32", lambda e, t: start_visionserve(e, t, config=args.config), entries["fp32"], conns)
        measure("visionserve int8", lambda e, t: start_visionserve(e, t, config=args.config), entries["int8"],
                [max(conns)])

    med = {k: median_load(v) for k, v in runs.items()}
    for label in ("visionserve fp32", "visionserve int8"):
        sat[label] = max(m.rps for (lb, _), m in med.items() if lb == label)

    # open loop at 0.8 x saturation
    ol: dict[str, Load] = {}
    for label, key in (("visionserve fp32", "fp32"), ("visionserve int8", "int8")):
        server, url = start_visionserve(entries[key], tmp, config=args.config)
        try:
            ol[label] = open_loop(url, 0.8 * sat[label], args.duration)
        finally:
            server.stop()

    # int8 on one core vs two
    pinned: dict[str, float] = {}
    if not args.skip_taskset and shutil.which("taskset") and cores >= 2:
        cpus = sorted(os.sched_getaffinity(0))
        for label, pin in (("1 core", str(cpus[0])), (f"{cores} cores", None)):
            server, url = start_visionserve(entries["int8"], tmp, pin=pin, config=args.config)
            try:
                wrk(server, url, 8, 2, lua)
                pinned[label] = statistics.median(wrk(server, url, 32, args.duration, lua).rps
                                                  for _ in range(args.rounds))
            finally:
                server.stop()

    # -- the table -----------------------------------------------------------------------------------
    lim32, lim8 = limits["fp32"].img_s, limits["int8"].img_s
    naive_best = max(m.rps for (lb, _), m in med.items() if lb == "naive fp32")
    print("\n| | naive fp32 | visionserve fp32 | visionserve int8 |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| physical limit (img/s) | {lim32:.0f} | {lim32:.0f} | {lim8:.0f} |")
    for c in conns:
        cells = []
        for label, lim in (("naive fp32", lim32), ("visionserve fp32", lim32), ("visionserve int8", lim8)):
            m = med.get((label, c))
            cells.append(f"{m.rps:.0f} req/s ({m.rps / lim:.2f} of limit), p50 {m.p50_ms:.1f} ms, p99 "
                         f"{m.p99_ms:.1f} ms" if m else "—")
        print(f"| c={c} | " + " | ".join(cells) + " |")
    print("| open loop at 0.8 × saturation | — | " + " | ".join(
        f"{ol[lb].rps:.0f} req/s, p50 {ol[lb].p50_ms:.1f} ms, p99 {ol[lb].p99_ms:.1f} ms"
        for lb in ("visionserve fp32", "visionserve int8")) + " |")
    print("| CPU ms per request (c=32) | " + " | ".join(
        f"{med[(lb, max(conns))].cpu_ms_per_req:.2f}" for lb in ("naive fp32", "visionserve fp32", "visionserve int8"))
          + " |")
    print("| RSS after warm-up / after load (MiB) | " + " | ".join(
        f"{statistics.median(rss[lb + ' after warm-up']):.0f} / {statistics.median(rss[lb + ' after load']):.0f}"
        for lb in ("naive fp32", "visionserve fp32", "visionserve int8")) + " |")

    print("\nTargets (issue 12), ratios from this run:")
    vs = {c: med[("visionserve fp32", c)] for c in conns}
    nv = {c: med[("naive fp32", c)] for c in conns}
    checks: list[tuple[str, float, bool]] = []  # (what, value, met)

    def at_least(what: str, value: float, floor: float) -> None:
        checks.append((f"{what} >= {floor}", value, value >= floor))

    def at_most(what: str, value: float, ceiling: float) -> None:
        checks.append((f"{what} <= {ceiling}", value, value <= ceiling))

    for c in (4, 32):
        if c in vs:
            at_least(f"fp32 c={c} / limit", vs[c].rps / lim32, 0.92)
            at_least(f"fp32 c={c} / naive c={c}", vs[c].rps / nv[c].rps, 1.0 if c == 4 else 1.15)
    at_least("int8 saturation / limit", sat["visionserve int8"] / lim8, 0.85)
    at_least("int8 saturation / naive's best fp32", sat["visionserve int8"] / naive_best, 1.5)
    if 1 in vs:
        at_most("c=1 p50 - in-process single image (ms)", vs[1].p50_ms - limits["fp32"].single_ms, 1.0)
        at_most("c=1 p50 / naive's", vs[1].p50_ms / nv[1].p50_ms, 0.85)
    at_most("RSS after load / naive's", statistics.median(rss["visionserve fp32 after load"])
            / statistics.median(rss["naive fp32 after load"]), 1.3)
    if len(pinned) == 2:
        one, two = pinned.values()
        at_least(f"int8 on {cores} cores / on 1 core", two / one, 1.8)
    for what, value, met in checks:
        print(f"  {'met ' if met else 'MISS'}  {what}: {value:.2f}")
    if pinned:
        print("  int8 saturation pinned: " + ", ".join(f"{k} {v:.0f} req/s" for k, v in pinned.items()))
    if args.json:
        results.update(
            runs={f"{lb} c={c}": vars(m) for (lb, c), m in med.items()}, open_loop={k: vars(v) for k, v in ol.items()},
            rss_mib={k: statistics.median(v) for k, v in rss.items()}, pinned=pinned,
            checks=[{"what": w, "value": v, "met": ok} for w, v, ok in checks])
        args.json.write_text(json.dumps(results, indent=2, default=float))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
