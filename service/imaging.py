"""Encoded image → model input tensor, and the geometry to map boxes back.

Decode (JPEGs scaled down in the DCT domain when the model input is much smaller), honour EXIF orientation,
refuse decompression bombs, then resize/crop/letterbox and normalise exactly as the manifest says.

JPEGs go through libjpeg-turbo (``simplejpeg``) where it is installed: the pixel count is checked from the
header before anything is decoded, and the decoder scales by any factor N/8 (Pillow's draft mode only by
1/2, 1/4 or 1/8), so a 451x300 photo for a 224 input decodes at 339x225 instead of in full. Everything else
(PNG, WebP, BMP, CMYK JPEGs) goes through Pillow. All of it releases the GIL, so this runs in a thread pool
beside inference.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImage, PayloadTooLarge
from .manifest import InputSpec, Preprocess

try:
    import simplejpeg
except ImportError:  # an optional speed-up: Pillow decodes everything without it
    simplejpeg = None

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}

DEFAULT_MAX_PIXELS = 40_000_000
# The memory a decode may take, from the header, before anything is decoded: ``max_pixels`` pixels of up to
# this many bytes each (200 MB at the default). Pillow holds RGB, RGBA, LA, I and F at 4 bytes a pixel; a
# palette image becomes RGB (+4) and a 16-bit one 8-bit grey via a copy (+3) before it can be reduced; and
# Pillow decodes WebP through an RGBA frame buffer and copies (measured 15.5 bytes a pixel).
DECODE_BYTES_PER_PIXEL = 5
_MODE_BYTES_PER_PIXEL = {"1": 2, "L": 1, "P": 5, "PA": 8, "I;16": 5, "I;16L": 5, "I;16B": 5, "I;16N": 5}
_FORMAT_BYTES_PER_PIXEL = {"WEBP": 16}

# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose does)
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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
    per_pixel = max(_FORMAT_BYTES_PER_PIXEL.get(img.format or "", 0), _MODE_BYTES_PER_PIXEL.get(img.mode, 4))
    if w * h * per_pixel > max_pixels * DECODE_BYTES_PER_PIXEL:
        raise PayloadTooLarge(
            f"a {w}x{h} {img.format} image in mode {img.mode} takes about {w * h * per_pixel >> 20} MiB to decode; "
            f"the limit is {max_pixels * DECODE_BYTES_PER_PIXEL >> 20} MiB ({DECODE_BYTES_PER_PIXEL} bytes for "
            f"each of max_pixels {max_pixels})")
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
        swap = (full_w, full_h) != img.size
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)
        img.load()
        if draft_size is not None and img.format != "JPEG":
            img = _shrink(img, draft_size[::-1] if swap else draft_size)
        img = ImageOps.exif_transpose(img) or img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as e:
        raise BadImage(f"cannot decode image: {e}") from None
    try:
        img = to_rgb(img)
    except (OSError, ValueError) as e:
        raise BadImage(f"cannot convert image to RGB: {e}") from None
    return img, (full_w, full_h)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB with the same look. Pillow's own ``convert("RGB")`` clips 16-bit and 32-bit
    grey (``I;16``, ``I``) at 255, so a 16-bit PNG came out all white; those are scaled to 8 bits here, and
    float images (``F``) are read as 0..1 when they lie in it, else as 0..255."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        return _grey_to_8bit(img).convert("RGB")
    return img.convert("RGB")


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grey to 8-bit ``L``, a band of rows at a time: converting a 40 MP image in
    one go made four full-size temporaries (+420 MB for a 92 kB 16-bit PNG)."""
    w, h = img.size
    rows = max(1, (1 << 20) // w)  # about a million pixels a band
    bands = [(r, min(h, r + rows)) for r in range(0, h, rows)]

    def band(r0: int, r1: int) -> np.ndarray:
        return np.asarray(img.crop((0, r0, w, r1)))

    if img.mode.startswith("I;16"):
        def to8(x: np.ndarray) -> np.ndarray:
            return (x.astype(np.uint32) + 128) // 257
    elif img.mode == "I":
        wide = any(int(band(*b).max(initial=0)) > 255 for b in bands)

        def to8(x: np.ndarray) -> np.ndarray:
            return np.clip((x.astype(np.int64) + 128) // 257 if wide else x, 0, 255)
    else:  # F: read as 0..1 when it lies in it, else as 0..255
        lo, hi = np.inf, -np.inf
        for b in bands:
            x = band(*b)
            lo, hi = min(lo, float(np.nanmin(x, initial=np.inf))), max(hi, float(np.nanmax(x, initial=-np.inf)))
        unit = lo >= 0 and hi <= 1.0

        def to8(x: np.ndarray) -> np.ndarray:
            return np.clip(np.nan_to_num(x * 255.0 if unit else x), 0, 255)
    out = np.empty((h, w), dtype=np.uint8)
    for r0, r1 in bands:
        out[r0:r1] = to8(band(r0, r1))
    return Image.fromarray(out, "L")


_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "RGBX", "I", "F", "CMYK", "YCbCr"})


def _shrink(img: Image.Image, min_size: tuple[int, int]) -> Image.Image:
    """Reduce a large decoded (non-JPEG) image by an integer factor, box-averaged in its own mode, while
    both sides stay at least ``min_size``: what JPEG's DCT scaling does for JPEGs. Later steps (mode
    conversion, resize) then work on the small image, and the full-size decode is freed at once."""
    k = min(img.width // max(1, min_size[0]), img.height // max(1, min_size[1]))
    if k < 2:
        return img
    if img.mode.startswith("I;16"):
        img = _grey_to_8bit(img)
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode not in _REDUCIBLE:  # P, PA…: palette indices cannot be averaged; alpha is dropped later
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA"):
        # Pillow's reduce() premultiplies alpha on a full-size copy (+150 MB at 40 MP). Alpha is dropped when
        # the image becomes RGB, so averaging the raw channels is what the unreduced path computes anyway.
        try:
            return img._new(img.im.reduce((k, k), (0, 0, *img.size)))
        except (AttributeError, TypeError):  # a Pillow without this core call
            img = img.convert("RGB")
    return img.reduce(k)


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
        if simplejpeg is not None and data[:2] == b"\xff\xd8":
            fast = self._decode_jpeg(data)
            if fast is not None:
                return self.from_image(*fast)
        img, (ow, oh) = decode(data, draft_size=self._draft_size(data), max_pixels=self.max_pixels)
        return self.from_image(img, original_size=(ow, oh))

    def from_image(self, img: Image.Image, original_size: tuple[int, int] | None = None
                   ) -> tuple[np.ndarray, Geometry]:
        img = to_rgb(img)
        ow, oh = original_size or img.size
        pixels, geo = self._geometry_and_pixels(img, ow, oh)
        return self._normalise(pixels), geo

    # -- steps ---------------------------------------------------------------------------------------
    def _decode_jpeg(self, data: bytes) -> tuple[Image.Image, tuple[int, int]] | None:
        """libjpeg-turbo decode at the smallest N/8 scale the resize step still shrinks from; None: use Pillow
        (not a baseline/progressive YCbCr or grey JPEG, or a header it cannot read: Pillow says why)."""
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return None
        if colorspace not in ("YCbCr", "Gray") or w <= 0 or h <= 0:
            return None
        if w * h > self.max_pixels:
            raise PayloadTooLarge(f"image is {w}x{h} = {w * h} pixels; the limit is {self.max_pixels}")
        orientation = _exif_orientation(data)
        swap = orientation in (5, 6, 7, 8)
        ow, oh = (h, w) if swap else (w, h)  # upright size
        mw, mh = self._min_decode_size(ow, oh) if self.draft else (ow, oh)
        if swap:
            mw, mh = mh, mw
        try:
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=mw, min_height=mh)
        except ValueError as e:  # corrupt or truncated
            raise BadImage(f"cannot decode image: {e}") from None
        img = Image.fromarray(pixels)
        if orientation in _ORIENT:
            img = img.transpose(_ORIENT[orientation])
        return img, (ow, oh)

    def _min_decode_size(self, ow: int, oh: int) -> tuple[int, int]:
        """The smallest upright decode size from which the resize step still only shrinks."""
        th, tw = self.height, self.width
        policy = self.pre.resize_policy
        if policy == "stretch":
            return tw, th
        if policy == "letterbox":
            r = min(tw / ow, th / oh)
            return math.ceil(ow * r), math.ceil(oh * r)
        size = self.pre.resize or min(th, tw)  # shorter side
        return (size, 0) if ow <= oh else (0, size)

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
        # torchvision pads to the crop size where the resized image is smaller, then takes the centre crop.
        # Only the region the crop keeps is resized, so the intermediate is never larger than the input tensor,
        # whatever the aspect ratio (a 20000x1 PNG would otherwise resize to 4.48 M x 224 pixels).
        left, pad_l, rw = (int(round((nw - tw) / 2.0)), 0, tw) if nw >= tw else (0, (tw - nw) // 2, nw)
        top, pad_t, rh = (int(round((nh - th) / 2.0)), 0, th) if nh >= th else (0, (th - nh) // 2, nh)
        if (nw, nh) == (w, h):
            region = np.asarray(img.crop((left, top, left + rw, top + rh)))
        else:
            sx, sy = w / nw, h / nh
            region = np.asarray(img.resize((rw, rh), self._resample,
                                           box=(left * sx, top * sy, (left + rw) * sx, (top + rh) * sy)))
        geometry = Geometry(ow, oh, nw / ow, nh / oh, float(pad_l - left), float(pad_t - top))
        if (rw, rh) == (tw, th):
            return region, geometry
        canvas = np.zeros((th, tw, 3), dtype=np.uint8)
        canvas[pad_t:pad_t + rh, pad_l:pad_l + rw] = region
        return canvas, geometry

    def _normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 HWC → float32 in the model's layout: transpose the bytes first, then one multiply and one
        add into a fresh contiguous array (5x cheaper than converting, scaling and transposing floats)."""
        if self.pre.channel_order == "BGR":
            pixels = pixels[..., ::-1]
        a, b = self._a, self._b
        if self.spec.layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
            a, b = a[:, None, None], b[:, None, None]
        out = np.empty(pixels.shape, dtype=np.float32)
        np.multiply(pixels, a, out=out)
        out += b
        return out


def _exif_orientation(data: bytes) -> int:
    """The EXIF orientation of a JPEG (1, upright, when it has none); Pillow reads it only if there is EXIF."""
    if data.find(b"Exif\x00\x00", 0, 65536) < 0:  # no slice: that would copy up to 64 KB per request
        return 1
    try:
        with Image.open(io.BytesIO(data)) as img:
            value = img.getexif().get(0x0112, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1
