"""Encoded image → model input tensor, and the geometry to map boxes back.

Decode (with JPEG draft mode when the model input is much smaller), honour EXIF orientation, refuse
decompression bombs, then resize/crop/letterbox and normalise exactly as the manifest says. Pure Pillow
and numpy: both release the GIL, so this runs in a thread pool beside inference.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImage, PayloadTooLarge
from .manifest import InputSpec, Preprocess

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}

DEFAULT_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class Geometry:
    """Where the input tensor's pixels came from: ``tensor_xy = original_xy * scale + offset``."""

    width: int  # original image, after EXIF orientation
    height: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map [K, 4] x1, y1, x2, y2 boxes in tensor pixels back to original pixels, clipped."""
        out = np.empty_like(boxes, dtype=np.float32)
        out[:, 0::2] = (boxes[:, 0::2] - self.offset_x) / self.scale_x
        out[:, 1::2] = (boxes[:, 1::2] - self.offset_y) / self.scale_y
        np.clip(out[:, 0::2], 0, self.width, out=out[:, 0::2])
        np.clip(out[:, 1::2], 0, self.height, out=out[:, 1::2])
        return out


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (lazily) and validate size; raises BadImage / PayloadTooLarge."""
    if not data:
        raise BadImage("empty image body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise PayloadTooLarge(f"image has too many pixels: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"cannot decode image: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImage(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise PayloadTooLarge(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    return img


def decode(
    data: bytes,
    *,
    draft_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to an RGB image with EXIF orientation applied.

    Returns the image and the original (oriented) size. With ``draft_size``, a JPEG may be decoded at
    1/2, 1/4 or 1/8 scale as long as both sides stay at least that large.
    """
    img = open_image(data, max_pixels=max_pixels)
    full_w, full_h = img.size
    try:
        if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the axes
            full_w, full_h = full_h, full_w
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
        img = ImageOps.exif_transpose(img) or img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        raise BadImage(f"cannot decode image: {e}") from None
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except (OSError, ValueError) as e:
            raise BadImage(f"cannot convert image to RGB: {e}") from None
    return img, (full_w, full_h)


class Preprocessor:
    """Turns encoded images into one model's input tensors, as its manifest says."""

    def __init__(self, spec: InputSpec, pre: Preprocess, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: bool = True) -> None:
        self.spec = spec
        self.pre = pre
        self.max_pixels = max_pixels
        self.draft = draft
        self.height, self.width = spec.height, spec.width
        mean = np.asarray(pre.mean, dtype=np.float32)
        std = np.asarray(pre.std, dtype=np.float32)
        if pre.channel_order == "BGR":
            mean, std = mean[::-1], std[::-1]
        # x * scale - mean) / std  ==  x * a + b
        self._a = (pre.scale / std).astype(np.float32)
        self._b = (-mean / std).astype(np.float32)
        self._resample = _RESAMPLE[pre.interpolation]

    # -- public --------------------------------------------------------------------------------------
    def __call__(self, data: bytes) -> tuple[np.ndarray, Geometry]:
        """Encoded bytes → (tensor of the input's shape without the batch axis, geometry)."""
        img, (ow, oh) = decode(data, draft_size=self._draft_size(data), max_pixels=self.max_pixels)
        return self.from_image(img, original_size=(ow, oh))

    def from_image(self, img: Image.Image, original_size: tuple[int, int] | None = None
                   ) -> tuple[np.ndarray, Geometry]:
        if img.mode != "RGB":
            img = img.convert("RGB")
        ow, oh = original_size or img.size
        pixels, geo = self._geometry_and_pixels(img, ow, oh)
        return self._normalise(pixels), geo

    # -- steps ---------------------------------------------------------------------------------------
    def _draft_size(self, data: bytes) -> tuple[int, int] | None:
        if not self.draft:
            return None
        # The smallest decode size that the resize step still shrinks from (never upsamples).
        if self.pre.resize_policy == "shorter_side_center_crop":
            s = self.pre.resize or min(self.height, self.width)
            return (s, s)
        return (self.width, self.height)

    def _geometry_and_pixels(self, img: Image.Image, ow: int, oh: int) -> tuple[np.ndarray, Geometry]:
        w, h = img.size
        th, tw = self.height, self.width
        policy = self.pre.resize_policy
        if policy == "stretch":
            out = img.resize((tw, th), self._resample)
            return np.asarray(out), Geometry(ow, oh, tw / ow, th / oh, 0.0, 0.0)
        if policy == "letterbox":
            r = min(tw / w, th / h)
            nw, nh = max(1, round(w * r)), max(1, round(h * r))
            resized = img.resize((nw, nh), self._resample) if (nw, nh) != (w, h) else img
            canvas = np.full((th, tw, 3), self.pre.pad_value, dtype=np.uint8)
            left, top = (tw - nw) // 2, (th - nh) // 2
            canvas[top:top + nh, left:left + nw] = np.asarray(resized)
            return canvas, Geometry(ow, oh, nw / ow, nh / oh, float(left), float(top))
        # shorter_side_center_crop, as torchvision's Resize(int) + CenterCrop
        size = self.pre.resize or min(th, tw)
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        resized = img.resize((nw, nh), self._resample) if (nw, nh) != (w, h) else img
        top = int(round((nh - th) / 2.0))
        left = int(round((nw - tw) / 2.0))
        if nh < th or nw < tw:  # torchvision pads when the crop is larger than the image
            pad = np.zeros((max(th, nh), max(tw, nw), 3), dtype=np.uint8)
            pt, pl = max(0, (th - nh) // 2), max(0, (tw - nw) // 2)
            pad[pt:pt + nh, pl:pl + nw] = np.asarray(resized)
            arr = pad[:th, :tw]
            return arr, Geometry(ow, oh, nw / ow, nh / oh, float(pl), float(pt))
        arr = np.asarray(resized.crop((left, top, left + tw, top + th)))
        return arr, Geometry(ow, oh, nw / ow, nh / oh, float(-left), float(-top))

    def _normalise(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels.astype(np.float32)
        if self.pre.channel_order == "BGR":
            x = x[..., ::-1]
        x *= self._a
        x += self._b
        if self.spec.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x)
