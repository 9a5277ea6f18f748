"""/explain over real HTTP: saliency lands on objects whose place is known, in the original image's pixels."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from .composites import cat_object, composite, mass_ratio, pointing_hit
from .conftest import CAT, CAT_CLASSES, ROOT, Server

SHAPES = ROOT / "tests" / "data" / "shapes" / "images" / "shapes_00001.jpg"


def explain(server: Server, data: bytes, params: str = "", model: str = "mobilenet_v2",
            headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{model}/explain{params}", content=data,
                      headers={"Content-Type": "application/octet-stream", **(headers or {})}, timeout=60)


def saliency(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["saliency"], dtype=np.float64)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_the_cat_explained_on_a_grid_over_the_whole_original_image(server: Server) -> None:
    r = explain(server, CAT.read_bytes(), "?method=rise&masks=64")
    body = r.json()
    g = saliency(r)
    assert body["target"]["index"] in CAT_CLASSES and body["target"]["score"] > 0.5
    assert body["image"] == {"width": 451, "height": 300} and body["method"] == "rise" and body["masks"] == 64
    assert g.shape == (37, 56) == (body["grid"]["rows"], body["grid"]["cols"])  # 451 x 300 keeps its aspect
    assert g.min() >= 0 and g.max() == pytest.approx(1.0)
    # the model sees the centre 300 x 300 crop (x in 75.5 .. 375.5): the cut-off sides carry no saliency
    cell = 451 / 56
    centres = (np.arange(56) + 0.5) * cell
    assert np.all(g[:, centres < 75] == 0) and np.all(g[:, centres > 376] == 0)
    assert g[:, (centres > 90) & (centres < 360)].max() == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["occlusion", "rise"])
def test_pointing_game_on_composites_with_a_known_object_place(server: Server, method: str) -> None:
    """The cat's face pasted at random places on noise: the saliency peak lands on it and the map's mass
    inside it is well above its share of the area (the benchmark runs many more trials)."""
    obj = cat_object(112)
    target = httpx.post(f"{server.url}/v1/models/mobilenet_v2/classify", content=png(obj),
                        timeout=30).json()["predictions"][0]["index"]
    rng = np.random.default_rng(7)
    hits, ratios = 0, []
    for _ in range(4):
        data, box = composite(rng, obj)
        g = saliency(explain(server, data, f"?method={method}&target={target}"))
        hits += pointing_hit(g, box, 320, 320)
        ratios.append(mass_ratio(g, box, 320, 320))
    assert hits == 4, ratios
    assert np.median(ratios) >= 2.0, ratios


def test_exif_rotated_photo_maps_saliency_to_the_upright_image(server: Server) -> None:
    """A 400 x 300 composite stored sideways with EXIF orientation 6: the grid is over the upright image and
    its peak on the object there."""
    obj = cat_object(112)
    data, box = composite(np.random.default_rng(3), obj, size=(400, 300))
    upright = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer turns it 90 degrees clockwise
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    r = explain(server, buf.getvalue(), "?method=rise&target=285")
    g = saliency(r)
    assert r.json()["image"] == {"width": 400, "height": 300}
    assert g.shape[1] > g.shape[0]  # landscape, as shown
    assert pointing_hit(g, box, 400, 300)


def test_the_same_seed_gives_the_same_map_and_another_seed_another(server: Server) -> None:
    data = CAT.read_bytes()
    a = saliency(explain(server, data, "?method=rise&masks=32&seed=5"))
    b = saliency(explain(server, data, "?method=rise&masks=32&seed=5"))
    c = saliency(explain(server, data, "?method=rise&masks=32&seed=6"))
    np.testing.assert_allclose(a, b, atol=1e-3)  # float sums of scores from batches of any size
    assert np.abs(a - c).max() > 0.05


def test_a_detector_box_is_explained_by_the_pixels_of_its_object(server: Server) -> None:
    data = SHAPES.read_bytes()
    dets = httpx.post(f"{server.url}/v1/models/shapes_detector/detect", content=data, timeout=30).json()
    d = dets["detections"][0]
    box = ",".join(f"{v:.1f}" for v in d["box"])
    r = explain(server, data, f"?method=rise&box={box}", model="shapes_detector")
    g = saliency(r)
    body = r.json()
    assert body["target"]["index"] == d["index"] and body["target"]["label"] == d["label"]
    w, h = dets["image"]["width"], dets["image"]["height"]
    assert pointing_hit(g, tuple(d["box"]), w, h)  # type: ignore[arg-type]
    assert mass_ratio(g, tuple(d["box"]), w, h) >= 2.0  # type: ignore[arg-type]
    # format=png: the original picture with the heat map and the box, and the target in headers
    p = explain(server, data, f"?method=occlusion&format=png&box={box}", model="shapes_detector")
    assert p.status_code == 200 and p.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(p.content)).size == (w, h)
    assert p.headers["x-explain-target-label"] == d["label"]


@pytest.mark.parametrize(("model", "params", "needle"), [
    ("mobilenet_v2", "?method=gradcam", "method"),
    ("mobilenet_v2", "?format=gif", "format"),
    ("mobilenet_v2", "?target=-1", "target"),
    ("mobilenet_v2", "?target=1000", "target"),
    ("mobilenet_v2", "?target=abc", "target"),
    ("mobilenet_v2", "?method=rise&masks=0", "masks"),
    ("mobilenet_v2", "?method=rise&masks=1000000", "masks"),
    ("mobilenet_v2", "?grid=2", "grid"),
    ("mobilenet_v2", "?seed=-1", "seed"),
    ("mobilenet_v2", "?patch=0", "patch"),
    ("mobilenet_v2", "?patch=1&stride=1", "max_masks"),
    ("mobilenet_v2", "?box=1,2,3,4", "box"),
    ("shapes_detector", "?box=1,2,3", "box"),
    ("shapes_detector", "?box=10,10,5,20", "box"),
    ("shapes_detector", "?box=5000,5000,6000,6000", "box"),
])
def test_bad_parameters_are_422_with_a_clear_error(server: Server, model: str, params: str, needle: str) -> None:
    data = SHAPES.read_bytes() if model == "shapes_detector" else CAT.read_bytes()
    r = explain(server, data, params, model=model)
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]


def test_errors_deadline_and_metrics(server: Server) -> None:
    assert explain(server, CAT.read_bytes(), model="nope").status_code == 404
    bad = explain(server, b"not an image")
    assert bad.status_code == 400 and "error" in bad.json()
    slow = explain(server, CAT.read_bytes(), "?method=rise&masks=1024", headers={"X-Request-Timeout-Ms": "100"})
    assert slow.status_code == 504
    # the server still answers, and the metrics show the explanation work
    assert httpx.post(f"{server.url}/v1/models/mobilenet_v2/classify", content=CAT.read_bytes(),
                      timeout=30).status_code == 200
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    done = [line for line in text.splitlines() if line.startswith('visionserve_explain_masks_total{')]
    assert done and float(done[0].split()[-1]) > 0
    assert 'visionserve_explanations_total{method="rise",model="mobilenet_v2",outcome="deadline_exceeded"' in text
    pending = [line for line in text.splitlines() if line.startswith("visionserve_explain_masks_pending{")]
    assert pending and all(float(line.split()[-1]) == 0 for line in pending)  # nothing left behind


def test_the_explain_command_writes_the_heat_map(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    done = subprocess.run([sys.executable, "-m", "visionserve.service",
                           "explain", str(CAT), "--url", server.url, "--model",
                           "mobilenet_v2", "--method", "rise", "--masks", "16", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (451, 300)
    assert "class 28" in done.stdout and "16 masked images" in done.stdout  # 281-285: the cat classes
    bad = subprocess.run([sys.executable, "-m", "visionserve.service",
                          "explain", str(CAT), "--url", server.url, "--model",
                          "mobilenet_v2", "--masks", "0", "--method", "rise"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "422" in bad.stderr and "masks" in bad.stderr
