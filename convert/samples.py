"""Real photographs that ship with scikit-image: used for parity checks, calibration and tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# name → skimage.data function; all are real photographs or scans.
SAMPLES = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle", "hubble_deep_field", "camera", "coins")


def sample_image(name: str) -> Image.Image:
    from skimage import data

    if name == "motorcycle":
        arr = data.stereo_motorcycle()[0]
    else:
        arr = getattr(data, name)()
    img = Image.fromarray(np.asarray(arr))
    return img.convert("RGB")


def sample_images(names: tuple[str, ...] = SAMPLES) -> list[tuple[str, Image.Image]]:
    return [(n, sample_image(n)) for n in names]


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()

