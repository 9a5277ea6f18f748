"""Sweeps: one measured step per load level → the latency–throughput curve and the best level under an SLO.

Each step runs until it is *stable* (perf_analyzer's rule): the throughput and p99 of each of the
last 3 measurement windows lie within ``tolerance`` of those windows' mean; the step's figures are
those 3 windows merged. A step that is not stable after ``max_windows`` windows is kept, marked
``stable: false``. ``auto`` doubles the load from a start value until the SLO breaks, throughput
stops rising (< 5 % over the best so far) or ``max_steps`` is reached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import metrics as server_metrics
from .config import ConfigError, LoadConfig
from .runner import Progress, run_load
from .stats import Result, Window, merge

STABLE_WINDOWS = 3
MAX_SWEEP_STEPS = 32
RISE = 1.05  # auto: a step must beat the best throughput so far by 5 % to keep doubling


@dataclass
class SweepSpec:
    mode: str  # "closed" or "open"
    values: list[float] | None  # None: auto (doubling from ``start``)
    start: float


def parse_sweep(text: str, rate: float | None, concurrency: int | None) -> SweepSpec:
    """``1,2,4,8`` | ``auto`` | ``rate:50,100`` | ``concurrency:auto``; bare lists follow --rate/--concurrency."""
    spec = text.strip().lower()
    mode = "open" if rate is not None else "closed"
    if ":" in spec:
        prefix, spec = spec.split(":", 1)
        if prefix not in ("rate", "concurrency"):
            raise ConfigError(f"--sweep prefix must be 'rate:' or 'concurrency:', got {prefix!r}")
        mode = "open" if prefix == "rate" else "closed"
    start = float((rate if mode == "open" else concurrency) or (10.0 if mode == "open" else 1.0))
    if spec == "auto":
        return SweepSpec(mode, None, start)
    try:
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sweep must be 'auto' or comma-separated numbers, got {text!r}") from None
    if not values or len(values) > MAX_SWEEP_STEPS or min(values) <= 0:
        raise ConfigError(f"--sweep needs 1 to {MAX_SWEEP_STEPS} positive values, got {text!r}")
    if mode == "closed" and any(v != int(v) for v in values):
        raise ConfigError(f"--sweep concurrencies must be whole numbers, got {text!r}")
    return SweepSpec(mode, values, start)


def is_stable(windows: list[Window], tolerance: float, n: int = STABLE_WINDOWS) -> bool:
    """True when the last ``n`` windows' throughput and p99 are each within ``tolerance`` of their mean."""
    if len(windows) < n:
        return False
    last = windows[-n:]
    if any(w.ok == 0 for w in last):
        return False
    rps = [w.ok / max(w.ended - w.started, 1e-9) for w in last]
    p99 = [w.hist.get_value_at_percentile(99.0) for w in last]
    return all(max(abs(x - sum(xs) / n) for x in xs) <= tolerance * sum(xs) / n for xs in (rps, p99))


@dataclass
class SweepResult:
    mode: str
    slo_p99_ms: float | None
    max_error_rate: float
    steps: list[Result] = field(default_factory=list)
    stopped_because: str = ""

    def passes(self, r: Result) -> bool:
        rate = r.error_count / max(r.ok + r.error_count, 1)
        if r.ok == 0 or rate > self.max_error_rate:
            return False
        return self.slo_p99_ms is None or r.percentile_ms(99.0) <= self.slo_p99_ms

    @property
    def best(self) -> Result | None:
        """The step with the highest throughput whose p99 meets the SLO (and errors stay low)."""
        ok = [r for r in self.steps if self.passes(r)]
        return max(ok, key=lambda r: r.throughput_rps) if ok else None

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "kind": "sweep",
            "mode": self.mode,
            "slo_p99_ms": self.slo_p99_ms,
            "max_error_rate": self.max_error_rate,
            "stopped_because": self.stopped_because,
            "best": None
            if best is None
            else {
                "load": best.load,
                "throughput_rps": round(best.throughput_rps, 3),
                "p99_ms": best.latency_ms["p99"],
                "stable": best.stable,
            },
            "steps": [s.to_dict() for s in self.steps],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepResult:
        return cls(
            mode=d["mode"],
            slo_p99_ms=d.get("slo_p99_ms"),
            max_error_rate=d.get("max_error_rate", 0.01),
            steps=[Result.from_dict(s) for s in d["steps"]],
            stopped_because=d.get("stopped_because", ""),
        )


def run_step(config: LoadConfig, tolerance: float, max_windows: int, progress: Progress | None) -> Result:
    """One load level, run until stable or ``max_windows`` windows; figures from the last 3."""
    seen = [0]

    def stop_when(windows: list[Window]) -> bool:
        seen[0] = len(windows)
        return is_stable(windows, tolerance)

    cfg = replace(config, duration=config.window * max_windows, requests=None)
    full = run_load(cfg, progress=progress, stop_when=stop_when, scrape_windows=True)
    considered = full.raw_windows[: seen[0]] or full.raw_windows
    last = considered[-STABLE_WINDOWS:]
    hist, errors, span = merge(last)
    snaps, n = full.snapshots, len(considered)
    server = None
    if len(snaps) > n and n >= len(last):
        server = server_metrics.delta(snaps[n - len(last)], snaps[n])
    return Result(
        mode=full.mode,
        load=full.load,
        duration_s=span,
        sent=int(hist.get_total_count()) + sum(errors.values()),
        ok=int(hist.get_total_count()),
        errors=errors,
        histogram=hist,
        windows=full.windows,
        schedule_lag_ms=full.schedule_lag_ms,
        client_queued=full.client_queued,
        server=server,
        stable=is_stable(considered, tolerance),
        config=full.config,
        error_samples=full.error_samples,
    )


def run_sweep(
    base: LoadConfig,
    spec: SweepSpec,
    slo_p99_ms: float | None = None,
    tolerance: float = 0.15,
    max_windows: int = 10,
    max_steps: int = 10,
    max_error_rate: float = 0.01,
    progress: Progress | None = None,
    on_step: Callable[[Result], None] | None = None,
) -> SweepResult:
    """Run every level of ``spec`` (or double until the curve bends) and collect the steps."""
    if not 0 < tolerance < 1:
        raise ConfigError(f"--stability must be a fraction in (0, 1), got {tolerance}")
    if not STABLE_WINDOWS <= max_windows <= 1000:
        raise ConfigError(f"--max-windows must be between {STABLE_WINDOWS} and 1000, got {max_windows}")
    if not 1 <= max_steps <= MAX_SWEEP_STEPS:
        raise ConfigError(f"--max-steps must be between 1 and {MAX_SWEEP_STEPS}, got {max_steps}")
    if slo_p99_ms is not None and slo_p99_ms <= 0:
        raise ConfigError(f"--slo-p99-ms must be positive, got {slo_p99_ms}")
    out = SweepResult(spec.mode, slo_p99_ms, max_error_rate)
    levels = spec.values if spec.values is not None else [spec.start * 2**k for k in range(max_steps)]
    for level in levels[:MAX_SWEEP_STEPS]:
        if spec.mode == "open":
            cfg = replace(base, rate=float(level), concurrency=None)
        else:
            cfg = replace(base, concurrency=int(level), rate=None)
        best_before = out.best
        step = run_step(cfg, tolerance, max_windows, progress)
        out.steps.append(step)
        if on_step is not None:
            on_step(step)
        if spec.values is not None:
            continue
        if not out.passes(step):
            out.stopped_because = f"level {level:g} broke the SLO (p99 or error rate)"
            break
        if best_before is not None and step.throughput_rps < RISE * best_before.throughput_rps:
            out.stopped_because = f"throughput stopped rising at level {level:g}"
            break
    else:
        out.stopped_because = "all levels run" if spec.values is not None else "reached --max-steps"
    return out
