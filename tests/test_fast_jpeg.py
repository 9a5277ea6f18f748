"""The libjpeg-turbo path (simplejpeg, N/8 DCT scaling) against Pillow's: same geometry, same orientation, the
same limits and errors, and the same answers on photographs that tuned nothing here (issue 12 item 2)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from visionserve.service import imaging
from visionserve.service.errors import BadImage, PayloadTooLarge
from visionserve.service.imaging import Preprocessor
from visionserve.service.manifest import Manifest

from .conftest import CAT

pytest.importorskip("simplejpeg")


def jpeg(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pre(mobilenet_repo: Path) -> Preprocessor:
    m = Manifest.read(mobilenet_repo / "mobilenet_v2" / "1")
    return Preprocessor(m.input, m.preprocess)


def pillow_path(pre: Preprocessor, data: bytes) -> tuple[np.ndarray, imaging.Geometry]:
    saved, imaging.simplejpeg = imaging.simplejpeg, None
    try:
        return pre(data)
    finally:
        imaging.simplejpeg = saved


def test_the_fast_path_is_taken_and_decodes_smaller(pre: Preprocessor) -> None:
    data = CAT.read_bytes()
    fast = pre._decode_jpeg(data)
    assert fast is not None
    img, size = fast
    assert size == (451, 300) and img.size == (339, 225)  # 6/8: the smallest scale still >= 224


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(pre: Preprocessor, orientation: int) -> None:
    img = Image.open(CAT).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(img, exif=exif)
    a, geo_a = pre(data)
    b, geo_b = pillow_path(pre, data)
    assert (geo_a.width, geo_a.height) == (geo_b.width, geo_b.height)
    assert (geo_a.width, geo_a.height) == ((300, 451) if orientation >= 5 else (451, 300))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.97, orientation  # the same picture, the same way up


def test_the_pixel_limit_is_checked_before_decoding(mobilenet_repo: Path) -> None:
    m = Manifest.read(mobilenet_repo / "mobilenet_v2" / "1")
    small_limit = Preprocessor(m.input, m.preprocess, max_pixels=100_000)
    with pytest.raises(PayloadTooLarge, match="pixels"):
        small_limit(CAT.read_bytes())  # 451 x 300 = 135,300


def test_truncated_and_garbage_jpegs_are_bad_images(pre: Preprocessor) -> None:
    data = CAT.read_bytes()
    for bad in (data[: len(data) // 2], data[:200], b"\xff\xd8\xff" + b"\x00" * 100):
        with pytest.raises(BadImage):
            pre(bad)


def test_grey_and_cmyk_jpegs(pre: Preprocessor) -> None:
    grey = jpeg(Image.open(CAT).convert("L"))
    x, geo = pre(grey)
    assert x.shape == (3, 224, 224) and (geo.width, geo.height) == (451, 300)
    assert np.allclose(x[0] * 0.229 + 0.485, x[1] * 0.224 + 0.456, atol=1e-3)  # R == G: grey
    cmyk = jpeg(Image.open(CAT).convert("CMYK"))
    assert pre._decode_jpeg(cmyk) is None  # Pillow's job
    y, _ = pre(cmyk)
    assert y.shape == (3, 224, 224)


def held_out_photos() -> list[tuple[str, Image.Image]]:
    """Photographs from scikit-image and scikit-learn (none tuned anything here), each at 3 sizes so that
    several DCT scales (8/8 down to 2/8) are exercised."""
    from sklearn.datasets import load_sample_images

    from visionserve.convert.samples import sample_images

    photos = list(sample_images())  # scikit-image's bundled photographs
    photos += [(f"sklearn-{i}", Image.fromarray(a)) for i, a in enumerate(load_sample_images().images)]
    out = []
    for name, img in photos:
        img = img.convert("RGB")
        for width in (320, 640, 1280):
            h = max(1, round(img.height * width / img.width))
            out.append((f"{name}@{width}", img.resize((width, h), Image.Resampling.LANCZOS)))
    return out


def test_fast_jpeg_path_keeps_the_answers(pre: Preprocessor, mobilenet_repo: Path) -> None:
    sess = ort.InferenceSession(str(mobilenet_repo / "mobilenet_v2" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    agree = confident = confident_agree = 0
    worst = 0.0
    photos = held_out_photos()
    for _name, img in photos:
        data = jpeg(img)
        a = sess.run(None, {"input": pre(data)[0][None]})[0][0]
        b = sess.run(None, {"input": pillow_path(pre, data)[0][None]})[0][0]
        pa, pb = (np.exp(v - v.max()) / np.exp(v - v.max()).sum() for v in (a, b))
        worst = max(worst, float(np.abs(pa - pb).max()))
        agree += int(pa.argmax() == pb.argmax())
        if pb.max() >= 0.5:
            confident += 1
            confident_agree += int(pa.argmax() == pb.argmax())
    print(f"held-out photos: top-1 agreement {agree}/{len(photos)}, confident (p >= 0.5) {confident_agree}/"
          f"{confident}, largest probability difference {worst:.3f}")
    assert confident >= 8
    assert confident_agree == confident, f"{confident_agree}/{confident} confident top-1s kept"
    assert agree >= 0.9 * len(photos), f"top-1 agreement {agree}/{len(photos)}, worst |dp| {worst:.3f}"
