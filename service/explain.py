"""Gradient-free visual explanations: masks over the model's input tensor, scores, and a saliency map.

Only forward passes, so it explains the model really served (fp32, int8, any execution provider):

- **occlusion**: a grey patch (the normalised tensor's zero, i.e. the training mean colour) slides over the
  image; a pixel's saliency is the mean drop of the target's score over the patches that hide it, beyond the
  median patch's drop (what hiding anything at all costs).
- **RISE** (Petsiuk et al., 2018): random low-resolution binary grids, upsampled bilinearly with a random
  sub-cell shift, keep about half the image each; a pixel's saliency is how much the score rises, on average,
  when that pixel is kept (the masks' mean score is subtracted so that pixels that do not matter read 0).

Masks are applied to the preprocessed tensor (cheap, no re-decode) and only over the part of it that shows the
image (not a letterbox's padding); the saliency is then sampled back into the original image's pixels through
the same ``Geometry`` that maps detection boxes back, so a centre crop's cut-off borders read 0 (the model never
saw them) and EXIF orientation is the one the client sees. Everything is numpy; masks are made on demand from
their index (deterministic given the seed) so that no more than one masked tensor per worker exists at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .imaging import Geometry


@dataclass(frozen=True)
class Region:
    """The rectangle of the input tensor that holds image pixels: [x0, x1) × [y0, y1)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @classmethod
    def of(cls, geometry: Geometry, width: int, height: int) -> Region:
        """Where the original image lands in a ``width`` × ``height`` tensor (clipped to it)."""
        x0 = math.floor(max(0.0, geometry.offset_x))
        y0 = math.floor(max(0.0, geometry.offset_y))
        x1 = math.ceil(min(float(width), geometry.offset_x + geometry.width * geometry.scale_x))
        y1 = math.ceil(min(float(height), geometry.offset_y + geometry.height * geometry.scale_y))
        return cls(x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))


class Masks:
    """N masks over an H × W tensor (1 keeps a pixel, 0 hides it), made on demand from their index."""

    count: int
    height: int
    width: int

    def __call__(self, i: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def saliency(self, scores: np.ndarray, base: float) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class Occlusion(Masks):
    """Square patches of side ``patch`` every ``stride`` pixels, covering the region edge to edge."""

    def __init__(self, height: int, width: int, region: Region, patch: int, stride: int) -> None:
        self.height, self.width, self.region = height, width, region
        self.patch = max(1, min(patch, region.width, region.height))
        self.stride = max(1, stride)
        self.xs = _starts(region.x0, region.width, self.patch, self.stride)
        self.ys = _starts(region.y0, region.height, self.patch, self.stride)
        self.count = len(self.xs) * len(self.ys)

    @classmethod
    def with_default_patch(cls, height: int, width: int, region: Region, patch: int | None,
                           stride: int | None) -> Occlusion:
        """Default: a patch of 1/6 of the region's shorter side every half patch (11 x 11 = 121 masks on a
        square image): what one explanation of a 224-pixel classifier affords in about a second on 2 cores."""
        side = min(region.width, region.height)
        p = patch or max(1, round(side / 6))
        return cls(height, width, region, p, stride or max(1, p // 2))

    def box(self, i: int) -> tuple[int, int, int, int]:
        y, x = self.ys[i // len(self.xs)], self.xs[i % len(self.xs)]
        return x, y, x + self.patch, y + self.patch

    def __call__(self, i: int) -> np.ndarray:
        m = np.ones((self.height, self.width), dtype=np.float32)
        x0, y0, x1, y1 = self.box(i)
        m[y0:y1, x0:x1] = 0.0
        return m

    def saliency(self, scores: np.ndarray, base: float) -> np.ndarray:
        # Any grey patch moves the score a little, wherever it is (it is unlike the image): the median patch's
        # drop is that artefact, and only drops beyond it are evidence. Without this, on a cat pasted on noise
        # the noise read as a quarter of the map (mass inside the cat 2.4x its area share, vs 3x+ with it).
        drops = base - scores.astype(np.float64)
        drops -= float(np.median(drops))
        drop = np.zeros((self.height, self.width), dtype=np.float64)
        hidden = np.zeros((self.height, self.width), dtype=np.float64)
        for i, d in enumerate(drops):
            x0, y0, x1, y1 = self.box(i)
            drop[y0:y1, x0:x1] += d
            hidden[y0:y1, x0:x1] += 1.0
        return np.where(hidden > 0, drop / np.maximum(hidden, 1.0), 0.0)


class Rise(Masks):
    """``count`` random masks: ``cells`` × ``cells`` binary grids (each cell kept with ``keep``), upsampled
    bilinearly over the region and shifted by a random fraction of a cell."""

    def __init__(self, height: int, width: int, region: Region, count: int, seed: int, cells: int = 7,
                 keep: float = 0.5) -> None:
        self.height, self.width, self.region, self.count = height, width, region, count
        rng = np.random.default_rng(seed)
        self.grids = (rng.random((count, cells + 1, cells + 1)) < keep).astype(np.float32)
        ch, cw = math.ceil(region.height / cells), math.ceil(region.width / cells)
        self.shifts = np.stack([rng.integers(0, ch, count), rng.integers(0, cw, count)], axis=1)
        # separable bilinear upsampling of a (cells + 1)² grid to (cells + 1) cells of ch × cw pixels, as dense
        # matrices: mask = up_y[dy:dy + h] @ grid @ up_x[:, dx:dx + w]. einsum (its own loops, no BLAS threads)
        # on these was 7x faster than gathering neighbours (0.22 vs 1.7 ms for one 224² resample).
        self._up_y = _dense(_linear((np.arange((cells + 1) * ch) + 0.5) / ch - 0.5, cells + 1), cells + 1)
        self._up_x = _dense(_linear((np.arange((cells + 1) * cw) + 0.5) / cw - 0.5, cells + 1), cells + 1).T

    def __call__(self, i: int) -> np.ndarray:
        r = self.region
        dy, dx = self.shifts[i]
        rows = np.einsum("yc,cd->yd", self._up_y[dy:dy + r.height], self.grids[i])
        m = np.ones((self.height, self.width), dtype=np.float32)
        m[r.y0:r.y1, r.x0:r.x1] = np.einsum("yd,dx->yx", rows, self._cols(dx))
        return m

    def _cols(self, dx: int) -> np.ndarray:
        # contiguous: einsum over the strided slice was 5x slower (0.30 vs 0.06 ms)
        return np.ascontiguousarray(self._up_x[:, dx:dx + self.region.width])

    def saliency(self, scores: np.ndarray, base: float) -> np.ndarray:
        """Σ (score − mean) · mask ÷ Σ mask, per pixel. Upsampling is linear, so the masks that share a column
        shift are summed at the grid's column resolution and upsampled along the columns once per shift (~30
        full-size products instead of one per mask: RISE's 128 masks 90 → 10 ms on a busy machine). Outside
        the region every mask is 1 and the centred scores sum to 0: the map reads 0 there."""
        centred = scores.astype(np.float64) - float(np.mean(scores))
        r = self.region
        rows_at = self.shifts[:, :1] + np.arange(r.height)  # each mask's rows of up_y
        rows = np.einsum("kyc,kcd->kyd", self._up_y[rows_at].astype(np.float64), self.grids)
        total = np.zeros((r.height, r.width), dtype=np.float64)
        kept = np.zeros((r.height, r.width), dtype=np.float64)
        for dx in np.unique(self.shifts[:, 1]):
            same = self.shifts[:, 1] == dx
            up_x = self._cols(dx).astype(np.float64)
            total += np.einsum("yd,dx->yx", np.einsum("k,kyd->yd", centred[same], rows[same]), up_x)
            kept += np.einsum("yd,dx->yx", rows[same].sum(axis=0), up_x)
        out = np.zeros((self.height, self.width), dtype=np.float64)
        out[r.y0:r.y1, r.x0:r.x1] = total / np.maximum(kept, 1e-6)
        return out


def _starts(origin: int, length: int, patch: int, stride: int) -> list[int]:
    """Patch starts every ``stride`` from ``origin``, the last one flush with the far edge."""
    last = origin + length - patch
    starts = list(range(origin, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


Axis = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # lo, hi, weight of hi, inside


def _linear(pos: np.ndarray, n: int) -> Axis:
    """Linear interpolation at positions ``pos`` (pixel units, centres at integers) of an axis of ``n``
    samples: the two neighbours, the weight of the upper one, and which positions lie on the axis at all."""
    inside = (pos >= -0.5) & (pos <= n - 0.5)
    p = np.clip(pos, 0, n - 1)
    lo = np.floor(p).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, (p - lo).astype(np.float32), inside


def _dense(axis_: Axis, n: int) -> np.ndarray:
    """The interpolation of an axis as a matrix: positions × ``n`` samples (two weights per row)."""
    lo, hi, w, _ = axis_
    m = np.zeros((len(lo), n), dtype=np.float32)
    rows = np.arange(len(lo))
    np.add.at(m, (rows, lo), 1 - w)
    np.add.at(m, (rows, hi), w)
    return m


def _resample(a: np.ndarray, axis_: Axis, axis: int) -> np.ndarray:
    """``a`` interpolated along ``axis``. Gathers and multiplies, no BLAS: numpy's threaded BLAS on small
    matrices was 17x slower here, spinning threads beside the inference workers."""
    lo, hi, w, _ = axis_
    if axis == 0:
        return a[lo] * (1 - w)[:, None] + a[hi] * w[:, None]  # type: ignore[no-any-return]
    return a[:, lo] * (1 - w) + a[:, hi] * w  # type: ignore[no-any-return]


def apply(tensor: np.ndarray, mask: np.ndarray, layout: str, out: np.ndarray | None = None) -> np.ndarray:
    """The tensor with hidden pixels set to 0 (the normalised mean colour); one image, no batch axis."""
    return np.multiply(tensor, mask[None] if layout == "NCHW" else mask[..., None], out=out)


def to_original(saliency: np.ndarray, geometry: Geometry, rows: int, cols: int) -> np.ndarray:
    """Sample an H × W tensor-pixel map at the centres of a rows × cols grid over the original image.

    ``tensor_xy = original_xy * scale + offset`` (the detector's box mapping); a cell whose centre falls outside
    the tensor (cut off by a centre crop) reads 0: the model never saw it.
    """
    h, w = saliency.shape
    ys = _linear((np.arange(rows) + 0.5) * geometry.height / rows * geometry.scale_y + geometry.offset_y - 0.5, h)
    xs = _linear((np.arange(cols) + 0.5) * geometry.width / cols * geometry.scale_x + geometry.offset_x - 0.5, w)
    out = _resample(_resample(saliency, ys, 0), xs, 1)
    out[~ys[3]] = 0.0
    out[:, ~xs[3]] = 0.0
    return out


def normalise(grid: np.ndarray) -> np.ndarray:
    """Positive evidence scaled to [0, 1] (the peak is 1; an all-zero map stays 0)."""
    g = np.clip(np.nan_to_num(grid, nan=0.0), 0, None)
    peak = float(g.max(initial=0.0))
    return g / peak if peak > 0 else g


def grid_shape(width: int, height: int, longest: int) -> tuple[int, int]:
    """rows, cols of a grid whose longer side has ``longest`` cells (never more cells than pixels)."""
    if width >= height:
        cols = min(longest, width)
        return max(1, min(height, round(cols * height / width))), cols
    rows = min(longest, height)
    return rows, max(1, min(width, round(rows * width / height)))
