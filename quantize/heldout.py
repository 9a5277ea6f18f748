"""The held-out report: int8 against fp32 on images that no decision saw, with bootstrap confidence intervals.

The sets are small (a couple of dozen photos), so a single figure would overstate what is known. The interval
is a percentile bootstrap; when the images come in groups (the crops of one photo), whole groups are
resampled — crops of one photo are not independent, and resampling them one by one would give an interval
far narrower than the evidence. A bootstrap cannot show any uncertainty when every image agrees (each
replicate then scores 100 %), so the interval is widened to at least the Wilson score interval of the same
proportion over the images: 322 agreements out of 322 give 98.8 %–100 %, not 100 %–100 %.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .guard import CONFIDENT, MIN_CONFIDENT, Fidelity, confidence, fidelity

REPS = 2000
LEVEL = 0.95


def wilson_ci(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % for the default ``z``)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def bootstrap_ci(values: np.ndarray, groups: np.ndarray | None = None, reps: int = REPS, level: float = LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values``, resampling ``groups`` whole when given.

    For 0/1 values the interval is at least as wide as the Wilson score interval (see the module's doc).
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    if groups is None:
        groups = np.arange(len(values))
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    sums = np.bincount(g, weights=values)
    counts = np.bincount(g).astype(np.float64)
    # how often each group is drawn in each replicate (multinomial = drawing len(groups) with replacement)
    draws = rng.multinomial(len(sums), np.full(len(sums), 1 / len(sums)), size=reps)
    totals = draws @ counts
    stats = (draws @ sums)[totals > 0] / totals[totals > 0]
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    if np.isin(values, (0.0, 1.0)).all():
        w_lo, w_hi = wilson_ci(float(values.sum()), len(values))
        lo, hi = min(lo, w_lo), max(hi, w_hi)
    return float(lo), float(hi)


@dataclass(frozen=True)
class HeldOut:
    """The held-out figure of an int8 model: its fidelity, and an interval for the guarded quantity."""

    fidelity: Fidelity
    drop_ci: tuple[float, float]  # interval of ``fidelity.drop``
    agreement_confident_ci: tuple[float, float] | None
    source: str
    groups: int | None  # how many source photos (groups) the images came from

    def as_dict(self) -> dict[str, object]:
        return {"source": self.source, "groups": self.groups, "fidelity": self.fidelity.as_dict(),
                "drop_ci95": [round(v, 5) for v in self.drop_ci],
                "top1_agreement_confident_ci95": [round(v, 5) for v in self.agreement_confident_ci]
                if self.agreement_confident_ci else None,
                "bootstrap": f"{REPS} percentile-bootstrap replicates"
                             + (", resampling whole source photos" if self.groups else ", resampling images")}

    def summary(self) -> str:
        f = self.fidelity
        s = f"held out ({f.images} images"
        s += f" from {self.groups} photos)" if self.groups else ")"
        if f.top1_agreement_confident is not None and self.agreement_confident_ci:
            lo, hi = self.agreement_confident_ci
            s += (f": top-1 agreement {f.top1_agreement_confident:.1%} (95 % CI {lo:.1%}–{hi:.1%}) over "
                  f"{f.confident_images} confident images, {f.top1_agreement:.1%} over all")
        else:
            s += f": top-1 agreement {f.top1_agreement:.1%}"
        if f.fp32_top1 is not None:
            lo, hi = self.drop_ci
            s += (f"; accuracy fp32 {f.fp32_top1:.1%} → int8 {f.int8_top1:.1%} (drop {f.drop:.2%}, "
                  f"95 % CI {lo:.2%}–{hi:.2%})")
        return s


def held_out(ref: np.ndarray, got: np.ndarray, targets: np.ndarray | None, groups: list[int] | None,
             source: str, activation: str = "softmax") -> HeldOut:
    """Fidelity of logits ``got`` against fp32 ``ref``, with intervals from the bootstrap (``activation``:
    the manifest's, as in ``guard.fidelity``)."""
    f = fidelity(ref, got, targets, activation)
    g = np.asarray(groups) if groups is not None else None
    same = (ref.argmax(1) == got.argmax(1)).astype(np.float64)
    conf = confidence(ref, activation) >= CONFIDENT
    conf_ci = bootstrap_ci(same[conf], g[conf] if g is not None else None) if conf.any() else None
    if targets is not None:
        # paired: each image's fp32 correctness minus its int8 correctness
        per = (ref.argmax(1) == targets).astype(np.float64) - (got.argmax(1) == targets)
        drop_ci = bootstrap_ci(per, g)
    elif conf_ci is not None and f.confident_images >= MIN_CONFIDENT:
        drop_ci = (1 - conf_ci[1], 1 - conf_ci[0])
    else:
        lo, hi = bootstrap_ci(same, g)
        drop_ci = (1 - hi, 1 - lo)
    return HeldOut(f, drop_ci, conf_ci, source, len(set(groups)) if groups is not None else None)
