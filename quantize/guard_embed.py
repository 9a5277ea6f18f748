"""The int8 guard of embedding models (``task: embed``, whose ``guard_metric`` is ``cosine``).

An embedding has no top-1 to agree on; what a user of it relies on is (a) that each vector still points
where the fp32 one did — the **cosine similarity** of the int8 embedding to the fp32 embedding of the same
image — and (b) that what the vectors are used for still works: **N-way 1-shot identification** (enrol one
image per class, name the others by the nearest enrolled one; ``quantize/evaluate_embed.py``), scored on
the same random episodes for fp32 and int8, so the difference is paired.

- On the *selection* set the guard bounds the mean cosine (``--min-cosine``): what stays in float is chosen
  there, through the same fallback as for classifiers (the "drop" is 1 − mean cosine).
- On the *held-out* set both are measured, with intervals (cosine mean and 5th percentile: percentile
  bootstrap, resampling whole source photos when the images are crops of photos; one-shot drop: over the
  paired episodes), and the result is **refused** (nothing written) if the held-out mean cosine is under
  ``--min-cosine`` or the one-shot accuracy fell by more than ``--max-oneshot-drop``.

Classes for one-shot: an ImageFolder's sub-folders, or, for the built-in ``natural`` crops, the photograph
each crop came from (identifying which photo a crop shows, as docs/embeddings.md does).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from .evaluate_embed import Episodes, episode_accuracies
from .heldout import LEVEL, REPS, bootstrap_ci
from .int8 import QuantizeError

log = logging.getLogger("visionserve.quantize")

COSINE_KIND = "cosine shortfall (1 − mean cosine to fp32)"
LOW_PERCENTILE = 5


def unit(x: np.ndarray) -> np.ndarray:
    """Rows flattened and scaled to unit length (float64)."""
    x = x.reshape(len(x), -1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per image, the cosine similarity of the int8 embedding ``got`` to the fp32 embedding ``ref``."""
    return (unit(ref) * unit(got)).sum(1)


def one_shot_classes(targets: list[int] | None, groups: list[int] | None) -> np.ndarray | None:
    """The class of each image for one-shot episodes (labels, else source photo); None when there are not at
    least two classes with two images each."""
    classes = targets if targets is not None else groups
    if classes is None:
        return None
    c = np.asarray(classes)
    counts = np.unique(c, return_counts=True)[1]
    return c if (counts >= 2).sum() >= 2 and (counts >= 2).all() else None


@dataclass(frozen=True)
class EmbedFidelity:
    """How the int8 embeddings compare with the fp32 ones, and what that does to one-shot identification."""

    images: int
    cosine_mean: float
    cosine_p5: float
    cosine_min: float
    fp32_oneshot: float | None = None
    int8_oneshot: float | None = None
    ways: int | None = None
    episodes: int | None = None

    @property
    def drop(self) -> float:
        """What ``--min-cosine`` bounds, as a drop: 1 − the mean cosine."""
        return 1.0 - self.cosine_mean

    @property
    def drop_kind(self) -> str:
        return COSINE_KIND

    @property
    def oneshot_drop(self) -> float | None:
        if self.fp32_oneshot is None or self.int8_oneshot is None:
            return None
        return self.fp32_oneshot - self.int8_oneshot

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}
        d["drop"] = round(self.drop, 6)
        d["drop_kind"] = self.drop_kind
        d["oneshot_drop"] = round(self.oneshot_drop, 5) if self.oneshot_drop is not None else None
        return d

    def summary(self) -> str:
        s = (f"cosine to fp32 over {self.images} images: mean {self.cosine_mean:.4f}, "
             f"p{LOW_PERCENTILE} {self.cosine_p5:.4f}, min {self.cosine_min:.4f}")
        if self.oneshot_drop is not None:
            s += (f"; {self.ways}-way 1-shot fp32 {self.fp32_oneshot:.1%} → int8 {self.int8_oneshot:.1%} "
                  f"({self.episodes} episodes)")
        return s


def _one_shot(ref: np.ndarray, got: np.ndarray, classes: np.ndarray | None, ep: Episodes
              ) -> tuple[np.ndarray, np.ndarray] | None:
    if classes is None:
        return None
    return episode_accuracies(unit(ref), classes, ep), episode_accuracies(unit(got), classes, ep)


def embed_fidelity(ref: np.ndarray, got: np.ndarray, classes: np.ndarray | None = None,
                   ep: Episodes = Episodes()) -> EmbedFidelity:
    """Compare int8 embeddings ``got`` with fp32 ``ref`` (one row per image); ``classes`` for one-shot."""
    c = cosines(ref, got)
    kw: dict[str, float | int] = {}
    pair = _one_shot(ref, got, classes, ep)
    if pair is not None and classes is not None:
        kw = {"fp32_oneshot": float(pair[0].mean()), "int8_oneshot": float(pair[1].mean()),
              "ways": int(min(ep.ways, len(np.unique(classes)))), "episodes": len(pair[0])}
    return EmbedFidelity(len(c), float(c.mean()), float(np.percentile(c, LOW_PERCENTILE)), float(c.min()),
                         **kw)  # type: ignore[arg-type]


def bootstrap_percentile_ci(values: np.ndarray, q: float, groups: np.ndarray | None = None, reps: int = REPS,
                            level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the ``q``-th percentile of ``values``, resampling ``groups`` whole."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(len(values))]
    else:
        g = np.asarray(groups)
        members = [np.flatnonzero(g == u) for u in np.unique(g)]
    stats = np.empty(reps)
    for r in range(reps):
        pick = rng.integers(0, len(members), len(members))
        stats[r] = np.percentile(values[np.concatenate([members[i] for i in pick])], q)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class EmbedHeldOut:
    """The held-out figures of an int8 embedding model, with 95 % intervals."""

    fidelity: EmbedFidelity
    cosine_mean_ci: tuple[float, float]
    cosine_p5_ci: tuple[float, float]
    oneshot_drop_ci: tuple[float, float] | None  # over the paired episodes
    source: str
    groups: int | None

    @property
    def drop(self) -> float:
        return self.fidelity.drop

    def as_dict(self) -> dict[str, object]:
        return {"source": self.source, "groups": self.groups, "fidelity": self.fidelity.as_dict(),
                "cosine_mean_ci95": [round(v, 6) for v in self.cosine_mean_ci],
                f"cosine_p{LOW_PERCENTILE}_ci95": [round(v, 6) for v in self.cosine_p5_ci],
                "oneshot_drop_ci95": [round(v, 5) for v in self.oneshot_drop_ci] if self.oneshot_drop_ci else None,
                "bootstrap": f"{REPS} percentile-bootstrap replicates"
                             + (", resampling whole source photos" if self.groups else ", resampling images")
                             + "; one-shot: percentiles of the paired per-episode differences' mean"}

    def summary(self) -> str:
        f = self.fidelity
        s = f"held out ({f.images} images" + (f" from {self.groups} photos)" if self.groups else ")")
        lo, hi = self.cosine_mean_ci
        plo, phi = self.cosine_p5_ci
        s += (f": cosine to fp32 mean {f.cosine_mean:.4f} (95 % CI {lo:.4f}–{hi:.4f}), p{LOW_PERCENTILE} "
              f"{f.cosine_p5:.4f} ({plo:.4f}–{phi:.4f}), min {f.cosine_min:.4f}")
        if f.oneshot_drop is not None and self.oneshot_drop_ci is not None:
            dlo, dhi = self.oneshot_drop_ci
            s += (f"; {f.ways}-way 1-shot fp32 {f.fp32_oneshot:.1%} → int8 {f.int8_oneshot:.1%} (drop "
                  f"{100 * f.oneshot_drop:.2f} pt, 95 % CI {100 * dlo:.2f} to {100 * dhi:.2f} pt)")
        return s


def embed_held_out(ref: np.ndarray, got: np.ndarray, classes: np.ndarray | None, groups: list[int] | None,
                   source: str, ep: Episodes = Episodes()) -> EmbedHeldOut:
    """``embed_fidelity`` on the held-out set, with bootstrap intervals."""
    f = embed_fidelity(ref, got, classes, ep)
    c = cosines(ref, got)
    g = np.asarray(groups) if groups is not None else None
    mean_ci = bootstrap_ci(c, g)
    p5_ci = bootstrap_percentile_ci(c, LOW_PERCENTILE, g)
    drop_ci = None
    pair = _one_shot(ref, got, classes, ep)
    if pair is not None:
        # the mean of the paired differences, bootstrapped over episodes (episodes share images, so this
        # interval is a lower bound on the real uncertainty; the per-photo cosine intervals are the wider read)
        drop_ci = bootstrap_ci(pair[0] - pair[1])
    return EmbedHeldOut(f, mean_ci, p5_ci, drop_ci, source, len(set(groups)) if groups is not None else None)


def gate(held: EmbedFidelity | None, selection: EmbedFidelity | None, max_drop: float | None,
         max_oneshot_drop: float | None) -> None:
    """Raise QuantizeError (nothing is written) when the held-out figures — or the selection set's, when there
    is no held-out set — fall under ``1 - max_drop`` mean cosine or lose more than ``max_oneshot_drop`` one-shot
    accuracy."""
    f, where = (held, "held-out") if held is not None else (selection, "selection")
    if f is None:
        return
    problems = []
    if max_drop is not None and f.drop > max_drop:
        problems.append(f"mean cosine to fp32 {f.cosine_mean:.4f} is under --min-cosine {1 - max_drop:g}")
    if max_oneshot_drop is not None:
        if f.oneshot_drop is None:
            log.info("one-shot accuracy not measured (the %s images have no classes): --max-oneshot-drop unchecked",
                     where)
        elif f.oneshot_drop > max_oneshot_drop:
            problems.append(f"{f.ways}-way 1-shot accuracy fell {100 * f.oneshot_drop:.2f} pt "
                            f"({f.fp32_oneshot:.1%} → {f.int8_oneshot:.1%}), over --max-oneshot-drop "
                            f"{max_oneshot_drop:g} ({100 * max_oneshot_drop:.2f} pt)")
    if problems:
        raise QuantizeError(f"the int8 embedding model fails the guard on the {where} images ({f.images}): "
                            + "; ".join(problems) + ". Nothing was written. Try another --method, more "
                            "calibration images, --min-cosine lower or --max-oneshot-drop higher.")
