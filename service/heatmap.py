"""A saliency grid laid over the original image as a heat map (PNG). Pillow and numpy only."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .imaging import decode

MAX_SIDE = 1280  # a larger original is shown scaled down: a 24-megapixel PNG takes seconds to encode
# anchor colours of a perceptually ordered map (dark blue → cyan → yellow → red), as in matplotlib's "turbo"
_ANCHORS = np.array([[48, 18, 59], [40, 120, 230], [30, 200, 200], [120, 250, 90], [250, 200, 40],
                     [240, 90, 20], [122, 4, 3]], dtype=np.float32)


def colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → RGB float colours, interpolated between the anchors."""
    pos = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(_ANCHORS) - 1)
    w = (pos - lo)[..., None]
    return _ANCHORS[lo] * (1 - w) + _ANCHORS[hi] * w


def overlay(image: bytes | Image.Image, saliency: np.ndarray, box: Sequence[float] | None = None) -> bytes:
    """The image (EXIF orientation applied) with the saliency grid upsampled smoothly over it; PNG.

    Opacity follows saliency, so where nothing mattered the picture shows through. ``box`` (original pixels)
    is outlined, for a detector's explanation.
    """
    img = decode(image)[0] if isinstance(image, (bytes, bytearray)) else image.convert("RGB")
    ow, oh = img.size
    factor = min(1.0, MAX_SIDE / max(ow, oh))
    if factor < 1.0:
        img = img.resize((max(1, round(ow * factor)), max(1, round(oh * factor))), Image.Resampling.BILINEAR)
    w, h = img.size
    grid = Image.fromarray(np.clip(saliency, 0, 1).astype(np.float32), mode="F")
    s = np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32).clip(0, 1)
    alpha = (0.15 + 0.55 * s)[..., None]
    out = np.asarray(img, dtype=np.float32) * (1 - alpha) + colours(s) * alpha
    result = Image.fromarray(out.round().clip(0, 255).astype(np.uint8), "RGB")
    if box is not None:
        draw = ImageDraw.Draw(result)
        x1, y1, x2, y2 = (float(v) * w / ow for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=(255, 255, 255), width=max(2, round(min(w, h) / 200)))
    buf = io.BytesIO()
    result.save(buf, format="PNG")
    return buf.getvalue()
