"""Terminal output: the live progress line and the result tables (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .stats import Result

LAG_WARN_MS = 20.0  # open loop: sends this late (p99) mean the offered rate was not delivered


def fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:,.{digits}f}"


def progress_text(p: dict[str, Any]) -> Text:
    w = p.get("window") or {}
    req = f"/{p['requests']}" if p.get("requests") else ""
    return Text.assemble(
        (f"{p['phase']:>9} ", "cyan"),
        f"{p['elapsed_s']:6.1f}/{p['total_s']:.0f}s  measured {p['measured']}{req}  ok {p['ok']}  ",
        (f"errors {p['errors']}  ", "red" if p["errors"] else "dim"),
        f"last window: {fmt(w.get('throughput_rps'), 1)} req/s  p50 {fmt(w.get('p50_ms'))} ms  "
        f"p99 {fmt(w.get('p99_ms'))} ms",
    )


def result_table(r: Result, title: str = "") -> Table:
    lat = r.latency_ms
    t = Table(title=title or None, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    load = f"concurrency {r.load:g}" if r.mode == "closed" else f"rate {r.load:g} req/s (open loop)"
    t.add_row("load", load)
    t.add_row("measured", f"{r.duration_s:.2f} s, {r.ok:,} ok, {r.error_count:,} errors")
    t.add_row("throughput", f"{r.throughput_rps:,.1f} req/s")
    for k in ("p50", "p90", "p99", "p99.9", "max", "mean"):
        t.add_row(f"latency {k}", f"{fmt(lat[k], 3)} ms")
    for cause, n in sorted(r.errors.items()):
        sample = r.error_samples.get(cause, "")
        t.add_row(f"errors {cause}", f"{n:,}" + (f"  ({sample[:60]})" if sample else ""))
    if r.schedule_lag_ms and r.schedule_lag_ms.get("p99") is not None:
        t.add_row("schedule lag p99 / max", f"{fmt(r.schedule_lag_ms['p99'])} / {fmt(r.schedule_lag_ms['max'])} ms")
    lag = (r.schedule_lag_ms or {}).get("p99")
    if lag is not None and lag > LAG_WARN_MS:
        t.add_row(
            "[red]warning[/red]",
            f"[red]sends ran {lag:.0f} ms behind schedule (p99): the server or this client is saturated[/red]",
        )
    if r.mode == "open":
        t.add_row("queued in client", f"{r.client_queued:,} waited for a free connection")
    if r.stable is not None:
        t.add_row("stable", "yes" if r.stable else "no")
    server = r.server or {}
    for key, label in (
        ("request_duration_ms_mean", "server request mean"),
        ("queue_wait_ms_mean", "server queue wait mean"),
        ("inference_ms_mean", "server inference mean"),
    ):
        if server.get(key) is not None:
            t.add_row(label, f"{fmt(server[key], 3)} ms")
    if server.get("batch_size_mean") is not None:
        t.add_row("server batch size mean", fmt(server["batch_size_mean"]))
    if not server:
        t.add_row("server view", "no visionserve metrics at /metrics")
    return t


def sweep_table(sweep: Any) -> Table:
    unit = "concurrency" if sweep.mode == "closed" else "rate (req/s)"
    t = Table(title=f"sweep ({sweep.mode} loop)", header_style="bold")
    for col in (unit, "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors", "batch", "stable", "SLO"):
        t.add_column(col, justify="right")
    best = sweep.best
    for r in sweep.steps:
        lat = r.latency_ms
        batch = (r.server or {}).get("batch_size_mean")
        t.add_row(
            f"{r.load:g}",
            f"{r.throughput_rps:,.1f}",
            fmt(lat["p50"]),
            fmt(lat["p90"]),
            fmt(lat["p99"]),
            fmt(lat["max"]),
            str(r.error_count),
            fmt(batch),
            "yes" if r.stable else "no",
            ("best" if r is best else "ok") if sweep.passes(r) else "fail",
        )
    return t


def print_sweep_summary(console: Console, sweep: Any) -> None:
    console.print(sweep_table(sweep))
    best = sweep.best
    slo = f"p99 ≤ {sweep.slo_p99_ms:g} ms" if sweep.slo_p99_ms is not None else "no --slo-p99-ms given"
    if best is None:
        console.print(f"[red]no level met the SLO ({slo}, error rate ≤ {sweep.max_error_rate:.0%})[/red]")
    else:
        console.print(
            f"[bold]highest throughput meeting the SLO ({slo}): {best.throughput_rps:,.1f} req/s[/bold] "
            f"at {'concurrency' if sweep.mode == 'closed' else 'rate'} {best.load:g} "
            f"(p99 {fmt(best.latency_ms['p99'])} ms)"
        )
    console.print(f"stopped: {sweep.stopped_because}")
