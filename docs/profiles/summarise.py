"""Bucket py-spy collapsed stacks (``py-spy record -f raw``) into where a served request's CPU goes.

    python docs/profiles/summarise.py "before fp32=docs/profiles/before-fp32-c32.txt" \\
        "after fp32=docs/profiles/after-fp32-c32.txt"

Prints a Markdown table: the share of samples per bucket for each profile.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

BUCKETS = (
    "ONNX Runtime inference",
    "JPEG decode",
    "resize, crop, normalise, stack",
    "event loop (uvicorn, FastAPI, handler, JSON, metrics)",
    "other worker-thread work (thread pools, queues, idle wake-ups)",
)
DECODE = ("decode_jpeg", "ImageFile.load", "Image.open", "decode (service/imaging", "exif")
PREPROCESS = ("resize", "_normalise", "_geometry_and_pixels", "from_image", "astype", "stack", "convert", "crop",
              "fromarray", "asarray")


def bucket(frames: list[str]) -> str:
    joined = ";".join(frames)
    if "Session.run" in joined:
        return BUCKETS[0]
    if "visionserve:6" in frames[0]:  # the main thread runs the event loop
        return BUCKETS[3]
    if any(k in joined for k in DECODE):
        return BUCKETS[1]
    if any(k in joined for k in PREPROCESS):
        return BUCKETS[2]
    return BUCKETS[4]


def shares(path: Path) -> dict[str, float]:
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[bucket(stack.split(";"))] += int(n)
    total = sum(counts.values()) or 1
    return {b: counts[b] / total for b in BUCKETS}


def main() -> None:
    runs = [(label, shares(Path(path))) for label, _, path in (arg.partition("=") for arg in sys.argv[1:])]
    print("| share of CPU samples | " + " | ".join(label for label, _ in runs) + " |")
    print("| --- |" + " ---: |" * len(runs))
    for b in BUCKETS:
        print(f"| {b} | " + " | ".join(f"{s[b]:.0%}" for _, s in runs) + " |")


if __name__ == "__main__":
    main()
