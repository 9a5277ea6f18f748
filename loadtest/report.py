"""``--report DIR``: report.md plus PNG plots (matplotlib, Agg backend, imported only here)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def plot_distribution(runs: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """HDR percentile plot: latency against 1/(1−percentile), one line per run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, run in runs:
        pts = [(p, v) for p, v in run.get("percentile_curve", []) if p < 100.0]
        if pts:
            ax.plot([1 / (1 - p / 100) for p, _ in pts], [v for _, v in pts], label=label)
    ax.set_xscale("log")
    ticks = [1 / (1 - q) for q in (0.5, 0.9, 0.99, 0.999, 0.9999)]
    ax.set_xticks(ticks, ["50%", "90%", "99%", "99.9%", "99.99%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency distribution (HDR)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    _save(plt, fig, path)


def plot_curve(sweep: dict[str, Any], path: Path) -> None:
    """p50/p90/p99 latency against achieved throughput, with the SLO and the best level."""
    plt = _plt()
    steps = sweep["steps"]
    x = [s["throughput_rps"] for s in steps]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k in ("p50", "p90", "p99"):
        ax.plot(x, [s["latency_ms"][k] for s in steps], marker="o", label=k)
    if sweep.get("slo_p99_ms") is not None:
        ax.axhline(sweep["slo_p99_ms"], color="red", linestyle="--", label=f"SLO p99 {sweep['slo_p99_ms']:g} ms")
    if sweep.get("best"):
        ax.axvline(sweep["best"]["throughput_rps"], color="green", linestyle=":", label="best under SLO")
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("latency vs throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    _save(plt, fig, path)


def plot_batching(sweep: dict[str, Any], path: Path) -> bool:
    """Server mean batch size (and queue/inference time) against load; False without server metrics."""
    steps = [s for s in sweep["steps"] if (s.get("server") or {}).get("batch_size_mean") is not None]
    if not steps:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = [s["load"] for s in steps]
    ax.plot(x, [s["server"]["batch_size_mean"] for s in steps], marker="o", color="black", label="batch size")
    ax.set_xlabel("concurrency" if sweep["mode"] == "closed" else "offered rate (req/s)")
    ax.set_ylabel("mean batch size")
    ax2 = ax.twinx()
    for key, label in (("queue_wait_ms_mean", "queue wait"), ("inference_ms_mean", "inference")):
        ys = [s["server"].get(key) for s in steps]
        if any(y is not None for y in ys):
            ax2.plot(x, [math.nan if y is None else y for y in ys], marker=".", linestyle="--", label=label)
    ax2.set_ylabel("server mean (ms)")
    ax.set_title("batch size vs load (server's /metrics)")
    ax.grid(True, alpha=0.3)
    fig.legend(loc="upper left", fontsize="small")
    _save(plt, fig, path)
    return True


def plot_timeline(run: dict[str, Any], path: Path) -> None:
    """Per-window throughput and p99 over the run (shows stalls and drift)."""
    plt = _plt()
    w = run["windows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    t = [x["start_s"] for x in w]
    ax.plot(t, [x["throughput_rps"] for x in w], marker=".", label="throughput")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("req/s")
    ax2 = ax.twinx()
    ax2.plot(t, [x["p99_ms"] if x["p99_ms"] is not None else math.nan for x in w], color="red", label="p99")
    ax2.set_ylabel("p99 (ms)")
    ax.set_title("per-window throughput and p99")
    fig.legend(loc="upper right", fontsize="small")
    _save(plt, fig, path)


def _run_section(run: dict[str, Any]) -> list[str]:
    lat = run["latency_ms"]
    lines = [
        "| metric | value |",
        "| --- | ---: |",
        f"| throughput | {_fmt(run['throughput_rps'], 1)} req/s |",
        f"| measured | {run['duration_s']:.2f} s, {run['ok']} ok |",
    ]
    lines += [f"| latency {k} | {_fmt(lat[k], 3)} ms |" for k in ("p50", "p90", "p99", "p99.9", "max", "mean")]
    lines += [f"| errors {k} | {v} |" for k, v in run["errors"].items()]
    for k, v in (run.get("server") or {}).items():
        lines.append(f"| server {k} | {_fmt(v, 3) if isinstance(v, float) else v} |")
    return lines


def write_report(directory: Path, data: dict[str, Any]) -> Path:
    """Write report.md and its plots for a run or a sweep (``to_dict()`` output); return report.md."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = (data["steps"][0] if data.get("kind") == "sweep" else data)["config"]
    md = [
        "# Load test report",
        "",
        f"`{cfg['kind']}` requests to `{cfg['url']}`, model `{cfg['model']}`, engine `{cfg['engine']}`, "
        f"warm-up {cfg['warmup']:g} s excluded, window {cfg['window']:g} s.",
        "",
    ]
    if data.get("kind") == "sweep":
        slo = data.get("slo_p99_ms")
        best = data.get("best")
        unit = "concurrency" if data["mode"] == "closed" else "rate"
        md += [
            f"## Sweep ({data['mode']} loop) — {data['stopped_because']}",
            "",
            f"**Highest throughput with p99 ≤ {slo:g} ms: {best['throughput_rps']:,.1f} req/s at {unit} "
            f"{best['load']:g}.**"
            if best and slo is not None
            else (
                "**No level met the SLO.**"
                if slo is not None
                else f"Best throughput: {_fmt((best or {}).get('throughput_rps'), 1)} req/s (no SLO given)."
            ),
            "",
            f"| {unit} | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | batch | stable |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
        ]
        for s in data["steps"]:
            lat = s["latency_ms"]
            md.append(
                f"| {s['load']:g} | {_fmt(s['throughput_rps'], 1)} | {_fmt(lat['p50'])} | {_fmt(lat['p90'])} | "
                f"{_fmt(lat['p99'])} | {_fmt(lat['p99.9'])} | {_fmt(lat['max'])} | {sum(s['errors'].values())} | "
                f"{_fmt((s.get('server') or {}).get('batch_size_mean'))} | {'yes' if s['stable'] else 'no'} |"
            )
        plot_curve(data, directory / "latency_vs_throughput.png")
        plot_distribution([(f"{unit} {s['load']:g}", s) for s in data["steps"]], directory / "latency_distribution.png")
        md += [
            "",
            "![latency vs throughput](latency_vs_throughput.png)",
            "",
            "![latency distribution](latency_distribution.png)",
        ]
        if plot_batching(data, directory / "batch_size_vs_load.png"):
            md += ["", "![batch size vs load](batch_size_vs_load.png)"]
        else:
            md += ["", "_The server exposed no `visionserve_batch_size` metric; no batching plot._"]
    else:
        md += [f"## Single run ({data['mode']} loop, load {data['load']:g})", "", *_run_section(data)]
        plot_distribution([("run", data)], directory / "latency_distribution.png")
        plot_timeline(data, directory / "timeline.png")
        md += ["", "![latency distribution](latency_distribution.png)", "", "![timeline](timeline.png)"]
    path = directory / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path
