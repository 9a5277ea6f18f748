"""Procedurally generated stroke glyphs in the style of scikit-learn's digits: extra training classes for the
one-shot digits model (``examples/train_digits_oneshot.py``) that are not digits.

A *class* is a template of 1–3 random pen strokes (straight lines, quadratic and cubic Bézier curves with
control points drawn uniformly in a box, elliptic arcs of random centre, radii, start and sweep; a stroke
often starts on the previous one, as a pen does). An *instance* is the template written again by a
slightly different hand: every control point jittered, a random shear / rotation / aspect change, a random
pen width. Each instance is drawn as a binary 32×32 bitmap, scaled to fill the frame the way the UCI
optdigits bitmaps were normalised, and reduced to 8×8 exactly as ``load_digits`` was made: the number of
ink pixels in each non-overlapping 4×4 block (0–16).

Nothing here renders a font or draws a digit: templates are random strokes. Among thousands of random
templates some will look like some digit by chance (one straight stroke like a 1, a closed loop like a 0,
a loop on a stem like a 6 or a 9); that is chance, not construction, and nothing filters them (a filter
would have to compare against digit images).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

BITMAP = 32  # the optdigits bitmaps were 32×32, counted in 4×4 blocks into 8×8


def _bezier(points: np.ndarray, n: int = 24) -> np.ndarray:
    """Points along the Bézier curve of the given control points (a line for 2, quadratic 3, cubic 4)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = [np.broadcast_to(p, (n, 2)) for p in points]
    while len(pts) > 1:  # de Casteljau
        pts = [(1 - t) * pts[i] + t * pts[i + 1] for i in range(len(pts) - 1)]
    return np.asarray(pts[0])


def _curve(points: np.ndarray) -> np.ndarray:
    """Points along a stroke: one Bézier segment (2–4 control points) or a chain of cubic segments
    (3k + 1 points, each segment sharing its end point with the next, so jitter keeps the chain joined)."""
    if len(points) <= 4:
        return _bezier(points)
    return np.concatenate([_bezier(points[i:i + 4]) for i in range(0, len(points) - 1, 3)])


def _arc(rng: np.random.Generator, box: np.ndarray) -> np.ndarray:
    """Control points of an elliptic arc (90°–360°, either direction) as a chain of cubic Bézier segments."""
    centre = rng.uniform(0.25, 0.75, 2) * box
    radii = rng.uniform(0.15, 0.5, 2) * box
    start, sweep = rng.uniform(0, 2 * np.pi), rng.uniform(np.pi / 2, 2 * np.pi) * rng.choice([-1, 1])
    n = int(np.ceil(abs(sweep) / (np.pi / 2)))
    step = sweep / n
    k = 4 / 3 * np.tan(step / 4)  # the standard cubic approximation of a circular arc
    pts = []
    for i in range(n):
        a, b = start + i * step, start + (i + 1) * step
        p0, p3 = np.array([np.cos(a), np.sin(a)]), np.array([np.cos(b), np.sin(b)])
        p1, p2 = p0 + k * np.array([-np.sin(a), np.cos(a)]), p3 - k * np.array([-np.sin(b), np.cos(b)])
        pts += [p0, p1, p2] if i < n - 1 else [p0, p1, p2, p3]
    return centre + np.asarray(pts) * radii


def stroke(rng: np.random.Generator, box: np.ndarray, previous: list[np.ndarray], arc: float = 0.25,
           last: bool = True) -> np.ndarray:
    """Control points of one more stroke: an elliptic arc (probability ``arc``) or a 2–4 point Bézier; often
    started on the previous stroke (``last``) or on any earlier one, like a pen that did not lift."""
    if rng.random() < arc:
        pts = _arc(rng, box)
    else:
        pts = rng.uniform(0.0, 1.0, (int(rng.choice([2, 3, 4, 4])), 2)) * box
    if previous and rng.random() < 0.6:
        prev = _curve(previous[-1] if last else previous[int(rng.integers(len(previous)))])
        pts = pts - pts[0] + prev[rng.integers(len(prev))]
    return pts


def template(rng: np.random.Generator, arc: float = 0.25) -> list[np.ndarray]:
    """One glyph class: a list of strokes, each an array of Bézier control points (see ``_curve``)."""
    strokes: list[np.ndarray] = []
    box = np.array([rng.uniform(0.35, 1.0), 1.0])  # written taller than wide, like most characters
    for _ in range(int(rng.choice([1, 2, 2, 3]))):
        strokes.append(stroke(rng, box, strokes, arc))
    return strokes


def instance(strokes: list[np.ndarray], rng: np.random.Generator, jitter: float = 0.05,
             pen: tuple[float, float] = (2.0, 5.0), fill: bool = False) -> np.ndarray:
    """One handwritten instance of a template: an 8×8 float array of ink counts 0–16. ``fill``: the glyph
    fills the frame to within 0.3 pen widths (no random margin), as thick-pen digits do."""
    a = np.radians(rng.uniform(-10, 10))
    shear, aspect = rng.uniform(-0.25, 0.25), rng.uniform(0.8, 1.25)
    m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[aspect, shear], [0.0, 1.0]])
    curves = [_curve(s + rng.normal(0.0, jitter, s.shape)) @ m.T for s in strokes]
    allpts = np.concatenate(curves)
    lo, hi = allpts.min(0), allpts.max(0)
    width = rng.uniform(*pen)
    # the height fills the frame (minus the pen), unless the width would overflow; aspect ratio kept,
    # centred: how the optdigits bitmaps look
    room = BITMAP - width * 0.3 if fill else BITMAP - width - rng.uniform(0.0, 2.0)
    h, w = float(hi[1] - lo[1]), float(hi[0] - lo[0])
    scale = min(room / max(h, 0.15), room / max(w, 1e-3))
    centre = (lo + hi) / 2
    img = Image.new("1", (BITMAP, BITMAP), 0)
    draw = ImageDraw.Draw(img)
    for c in curves:
        xy = (c - centre) * scale + BITMAP / 2
        draw.line([tuple(p) for p in xy], fill=1, width=max(1, round(width)), joint="curve")
    bits = np.asarray(img, dtype=np.float32)
    return bits.reshape(8, 4, 8, 4).sum(axis=(1, 3))


def glyph_set(classes: int, per_class: int, seed: int) -> np.ndarray:
    """``[classes, per_class, 8, 8]`` ink counts (0–16) of random glyph classes, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    out = np.empty((classes, per_class, 8, 8), dtype=np.float32)
    for c in range(classes):
        t = template(rng)
        for i in range(per_class):
            out[c, i] = instance(t, rng)
    return out
