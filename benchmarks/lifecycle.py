"""A live version swap under load: what publishing a new version costs the requests in flight (issue 15).

Serves MobileNetV2 (fp32, real ImageNet weights) in ``poll`` mode (default interval), keeps ``--clients``
closed-loop clients classifying a photo, publishes version 2 (``visionserve publish``'s code path: staged,
renamed), and later a corrupted version 3. Prints, per phase, the requests, the non-200 answers and the
latency percentiles, the time from publishing to the first answer from version 2, and the RSS. Not a test:
bounded in time, 127.0.0.1 only.

    .venv/bin/python benchmarks/lifecycle.py [--repository model_repository] [--seconds 10]
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visionserve.service.manifest import Manifest  # noqa: E402
from visionserve.service.repository import valid_entries, write_version  # noqa: E402

IMAGE = ROOT / "examples" / "images" / "cat.jpg"


def publish(repo: Path, source: Path, version: str, corrupt: bool = False) -> None:
    def build(staging: Path, v: str) -> Manifest:
        shutil.copyfile(source / "model.onnx", staging / "model.onnx")
        if corrupt:  # one flipped byte after the manifest's sha256 was taken: corrupted in transit
            data = bytearray((staging / "model.onnx").read_bytes())
            data[len(data) // 2] ^= 0xFF
            (staging / "model.onnx").write_bytes(bytes(data))
        return Manifest.read(source).model_copy(update={"version": v})

    if not corrupt:
        write_version(repo, "mobilenet_v2", version, build)
        return
    # write_version refuses what does not read back, rightly; stage and rename by hand instead
    staging = repo / f".staging-corrupt-{version}"
    staging.mkdir()
    build(staging, version).write(staging)
    staging.rename(repo / "mobilenet_v2" / version)


def rss_mib(url: str) -> float:
    m = re.search(r"^process_resident_memory_bytes (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(m.group(1)) / 2**20 if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository",
                    help="where mobilenet_v2 comes from (built into a temporary one if missing)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vs-lifecycle-"))
    source_repo = args.repository
    if not (source_repo.is_dir() and any(valid_entries(source_repo, "mobilenet_v2"))):
        from visionserve.convert.default import build_default

        source_repo = tmp / "source"
        build_default(source_repo)  # fp32 entries only
    source = next(valid_entries(source_repo, "mobilenet_v2")).directory
    repo = tmp / "repo"
    publish(repo, source, "1")
    port = 18000 + int(time.time()) % 1000
    url = f"http://127.0.0.1:{port}"
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "visionserve.service", "serve", "-r", str(repo), "--port", str(port),
                             "--model-control", "poll"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    answers: list[tuple[float, float, int, str]] = []  # sent, latency, status, version
    stop = threading.Event()
    try:
        until = time.monotonic() + 120
        while time.monotonic() < until:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        body = IMAGE.read_bytes()

        def client() -> None:
            with httpx.Client(timeout=30) as c:
                deadline = time.monotonic() + 10 * args.seconds + 60
                while not stop.is_set() and time.monotonic() < deadline:
                    sent = time.monotonic()
                    try:
                        r = c.post(f"{url}/v1/models/mobilenet_v2/classify?top_k=1", content=body,
                                   headers={"Content-Type": "image/jpeg"})
                        status, version = r.status_code, (r.json().get("version", "") if r.status_code == 200
                                                           else "")
                    except httpx.HTTPError:
                        status, version = 0, ""
                    answers.append((sent, time.monotonic() - sent, status, version))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        rss_v1 = rss_mib(url)
        t2 = time.monotonic()
        publish(repo, source, "2")
        while not any(v == "2" for *_, v in answers) and time.monotonic() < t2 + 60:
            time.sleep(0.02)
        first_v2 = min((s + lat for s, lat, _, v in answers if v == "2"), default=float("nan"))
        time.sleep(args.seconds)
        rss_v2 = rss_mib(url)
        t3 = time.monotonic()
        publish(repo, source, "3", corrupt=True)
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join(30)
        index = httpx.post(f"{url}/v2/repository/index").json()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)

    phases = [("steady, version 1", 0, t2), ("publish v2 until 1 s after its first answer", t2, first_v2 + 1),
              ("after the swap", first_v2 + 1, t3), ("corrupted v3 published", t3, float("inf"))]
    print(f"{args.clients} closed-loop clients, MobileNetV2 fp32, poll mode (default interval)\n")
    print(f"| phase | requests | non-200 | versions | p50 ms | p99 ms | max ms |\n|{'---|' * 7}")
    for name, lo, hi in phases:
        got = [a for a in answers if lo <= a[0] < hi]
        lat = np.array([a[1] for a in got]) * 1000
        versions = ",".join(sorted({a[3] for a in got if a[3]}))
        print(f"| {name} | {len(got)} | {sum(a[2] != 200 for a in got)} | {versions} | "
              f"{np.percentile(lat, 50):.1f} | {np.percentile(lat, 99):.1f} | {lat.max():.1f} |")
    print(f"\nfirst answer from version 2: {first_v2 - t2:.2f} s after its directory appeared")
    print(f"RSS: {rss_v1:.0f} MiB serving v1, {rss_v2:.0f} MiB serving v2 after the swap")
    print("index:", [(e["version"], e["state"], e["reason"][:60]) for e in index])
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
