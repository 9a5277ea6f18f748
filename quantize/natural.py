"""Many natural inputs from the few real photographs that ship with scikit-image and scikit-learn.

Random crops at different scales and aspect ratios, with horizontal flips, turn a couple of dozen photographs
into hundreds of distinct natural images. They fall into three sets that share **no source photograph**
(crops of one photo never straddle two sets):

- ``CALIBRATION_PHOTOS``: the activation ranges are fitted on these;
- ``SELECTION_PHOTOS``: the accuracy guard scores int8 on these to choose what to keep in float;
- ``HELD_OUT_PHOTOS``: touched by nothing that makes a decision; the figure written in the manifest and the
  docs comes from these, so it is what a user should expect on photos the tool never saw.

``examples/images`` holds ``cat.jpg`` and ``coffee.jpg``: the same photographs as ``chelsea`` and ``coffee``,
so they add nothing. The held-out set carries the object photos a new user would try first (coffee,
motorcycle, clock, flower) and textures where fp32 is rarely confident.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

Role = Literal["calibration", "selection", "held-out"]

# Disjoint by source photograph. Grayscale ones are converted to RGB (three equal channels).
CALIBRATION_PHOTOS = (
    "astronaut", "rocket", "hubble_deep_field", "brick", "grass", "immunohistochemistry", "moon", "page",
)
SELECTION_PHOTOS = ("chelsea", "camera", "china", "cell", "text")
HELD_OUT_PHOTOS = ("coffee", "motorcycle", "clock", "flower", "coins", "retina", "gravel")
PHOTOS: dict[str, tuple[str, ...]] = {
    "calibration": CALIBRATION_PHOTOS, "selection": SELECTION_PHOTOS, "held-out": HELD_OUT_PHOTOS,
}
# the default crop counts and seeds of each set (``make models`` and ``--calibration natural``)
COUNTS = {"calibration": 256, "selection": 500, "held-out": 700}
SEEDS = {"calibration": 0, "selection": 1, "held-out": 2}


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


def natural_images(photos: tuple[str, ...], count: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """``count`` crops spread evenly over ``photos`` (the whole photo first), and each one's photo index."""
    rng = np.random.default_rng(seed)
    per = max(1, -(-count // len(photos)))
    images: list[Image.Image] = []
    groups: list[int] = []
    for g, name in enumerate(photos):
        img = photo(name)
        crops = [img, *random_crops(img, per - 1, rng)]
        images.extend(crops)
        groups.extend([g] * len(crops))
    return images[:count], groups[:count]


def natural_set(role: Role, count: int | None = None) -> tuple[list[Image.Image], list[int], tuple[str, ...]]:
    """The crops of one of the three sets, their photo index, and the photos' names."""
    if role not in PHOTOS:
        raise ValueError(f"unknown natural set {role!r}; one of {', '.join(PHOTOS)}")
    images, groups = natural_images(PHOTOS[role], count or COUNTS[role], SEEDS[role])
    return images, groups, PHOTOS[role]


def calibration_images(count: int = 256, seed: int = 0) -> list[Image.Image]:
    return natural_images(CALIBRATION_PHOTOS, count, seed)[0]


def jittered(images: list[Image.Image], seed: int = 3, strength: float = 0.3) -> list[Image.Image]:
    """Colour-jittered copies (brightness, contrast, saturation each × U(1 ± strength)): calibration
    augmentation, so the ranges also cover lighting the few photos at hand do not show."""
    from PIL import ImageEnhance

    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhance(img).enhance(float(rng.uniform(1 - strength, 1 + strength)))
        out.append(img)
    return out
