"""Imaging (draft decode, EXIF, limits), settings validation, and execution-provider fallback."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from visionserve.service.cli import app
from visionserve.service.errors import BadImage, PayloadTooLarge
from visionserve.service.imaging import Preprocessor, decode
from visionserve.service.manifest import Manifest
from visionserve.service.runtime import Runner, choose_providers
from visionserve.service.settings import ConfigError, ModelSettings, load_settings

from .conftest import CAT


def big_jpeg(scale: int = 6) -> bytes:
    img = Image.open(CAT)
    buf = io.BytesIO()
    img.resize((img.width * scale, img.height * scale), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_draft_decodes_large_jpegs_smaller_and_keeps_the_answer(mobilenet_repo: Path) -> None:
    data = big_jpeg()
    full, size = decode(data)
    small, size2 = decode(data, draft_size=(256, 256))
    assert size == size2 == full.size == (451 * 6, 300 * 6)
    assert small.size[0] < full.size[0] / 3 and min(small.size) >= 256  # 1/4 scale, still ≥ the resize
    m = Manifest.read(mobilenet_repo / "mobilenet_v2" / "1")
    a, geo_a = Preprocessor(m.input, m.preprocess, draft=True)(data)
    b, geo_b = Preprocessor(m.input, m.preprocess, draft=False)(data)
    assert a.shape == b.shape == (3, 224, 224)
    assert geo_a.width == geo_b.width == 451 * 6
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98  # the same picture


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    out, size = decode(buf.getvalue())
    assert size == out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 80  # the blue left edge is now on top


@pytest.mark.parametrize("data, error", [(b"", BadImage), (b"GIF89a-not-really", BadImage),
                                         (CAT.read_bytes()[:2000], BadImage)])
def test_bad_bytes(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode(data)


def test_pixel_limit() -> None:
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, "PNG")
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode(buf.getvalue(), max_pixels=1_000_000)


def test_settings_layering_and_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("port: 9001\ndefaults:\n  max_batch_size: 8\n  instances: 1\nmodels:\n  mnv2:\n    instances: 3\n")
    s = load_settings(cfg)
    assert s.port == 9001 and s.defaults.max_batch_size == 8
    assert s.for_model("mnv2").instances == 3 and s.for_model("mnv2").max_batch_size == 8
    assert s.for_model("other").instances == 1
    monkeypatch.setenv("VISIONSERVE_PORT", "9002")
    assert load_settings(cfg).port == 9002  # env beats the file
    assert load_settings(cfg, port=9003).port == 9003  # flags beat env
    monkeypatch.setenv("VISIONSERVE_DEFAULTS__MAX_QUEUE", "0")
    with pytest.raises(ConfigError, match="max_queue"):
        load_settings(cfg)
    monkeypatch.delenv("VISIONSERVE_DEFAULTS__MAX_QUEUE")
    cfg.write_text("models:\n  mnv2:\n    instancez: 2\n")
    with pytest.raises(ConfigError, match="instancez"):
        load_settings(cfg)


def test_serve_refuses_bad_config_and_empty_repository(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.toml"
    bad.write_text("port = 'eighty'\n")
    r = runner.invoke(app, ["serve", "--repository", str(tmp_path), "--config", str(bad)])
    assert r.exit_code != 0 and "port" in r.output
    r = runner.invoke(app, ["serve", "--repository", str(tmp_path)])
    assert r.exit_code != 0 and "no models" in r.output
    r = runner.invoke(app, ["serve", "--repository", str(tmp_path / "missing")])
    assert r.exit_code != 0 and "does not exist" in r.output


def test_providers_fall_back_to_cpu(mobilenet_repo: Path) -> None:
    assert choose_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                            ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(["CUDAExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]
    cfg = ModelSettings(providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"], trt_fp16=True,
                        trt_engine_cache=str(mobilenet_repo / ".trt-cache"))
    r = Runner(mobilenet_repo / "mobilenet_v2" / "1" / "model.onnx", cfg, threads=1)
    assert r.providers == ["CPUExecutionProvider"]
    assert r.run(np.zeros((2, 3, 224, 224), np.float32))[0].shape == (2, 1000)
