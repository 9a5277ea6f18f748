"""``visionserve loadtest compare A.json B.json``: what changed between two saved runs or sweeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

Row = tuple[str, float | None, float | None]  # metric, A, B


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a loadtest JSON file ({exc})") from None
    if not isinstance(data, dict) or not ("latency_ms" in data or data.get("kind") == "sweep"):
        raise ValueError(f"{path}: not a loadtest JSON file (expected the output of --json)")
    return data


def run_rows(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[Row]:
    """Throughput, latency percentiles, error counts and the server's means of two single runs."""
    rows: list[Row] = [
        (f"{prefix}throughput req/s", a["throughput_rps"], b["throughput_rps"]),
    ]
    for k in ("p50", "p90", "p99", "p99.9", "max", "mean"):
        rows.append((f"{prefix}latency {k} ms", a["latency_ms"].get(k), b["latency_ms"].get(k)))
    rows.append((f"{prefix}error rate", a.get("error_rate"), b.get("error_rate")))
    for cause in sorted(set(a.get("errors", {})) | set(b.get("errors", {}))):
        rows.append((f"{prefix}errors {cause}", a["errors"].get(cause, 0), b["errors"].get(cause, 0)))
    sa, sb = a.get("server") or {}, b.get("server") or {}
    for key in ("queue_wait_ms_mean", "inference_ms_mean", "batch_size_mean", "request_duration_ms_mean"):
        if key in sa or key in sb:
            rows.append((f"{prefix}server {key}", sa.get(key), sb.get(key)))
    return rows


def sweep_rows(a: dict[str, Any], b: dict[str, Any]) -> list[Row]:
    """The best level under the SLO, then every load level both sweeps ran."""
    ba, bb = a.get("best") or {}, b.get("best") or {}
    rows: list[Row] = [
        ("best: throughput req/s (SLO met)", ba.get("throughput_rps"), bb.get("throughput_rps")),
        ("best: load level", ba.get("load"), bb.get("load")),
        ("best: p99 ms", ba.get("p99_ms"), bb.get("p99_ms")),
    ]
    steps_b = {s["load"]: s for s in b["steps"]}
    for sa in a["steps"]:
        sb = steps_b.get(sa["load"])
        if sb is not None:
            rows += [r for r in run_rows(sa, sb, f"@{sa['load']:g} ") if "errors " not in r[0]]
    return rows


def compare_files(path_a: Path, path_b: Path) -> tuple[list[Row], str]:
    a, b = _load(path_a), _load(path_b)
    sweep_a, sweep_b = a.get("kind") == "sweep", b.get("kind") == "sweep"
    if sweep_a != sweep_b:
        raise ValueError("cannot compare a sweep with a single run")
    rows = sweep_rows(a, b) if sweep_a else run_rows(a, b)
    return rows, f"A = {path_a}   B = {path_b}"


def delta(a: float | None, b: float | None) -> tuple[float | None, float | None]:
    if a is None or b is None:
        return None, None
    return b - a, ((b - a) / a * 100.0 if a else None)


def render(rows: list[Row], title: str) -> Table:
    t = Table(title=title, header_style="bold")
    for col in ("metric", "A", "B", "B − A", "Δ %"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for name, a, b in rows:
        d, pct = delta(a, b)
        t.add_row(
            name,
            "—" if a is None else f"{a:,.3f}",
            "—" if b is None else f"{b:,.3f}",
            "—" if d is None else f"{d:+,.3f}",
            "—" if pct is None else f"{pct:+.1f} %",
        )
    return t
