"""Preprocessing does bounded work whatever the image's shape, matches torchvision's Resize + CenterCrop, and
converts every Pillow mode to the same picture as its 8-bit RGB twin (issue 13 items 1 and 8)."""

from __future__ import annotations

import io
import resource
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionserve.service.imaging import Preprocessor
from visionserve.service.manifest import InputSpec, Manifest, Preprocess

from .conftest import CAT, Server


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(20000, 1), (1, 20000), (40000, 3), (3, 9000)])
def test_a_tiny_file_with_an_extreme_aspect_ratio_costs_almost_nothing(size: tuple[int, int]) -> None:
    pre = Preprocessor(InputSpec(name="x", shape=[-1, 3, 224, 224]), Preprocess())
    data = png(Image.new("RGB", size, (120, 30, 200)))
    assert len(data) < 1000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    x, geo = pre(data)
    took = time.perf_counter() - t0
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert x.shape == (3, 224, 224)
    assert took < 0.5 and grew_mib < 50, (took, grew_mib)  # was 9.4 s and 3.9 GB for 20000x1
    assert (geo.width, geo.height) == size


@pytest.mark.parametrize("size, resize, crop", [
    ((451, 300), None, (224, 224)),
    ((300, 451), 256, (224, 224)),
    ((640, 100), 160, (224, 224)),  # after the resize, taller than wide is too short: pad top and bottom
    ((100, 640), 160, (224, 224)),
    ((90, 60), 64, (96, 128)),  # smaller than the crop both ways: pad all round
    ((2000, 30), 48, (64, 64)),
])
def test_crop_and_pad_match_torchvision(size: tuple[int, int], resize: int | None, crop: tuple[int, int]) -> None:
    tvf = pytest.importorskip("torchvision.transforms.functional")
    img = Image.open(CAT).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    th, tw = crop
    pre = Preprocessor(InputSpec(name="x", shape=[-1, 3, th, tw]), Preprocess(resize=resize))
    ours, geo = pre._geometry_and_pixels(img, *img.size)
    ref = np.asarray(tvf.center_crop(tvf.resize(img, resize or min(th, tw)), [th, tw]))
    assert ours.shape == ref.shape == (th, tw, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 1.0
    # the geometry maps an original pixel to where it lands in the tensor
    x, y = size[0] / 2, size[1] / 2
    assert abs(x * geo.scale_x + geo.offset_x - tw / 2) <= 1.5 and abs(y * geo.scale_y + geo.offset_y - th / 2) <= 1.5


def twins() -> list[tuple[str, bytes, bytes]]:
    """(what, an image in some mode, its 8-bit RGB twin)."""
    cat = Image.open(CAT).convert("RGB")
    grey = cat.convert("L")
    g16 = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)  # 16-bit grey: I;16
    out = [("16-bit grey PNG", png(g16), png(grey.convert("RGB")))]
    i32 = Image.fromarray(np.asarray(grey).astype(np.int32) * 257, "I")
    out.append(("32-bit integer grey TIFF", tiff(i32), png(grey.convert("RGB"))))
    pal = cat.quantize(256)
    out.append(("palette", png(pal), png(pal.convert("RGB"))))
    la = grey.copy()
    la.putalpha(255)
    out.append(("grey + alpha", png(la), png(grey.convert("RGB"))))
    rgba = cat.copy()
    rgba.putalpha(255)
    out.append(("RGBA", png(rgba), png(cat)))
    f = Image.fromarray(np.asarray(grey).astype(np.float32) / 255.0, "F")
    out.append(("float grey TIFF (0..1)", tiff(f), png(grey.convert("RGB"))))
    return out


@pytest.mark.parametrize("what, data, twin", twins(), ids=[t[0] for t in twins()])
def test_every_mode_gives_the_same_picture_as_its_8_bit_rgb_twin(what: str, data: bytes, twin: bytes,
                                                                mobilenet_repo: Path) -> None:
    m = Manifest.read(mobilenet_repo / "mobilenet_v2" / "1")
    pre = Preprocessor(m.input, m.preprocess)
    a, _ = pre(data)
    b, _ = pre(twin)
    assert np.abs(a - b).max() < 0.05, what  # within a fifth of one 8-bit level, in normalised units


def test_over_http_the_140_byte_png_is_answered_quickly(server: Server) -> None:
    import httpx

    data = png(Image.new("RGB", (20000, 1), (120, 30, 200)))
    t0 = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/models/mobilenet_v2/classify", content=data,
                   headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 200, r.text
    assert time.perf_counter() - t0 < 2.0
    assert len(r.json()["predictions"]) == 5
