"""make test-arm64's check: the emulated aarch64 server is ready in its budget and answers as the x86 one.

Usage: compare_arm64.py ARM_PORT X86_PORT IMAGE ARM_PID MODEL READY_BUDGET_S CLASSIFY_BUDGET_S
"""

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

arm, x86, image, pid, model = sys.argv[1:6]
ready_budget, classify_budget = float(sys.argv[6]), float(sys.argv[7])


def wait_ready(port, limit):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if port == arm:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                sys.exit("the aarch64 server exited")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5)
            return time.monotonic() - t0
        except Exception:
            time.sleep(0.5)
    sys.exit(f"server on {port} not ready after {limit:.0f} s")


def classify(port):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/{model}/classify?top_k=5",
                                 data=Path(image).read_bytes(), headers={"Content-Type": "image/jpeg"})
    t0 = time.monotonic()
    body = json.load(urllib.request.urlopen(req, timeout=classify_budget))
    return body, time.monotonic() - t0


print(f"aarch64 server ready after {wait_ready(arm, ready_budget):.1f} s (load + warm-up, emulated)", flush=True)
wait_ready(x86, 120)
a, ta = classify(arm)
a2, ta2 = classify(arm)
b, _ = classify(x86)
print(f"aarch64 classify: {ta:.2f} s first, {ta2:.2f} s second (emulated)")
for pa, pb in zip(a["predictions"], b["predictions"]):
    print(f"  {pa['index']:4d} {pa['label'][:24]:24s} aarch64 {pa['score']:.6f}   x86 {pb['score']:.6f}")
top = a["predictions"][0]
assert 281 <= top["index"] <= 285, f"top-1 is not a cat: {top}"
assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]], "top-5 differs"
assert a["predictions"] == a2["predictions"], "the aarch64 server answered the same image differently"
diff = max(abs(pa["score"] - pb["score"]) for pa, pb in zip(a["predictions"], b["predictions"]))
print(f"max |score difference| aarch64 vs x86: {diff:.2e}")
assert diff < 1e-3, diff
