"""The server's own view: Prometheus text from ``/metrics`` before and after a run, reduced to means.

Only ``_sum`` and ``_count`` samples matter (a histogram's mean over the run is
Δsum / Δcount). Samples are summed over every label set whose ``model`` label matches; metrics
the server does not expose are simply missing from the answer.
"""

from __future__ import annotations

import re
from typing import Any

from .http import TransportError, fetch

# metric base name → (key in the answer, scale to apply to the mean)
SERVER_METRICS = {
    "visionserve_queue_wait_seconds": ("queue_wait_ms_mean", 1e3),
    "visionserve_inference_seconds": ("inference_ms_mean", 1e3),
    "visionserve_batch_size": ("batch_size_mean", 1.0),
    "visionserve_request_duration_seconds": ("request_duration_ms_mean", 1e3),
}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Snapshot = dict[str, float]  # "metric_sum" / "metric_count" → value, for one model


def parse(text: str, model: str | None, version: str | None = None) -> Snapshot:
    """Sum the ``_sum``/``_count`` samples of :data:`SERVER_METRICS` for ``model`` (all if None)."""
    wanted = {f"{base}{suffix}" for base in SERVER_METRICS for suffix in ("_sum", "_count")}
    out: Snapshot = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None or m.group(1) not in wanted:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        if model is not None and "model" in labels and labels["model"] != model:
            continue
        if version is not None and "version" in labels and labels["version"] != version:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + value
    return out


def delta(before: Snapshot | None, after: Snapshot | None) -> dict[str, Any] | None:
    """Means over the interval between two snapshots; None when the server exposes none of them."""
    if before is None or after is None:
        return None
    view: dict[str, Any] = {}
    for base, (key, scale) in SERVER_METRICS.items():
        s, c = f"{base}_sum", f"{base}_count"
        if s not in after or c not in after:
            continue
        d_count = after[c] - before.get(c, 0.0)
        d_sum = after[s] - before.get(s, 0.0)
        view[key] = round(d_sum / d_count * scale, 4) if d_count > 0 else None
        if base == "visionserve_batch_size":
            view["batches"] = int(d_count)
        elif base == "visionserve_request_duration_seconds":
            view["requests"] = int(d_count)
    return view or None


async def scrape(url: str, model: str | None, version: str | None, timeout: float = 5.0) -> Snapshot | None:
    """One snapshot of ``url``; None when the server has no usable /metrics (never raises)."""
    try:
        status, body = await fetch(url, timeout=timeout)
    except (TransportError, ValueError):
        return None
    if status != 200:
        return None
    return parse(body.decode("utf-8", "replace"), model, version)
