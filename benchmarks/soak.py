"""Memory over a soak: visionserve's RSS while wrk keeps it busy for ``--minutes`` (issue 12 item 4).

Serves one model (a repository holding only it), warms it up, then runs ``wrk`` closed loop for the whole
soak and samples the server's RSS every ``--every`` seconds. Prints the samples, the growth from the first
minute's end to the last sample, and the requests served. Not a test: bounded in time, 127.0.0.1 only.

    .venv/bin/python benchmarks/soak.py --model mobilenet_v2 --minutes 10
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import IMAGE, LUA, start_visionserve  # noqa: E402
from visionserve.service.repository import valid_entries  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--every", type=float, default=15.0, help="seconds between RSS samples")
    ap.add_argument("--connections", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vs-soak-"))
    lua = tmp / "post.lua"
    lua.write_text(LUA.format(image=IMAGE))
    entry = next(valid_entries(args.repository, args.model)).directory
    server, url = start_visionserve(entry, tmp)
    seconds = int(args.minutes * 60)
    try:
        start_rss = server.rss_mib()
        load = subprocess.Popen(["wrk", "-t1", f"-c{args.connections}", f"-d{seconds}s", "--timeout", "10s", "-s",
                                 str(lua), url], stdout=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        samples: list[tuple[float, float]] = []
        while load.poll() is None and time.monotonic() - t0 < seconds + 30:
            time.sleep(args.every)
            samples.append((time.monotonic() - t0, server.rss_mib()))
            print(f"  t={samples[-1][0]:6.0f} s  RSS {samples[-1][1]:7.1f} MiB", flush=True)
        out = load.communicate(timeout=60)[0]
    finally:
        server.stop()
    requests = re.search(r"(\d+) requests in", out)
    after_first_minute = next((r for t, r in samples if t >= 60), samples[0][1])
    last = samples[-1][1]
    print(f"\n{args.model}: RSS {start_rss:.0f} MiB after warm-up, {after_first_minute:.0f} MiB after the first "
          f"minute, {last:.0f} MiB at the end ({(last / after_first_minute - 1) * 100:+.1f} % over the soak, "
          f"max {max(r for _, r in samples):.0f}); {requests.group(1) if requests else '?'} requests in "
          f"{args.minutes:g} min at {args.connections} connections")


if __name__ == "__main__":
    main()
