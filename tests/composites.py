"""Images where the object's place is known: an object pasted on a noisy canvas (for explanation checks)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "examples" / "images" / "cat.jpg"


def cat_object(side: int = 112) -> Image.Image:
    """The cat's face from examples/images/cat.jpg, ``side`` pixels square."""
    img = Image.open(CAT).convert("RGB")
    w, h = img.size
    face = img.crop((w // 2 - h // 2, 0, w // 2 + h // 2, h))  # the centre square: the face
    return face.resize((side, side), Image.Resampling.BILINEAR)


def composite(rng: np.random.Generator, obj: Image.Image, size: tuple[int, int] = (320, 320),
              margin: int = 32) -> tuple[bytes, tuple[int, int, int, int]]:
    """``obj`` pasted at a random place on a canvas of grey noise, at least ``margin`` pixels from the edges
    (a classifier's centre crop cuts the borders off); PNG bytes and the object's box x1, y1, x2, y2."""
    w, h = size
    canvas = np.clip(rng.normal(128, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas)
    x = int(rng.integers(margin, w - margin - obj.width + 1))
    y = int(rng.integers(margin, h - margin - obj.height + 1))
    img.paste(obj, (x, y))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), (x, y, x + obj.width, y + obj.height)


def inside(grid: np.ndarray, box: tuple[int, int, int, int], width: int, height: int) -> np.ndarray:
    """Which cells of a rows × cols grid over a width × height image have their centre inside ``box``."""
    rows, cols = grid.shape
    ys = (np.arange(rows) + 0.5) * height / rows
    xs = (np.arange(cols) + 0.5) * width / cols
    x1, y1, x2, y2 = box
    return ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]


def pointing_hit(grid: np.ndarray, box: tuple[int, int, int, int], width: int, height: int) -> bool:
    """The pointing game: the saliency peak lies on the object."""
    peak = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return bool(inside(grid, box, width, height)[peak])


def mass_ratio(grid: np.ndarray, box: tuple[int, int, int, int], width: int, height: int) -> float:
    """Saliency mass inside the object ÷ the object's share of the image area (1: no better than chance)."""
    mask = inside(grid, box, width, height)
    total = float(grid.sum())
    if total <= 0:
        return 0.0
    return (float(grid[mask].sum()) / total) / (mask.sum() / mask.size)
