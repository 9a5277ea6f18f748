"""Latency histograms (HDR, microseconds), measurement windows and the result of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

HIGHEST_US = 600_000_000  # 10 minutes: above any --timeout we accept
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def new_histogram() -> HdrHistogram:
    """Microseconds from 1 µs to 10 min with 3 significant digits (≤ 0.1 % error)."""
    return HdrHistogram(1, HIGHEST_US, 3)


def to_us(seconds: float) -> int:
    return max(1, min(int(seconds * 1e6), HIGHEST_US))


def pkey(p: float) -> str:
    """50.0 → 'p50', 99.9 → 'p99.9'."""
    return f"p{p:g}"


def latency_summary(hist: HdrHistogram) -> dict[str, float | None]:
    """min, mean, stdev, percentiles and max of a histogram, in milliseconds (None when empty)."""
    keys = ["min", "mean", "stdev", *(pkey(p) for p in PERCENTILES), "max"]
    if hist.get_total_count() == 0:
        return dict.fromkeys(keys)
    out: dict[str, float | None] = {
        "min": hist.get_min_value() / 1e3,
        "mean": hist.get_mean_value() / 1e3,
        "stdev": hist.get_stddev() / 1e3,
    }
    for p in PERCENTILES:
        out[pkey(p)] = hist.get_value_at_percentile(p) / 1e3
    out["max"] = hist.get_max_value() / 1e3
    return {k: round(v, 4) if v is not None else None for k, v in out.items()}


def percentile_curve(hist: HdrHistogram) -> list[tuple[float, float]]:
    """(percentile, latency ms) points for an HDR percentile plot."""
    if hist.get_total_count() == 0:
        return []
    return [
        (item.percentile_level_iterated_to, item.value_iterated_to / 1e3) for item in hist.get_percentile_iterator(5)
    ]


class Window:
    """Requests completed in one measurement window: successes in a histogram, failures by cause."""

    __slots__ = ("ended", "errors", "hist", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.ended = started
        self.hist = new_histogram()
        self.errors: dict[str, int] = {}

    def record_ok(self, latency_s: float) -> None:
        self.hist.record_value(to_us(latency_s))

    def record_error(self, cause: str) -> None:
        self.errors[cause] = self.errors.get(cause, 0) + 1

    @property
    def ok(self) -> int:
        return int(self.hist.get_total_count())

    def summary(self, origin: float) -> dict[str, Any]:
        span = max(self.ended - self.started, 1e-9)
        lat = latency_summary(self.hist)
        return {
            "start_s": round(self.started - origin, 4),
            "duration_s": round(span, 4),
            "ok": self.ok,
            "errors": dict(self.errors),
            "throughput_rps": round(self.ok / span, 3),
            "p50_ms": lat["p50"],
            "p99_ms": lat["p99"],
        }


def merge(windows: list[Window]) -> tuple[HdrHistogram, dict[str, int], float]:
    """One histogram, the error counts and the time spanned by consecutive windows."""
    hist = new_histogram()
    errors: dict[str, int] = {}
    for w in windows:
        hist.add(w.hist)
        for k, v in w.errors.items():
            errors[k] = errors.get(k, 0) + v
    span = windows[-1].ended - windows[0].started if windows else 0.0
    return hist, errors, span


@dataclass
class Result:
    """What one run measured. ``to_dict()`` is the ``--json`` format; ``from_dict`` reads it back."""

    mode: str  # "closed" (concurrency) or "open" (rate)
    load: float  # concurrency, or offered requests/s
    duration_s: float
    sent: int
    ok: int
    errors: dict[str, int]
    histogram: HdrHistogram
    windows: list[dict[str, Any]] = field(default_factory=list)
    schedule_lag_ms: dict[str, float | None] | None = None
    client_queued: int = 0
    server: dict[str, Any] | None = None
    stable: bool | None = None
    config: dict[str, Any] = field(default_factory=dict)
    error_samples: dict[str, str] = field(default_factory=dict)
    # kept in memory for sweeps, not written to JSON
    raw_windows: list[Window] = field(default_factory=list, repr=False)
    snapshots: list[dict[str, float] | None] = field(default_factory=list, repr=False)

    @property
    def throughput_rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def latency_ms(self) -> dict[str, float | None]:
        return latency_summary(self.histogram)

    def percentile_ms(self, p: float) -> float:
        return self.histogram.get_value_at_percentile(p) / 1e3

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "load": self.load,
            "duration_s": round(self.duration_s, 4),
            "sent": self.sent,
            "ok": self.ok,
            "errors": dict(sorted(self.errors.items())),
            "error_rate": round(self.error_count / max(self.ok + self.error_count, 1), 6),
            "throughput_rps": round(self.throughput_rps, 3),
            "latency_ms": self.latency_ms,
            "schedule_lag_ms": self.schedule_lag_ms,
            "client_queued": self.client_queued,
            "server": self.server,
            "stable": self.stable,
            "windows": self.windows,
            "percentile_curve": percentile_curve(self.histogram),
            "histogram_us": self.histogram.encode().decode("ascii"),
            "error_samples": self.error_samples,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        hist = HdrHistogram.decode(d["histogram_us"]) if d.get("histogram_us") else new_histogram()
        return cls(
            mode=d["mode"],
            load=d["load"],
            duration_s=d["duration_s"],
            sent=d["sent"],
            ok=d["ok"],
            errors=dict(d.get("errors", {})),
            histogram=hist,
            windows=list(d.get("windows", [])),
            schedule_lag_ms=d.get("schedule_lag_ms"),
            client_queued=d.get("client_queued", 0),
            server=d.get("server"),
            stable=d.get("stable"),
            config=dict(d.get("config", {})),
            error_samples=dict(d.get("error_samples", {})),
        )
