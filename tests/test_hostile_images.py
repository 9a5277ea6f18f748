"""Hostile images against a real server process (issue 13): whatever the shape, mode or format of an image
that fits the body limit, the answer is a 200 or a clear 413, and the server's peak memory grows ≤ 200 MB."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import Server, start_server, stop_server
from tests.onnx_builders import write_conv_stack
from visionserve.service.manifest import Preprocess

MB = 1 << 20
W, H = 5000, 8000  # 40 MP: the default max_pixels


def encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


HOSTILE: dict[str, Callable[[], bytes]] = {
    "20000x1 RGB PNG": lambda: encode(Image.new("RGB", (20000, 1), (200, 10, 10))),
    "1x20000 16-bit PNG": lambda: encode(Image.fromarray(np.full((20000, 1), 50000, np.uint16))),
    "40 MP RGB PNG": lambda: encode(Image.new("RGB", (W, H), (10, 200, 30))),
    "40 MP RGBA PNG": lambda: encode(Image.new("RGBA", (W, H), (10, 200, 30, 100))),
    "40 MP LA PNG": lambda: encode(Image.new("LA", (W, H), (90, 100))),
    "40 MP palette PNG": lambda: encode(Image.new("P", (W, H), 7)),
    "40 MP 16-bit grey PNG": lambda: encode(Image.fromarray(np.full((H, W), 40000, np.uint16))),
    "40 MP float TIFF": lambda: encode(Image.fromarray(np.full((H, W), 0.25, np.float32)), "TIFF",
                                       compression="tiff_deflate"),
    "38 MP lossless WebP": lambda: encode(Image.new("RGB", (16000, 2400), (1, 2, 3)), "WEBP", lossless=True),
    "40 MP 1-bit PNG": lambda: encode(Image.new("1", (W, H), 1)),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = write_conv_stack(tmp_path_factory.mktemp("hostile_repo"), "m", size=224, width=8, depth=1,
                            preprocess=Preprocess(resize=256))
    s = start_server(repo, tmp_path_factory.mktemp("hostile"), env={
        "VISIONSERVE_DEFAULTS__INSTANCES": "1", "VISIONSERVE_DEFAULTS__SOLO_THREADS": "0"})
    yield s
    stop_server(s)


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_image_is_answered_within_a_memory_budget(server: Server, name: str) -> None:
    body = HOSTILE[name]()
    assert len(body) < 20 * MB
    pid = server.process.pid
    with httpx.Client(base_url=server.url, timeout=60) as client:
        client.post("/v1/models/m/classify", content=encode(Image.new("RGB", (640, 480))))  # warm
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = status_kb(pid, "VmRSS")
        r = client.post("/v1/models/m/classify", content=body, headers={"content-type": "application/octet-stream"})
        peak = status_kb(pid, "VmHWM")
    assert r.status_code in (200, 413), r.text
    if r.status_code == 413:
        assert "MiB to decode" in r.json()["error"]
    else:
        assert len(r.json()["predictions"]) == 5
    growth = (peak - before) / 1024
    assert growth <= 200, f"{name}: peak RSS grew {growth:.0f} MB"
