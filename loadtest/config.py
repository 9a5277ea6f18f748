"""What a run does: :class:`LoadConfig`, validated before anything is sent."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .http import Target
from .payloads import kinds

DEFAULT_DURATION_S = 10.0  # when neither --duration nor --requests is given
MAX_DURATION_S = 3600.0  # the hard bound on any run, whatever else is given
ENGINES = ("raw", "aiohttp")
ARRIVALS = ("constant", "poisson")


class ConfigError(ValueError):
    """A bad argument, worded for the person who typed it."""


class LoadError(RuntimeError):
    """The run could not start (e.g. nothing listens at the URL)."""


@dataclass
class LoadConfig:
    """One load run. Exactly one of ``concurrency`` (closed loop) or ``rate`` (open loop)."""

    url: str = "http://127.0.0.1:8000"
    model: str = ""
    kind: str = "classify"
    version: str | None = None
    image: str | Path | None = None  # a file or a directory of images, cycled
    images: list[bytes] | None = None  # or the encoded images themselves
    concurrency: int | None = None
    rate: float | None = None  # requests/s, open loop
    arrival: str = "constant"  # or "poisson"
    connections: int = 256  # open loop: most requests in flight (each its own connection)
    duration: float | None = None  # seconds measured, after warm-up
    requests: int | None = None  # requests measured, after warm-up
    warmup: float = 1.0
    timeout: float = 10.0  # per request
    window: float = 1.0  # measurement window (progress, stability)
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    metrics: bool = True
    metrics_url: str | None = None
    engine: str = "raw"
    seed: int = 0

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"

    @property
    def load(self) -> float:
        return float(self.rate if self.rate is not None else self.concurrency or 1)

    @property
    def time_limit(self) -> float:
        """Seconds of measurement at most (the run adds warm-up and the drain of in-flight requests)."""
        if self.duration is not None:
            return self.duration
        return MAX_DURATION_S if self.requests is not None else DEFAULT_DURATION_S

    def validate(self) -> None:
        """Raise :class:`ConfigError` with a clear message for anything that cannot run."""
        try:
            Target.parse(self.url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.metrics_url is not None:
            try:
                Target.parse(self.metrics_url)
            except ValueError as exc:
                raise ConfigError(f"--metrics-url: {exc}") from None
        if not self.model or "/" in self.model:
            raise ConfigError("--model NAME is required (a model name, no slashes)")
        if self.kind not in kinds():
            raise ConfigError(f"--kind must be one of {', '.join(kinds())}, got {self.kind!r}")
        if self.image is None and not self.images:
            raise ConfigError("--image FILE|DIR is required")
        if self.image is not None and not Path(self.image).exists():
            raise ConfigError(f"--image {self.image}: no such file or directory")
        if self.concurrency is not None and self.rate is not None:
            raise ConfigError("choose one of --concurrency (closed loop) or --rate (open loop), not both")
        if self.concurrency is not None and not 1 <= self.concurrency <= 10_000:
            raise ConfigError(f"--concurrency must be between 1 and 10000, got {self.concurrency}")
        if self.rate is not None and not (math.isfinite(self.rate) and 0 < self.rate <= 1_000_000):
            raise ConfigError(f"--rate must be a positive number of requests/s, got {self.rate}")
        if self.arrival not in ARRIVALS:
            raise ConfigError(f"--arrival must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if not 1 <= self.connections <= 10_000:
            raise ConfigError(f"--connections must be between 1 and 10000, got {self.connections}")
        if self.duration is not None and not 0 < self.duration <= MAX_DURATION_S:
            raise ConfigError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds, got {self.duration}")
        if self.requests is not None and self.requests < 1:
            raise ConfigError(f"--requests must be at least 1, got {self.requests}")
        if not 0 <= self.warmup <= 600:
            raise ConfigError(f"--warmup must be in [0, 600] seconds, got {self.warmup}")
        if not 0 < self.timeout <= 600:
            raise ConfigError(f"--timeout must be in (0, 600] seconds, got {self.timeout}")
        if not 0.05 <= self.window <= 600:
            raise ConfigError(f"--window must be in [0.05, 600] seconds, got {self.window}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-safe settings (image bytes left out)."""
        d = asdict(self)
        d.pop("images")
        d["image"] = str(self.image) if self.image is not None else None
        d["headers"] = {
            k: ("<redacted>" if k.lower() in ("authorization", "x-api-key") else v) for k, v in self.headers.items()
        }
        d["mode"] = self.mode
        return d
