"""Image folders for calibration and evaluation, read through a model's own preprocessing.

A folder is either flat (any images, no labels: calibration, or agreement-only evaluation) or an
ImageFolder (one sub-folder per class, torchvision's layout: labelled accuracy too). ``natural`` instead
of a folder means the built-in set of crops of real photographs (``quantize.natural``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from visionserve.service.errors import BadImage, PayloadTooLarge
from visionserve.service.imaging import Preprocessor
from visionserve.service.manifest import Manifest

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"})
NATURAL = "natural"


class DatasetError(Exception):
    """A dataset that cannot be used; the message says why, for a person."""


@dataclass
class ImageSet:
    """Images (files or in-memory), with class indices when the folder is an ImageFolder."""

    items: Sequence[Path | Image.Image]
    source: str
    classes: list[str] | None = None  # ImageFolder sub-folder names, sorted
    targets: list[int] | None = None  # per item, index into ``classes``
    # per item, the source it came from (a photo's crops share one): the unit the bootstrap resamples
    groups: list[int] | None = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labelled(self) -> bool:
        return self.targets is not None


def _images_in(directory: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES], [
        p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]


def scan_folder(directory: Path, *, what: str = "image folder") -> ImageSet:
    """A flat folder of images, or an ImageFolder (class sub-folders with images, nothing else)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"{what} {directory} does not exist or is not a directory")
    top, other = _images_in(directory)
    subdirs = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs and not top:
        classes, items, targets, ignored = [], [], [], list(other)
        for d in subdirs:
            imgs, rest = _images_in(d)
            ignored += rest
            if imgs:
                targets += [len(classes)] * len(imgs)
                classes.append(d.name)
                items += imgs
        if items:
            return ImageSet(items, str(directory), classes, targets)
        raise DatasetError(_no_images(directory, what, ignored))
    if not top:
        raise DatasetError(_no_images(directory, what, other))
    return ImageSet(top, str(directory))


def _no_images(directory: Path, what: str, ignored: list[Path]) -> str:
    msg = f"{what} {directory} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
    if ignored:
        names = ", ".join(p.name for p in ignored[:5]) + (" …" if len(ignored) > 5 else "")
        msg += f"; {len(ignored)} other file(s) ignored: {names}"
    return msg


def open_set(spec: str | Path, *, role: Literal["calibration", "selection", "held-out"] = "calibration",
             count: int | None = None) -> ImageSet:
    """A folder path, or ``natural`` for the built-in crops (each role's photos are its own)."""
    if str(spec) == NATURAL:
        from .natural import natural_set

        imgs, groups, photos = natural_set(role, count)
        return ImageSet(imgs, f"natural ({role} photos: {', '.join(photos)}; {len(imgs)} crops)", groups=groups)
    return scan_folder(Path(spec), what=f"{role} folder")


def map_classes(images: ImageSet, manifest: Manifest, n_outputs: int) -> list[int]:
    """The model's class index of each ImageFolder class: by label name, or by a numeric folder name."""
    assert images.classes is not None
    by_name = {label: i for i, label in enumerate(manifest.labels)}
    if manifest.labels and all(c in by_name for c in images.classes):
        return [by_name[c] for c in images.classes]
    if all(c.isdigit() and int(c) < n_outputs for c in images.classes):
        return [int(c) for c in images.classes]
    unknown = [c for c in images.classes if c not in by_name][:5]
    raise DatasetError(
        f"the class folders of {images.source} do not match the model: {unknown} are neither labels of "
        f"{manifest.name!r} ({len(manifest.labels)} labels, e.g. {manifest.labels[:3]}) nor class indices "
        f"below {n_outputs}"
    )


def load_tensors(images: ImageSet, prep: Preprocessor, progress: Callable[[int], None] | None = None
                 ) -> np.ndarray:
    """Every image through the model's preprocessing; a file that does not decode is an error."""
    out = np.empty((len(images), 3 if prep.spec.layout == "NCHW" else prep.height,
                    *((prep.height, prep.width) if prep.spec.layout == "NCHW" else (prep.width, 3))),
                   dtype=np.float32)
    for i, item in enumerate(images.items):
        try:
            out[i] = prep.from_image(item)[0] if isinstance(item, Image.Image) else prep(item.read_bytes())[0]
        except (BadImage, PayloadTooLarge, OSError) as e:
            raise DatasetError(f"{item}: {e}") from None
        if progress:
            progress(1)
    return out


def hold_out(images: ImageSet, every: int = 4, *, three: bool = False,
             names: tuple[str, str] = ("all but every {every}th image", "every {every}th image, held out"),
             ) -> tuple[ImageSet, ...]:
    """Split one set into disjoint parts, by position (crops of one photo sit together, so they mostly stay
    together).

    - ``(kept, held)``: every ``every``-th image is held;
    - ``three=True``: ``(calibration, selection, held_out)``, every 4th image selects for the guard and
      every 4th (offset by two) is held out for the report; the rest calibrate.
    """
    n = len(images)
    if n < (8 if three else 2 * every):
        raise DatasetError(f"{images.source}: {n} images are too few to hold some out for the "
                           "accuracy guard; give an evaluation folder (--eval)")

    def subset(ix: list[int], what: str) -> ImageSet:
        t = [images.targets[i] for i in ix] if images.targets is not None else None
        g = [images.groups[i] for i in ix] if images.groups is not None else None
        return ImageSet([images.items[i] for i in ix], f"{images.source} ({what})", images.classes, t, g)

    if three:
        return (subset([i for i in range(n) if i % 4 in (0, 2)], "half: calibration"),
                subset([i for i in range(n) if i % 4 == 3], "every 4th image: guard selection"),
                subset([i for i in range(n) if i % 4 == 1], "every 4th image, offset: held out"))
    keep = [i for i in range(n) if i % every != every - 1]
    held = [i for i in range(n) if i % every == every - 1]
    return subset(keep, names[0].format(every=every)), subset(held, names[1].format(every=every))
