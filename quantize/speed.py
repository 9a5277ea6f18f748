"""The speed guard: an int8 model that is not clearly faster than fp32 where it will serve is refused.

int8 is not always faster on a CPU: without VNNI, with signed activations, or with many nodes kept in
float it can run slower than the fp32 model it replaces (measured here: s8 × s8 at 0.5× fp32,
docs/optimize.md). So after the accuracy guard the two are timed at the serving batch size, interleaved
run by run on this machine, and int8 below ``min_speedup`` × the fp32 throughput is refused unless the
user says ``--allow-slow``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .int8 import QuantizeError
from .measure import compare_speed

DEFAULT_MIN_SPEEDUP = 1.2


def measure(fp32: Path, final: Path, first: Path, sample: np.ndarray, serving_batch: int = 8,
            threads: int = 2, rounds: int = 3, repeats: int = 10) -> dict[str, dict[str, float]]:
    """Latency at batch 1 and at ``serving_batch`` of fp32, the final int8 and (if different) all-quantized."""
    paths = {"fp32": fp32, "int8": final}
    if final != first:
        paths["int8_all_quantized"] = first
    batches = tuple(sorted({1, serving_batch}))
    res = compare_speed(paths, sample[:serving_batch], batches=batches, repeats=repeats, rounds=rounds,
                        threads=threads)
    b = serving_batch
    out: dict[str, dict[str, float]] = {}
    for k, per in res.items():
        out[k] = {f"b{n}_ms": lat.median_ms for n, lat in per.items()}
        out[k][f"b{b}_ips"] = round(per[b].throughput, 1)
    out["ratio"] = {f"int8_vs_fp32_b{b}": round(out["int8"][f"b{b}_ips"] / out["fp32"][f"b{b}_ips"], 3),
                    "serving_batch": b}
    if b == 8:  # the key every earlier manifest and the docs use
        out["ratio"]["int8_vs_fp32_b8"] = out["ratio"][f"int8_vs_fp32_b{b}"]
    if "int8_all_quantized" in out:
        out["ratio"][f"float_nodes_cost_b{b}"] = round(
            out["int8"][f"b{b}_ms"] / out["int8_all_quantized"][f"b{b}_ms"], 3)
    return out


def speedup(speed: dict[str, dict[str, float]]) -> float:
    b = int(speed["ratio"]["serving_batch"])
    return float(speed["ratio"][f"int8_vs_fp32_b{b}"])


def check(speed: dict[str, dict[str, float]], min_speedup: float, allow_slow: bool, target: str) -> None:
    """Raise QuantizeError when int8 is under ``min_speedup`` × fp32 throughput and slowness is not allowed."""
    r = speedup(speed)
    if r >= min_speedup or allow_slow:
        return
    b = int(speed["ratio"]["serving_batch"])
    raise QuantizeError(
        f"int8 is not fast enough to be worth serving: at batch {b} it runs at × {r:.2f} the fp32 throughput on "
        f"this machine ({speed['fp32'][f'b{b}_ms']:.1f} → {speed['int8'][f'b{b}_ms']:.1f} ms a batch), below "
        f"--min-speedup {min_speedup:g} (target {target}). Nothing was written. Check --target for this CPU "
        f"(VNNI: x86-vnni), keep fewer nodes in float (a larger --max-drop), serve the fp32 model, or pass "
        f"--allow-slow to write it anyway.")
