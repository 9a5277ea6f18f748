"""Many natural inputs from the few real photographs that ship with scikit-image and scikit-learn.

Random crops at different scales and aspect ratios, with horizontal flips, turn a dozen photographs into
hundreds of distinct natural images: enough to calibrate an int8 model and to measure how often it agrees
with the float one. Calibration and evaluation use *different source photographs* (``CALIBRATION_PHOTOS``
and ``EVALUATION_PHOTOS`` share none), so the guard never scores the images the ranges were fitted on.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Disjoint by source photograph. Grayscale ones are converted to RGB (three equal channels).
CALIBRATION_PHOTOS = (
    "astronaut", "rocket", "motorcycle", "hubble_deep_field", "china", "brick", "grass",
    "immunohistochemistry", "moon", "page", "text",
)
EVALUATION_PHOTOS = ("coffee", "chelsea", "camera", "coins", "flower", "retina", "clock", "gravel", "cell")


def photo(name: str) -> Image.Image:
    """One real photograph by name (scikit-image ``data`` function, or scikit-learn's china/flower)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        arr = load_sample_image(f"{name}.jpg")
    else:
        from skimage import data

        arr = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return Image.fromarray(arr).convert("RGB")


def random_crops(img: Image.Image, count: int, rng: np.random.Generator,
                 scale: tuple[float, float] = (0.1, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
                 ) -> list[Image.Image]:
    """torchvision-RandomResizedCrop-style crops (area fraction ``scale``, aspect ``ratio``), half flipped."""
    w, h = img.size
    out = []
    while len(out) < count:
        area = w * h * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
        if not (16 <= cw <= w and 16 <= ch <= h):
            continue
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(crop)
    return out


def natural_images(photos: tuple[str, ...], count: int, seed: int) -> list[Image.Image]:
    """``count`` crops spread evenly over ``photos`` (the whole photo is always the first of each)."""
    rng = np.random.default_rng(seed)
    per = max(1, -(-count // len(photos)))
    images: list[Image.Image] = []
    for name in photos:
        img = photo(name)
        images.append(img)
        images.extend(random_crops(img, per - 1, rng))
    return images[:count]


def calibration_images(count: int = 256, seed: int = 0) -> list[Image.Image]:
    return natural_images(CALIBRATION_PHOTOS, count, seed)


def evaluation_images(count: int = 600, seed: int = 1) -> list[Image.Image]:
    return natural_images(EVALUATION_PHOTOS, count, seed)

