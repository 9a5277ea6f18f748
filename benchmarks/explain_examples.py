"""The pictures in docs/explain.md, made with ``visionserve explain`` against a running server.

    .venv/bin/python benchmarks/explain_examples.py --url http://127.0.0.1:8000

Needs the models of ``make models`` (mobilenet_v2, mobilenet_v2_int8, shapes_detector, shapes_detector_int8).
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.composites import CAT, cat_object, composite  # noqa: E402

OUT = ROOT / "docs" / "explain"
SHAPES = ROOT / "tests" / "data" / "shapes" / "images" / "shapes_00001.jpg"


def cli(url: str, image: Path, model: str, method: str, out: Path) -> Image.Image:
    done = subprocess.run([sys.executable, "-m", "visionserve.service",
                           "explain", str(image), "--url", url, "--model", model,
                           "--method", method, "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    if done.returncode:
        raise SystemExit(done.stderr)
    print(done.stdout.strip())
    return Image.open(out).convert("RGB")


def sheet(images: list[Image.Image], cols: int, captions: list[str]) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (w * cols, h * rows), "white")
    draw = ImageDraw.Draw(out)
    for i, (im, text) in enumerate(zip(images, captions)):
        x, y = (i % cols) * w, (i // cols) * h
        out.paste(im.resize((w, h)), (x, y))
        draw.rectangle((x, y, x + 8 * len(text) + 8, y + 18), fill=(0, 0, 0))
        draw.text((x + 4, y + 3), text, fill=(255, 255, 255))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cats, captions = [], []
        for model in ("mobilenet_v2", "mobilenet_v2_int8"):
            for method in ("occlusion", "rise"):
                cats.append(cli(args.url, CAT, model, method, tmp / f"{model}-{method}.png"))
                captions.append(f"{model} {method}")
        sheet(cats, 2, captions).save(OUT / "cat_fp32_int8.jpg", quality=85)
        shapes = [cli(args.url, SHAPES, m, "rise", tmp / f"{m}.png") for m in ("shapes_detector",
                                                                             "shapes_detector_int8")]
        sheet(shapes, 2, ["shapes_detector rise", "shapes_detector_int8 rise"]).save(OUT / "shapes_fp32_int8.jpg",
                                                                                       quality=85)
        rng = np.random.default_rng(2026)
        obj = cat_object(112)
        tiles = []
        for _ in range(4):
            data, _box = composite(rng, obj)
            r = httpx.post(f"{args.url}/v1/models/mobilenet_v2/explain?method=rise&target=285&format=png",
                           content=data, timeout=120)
            r.raise_for_status()
            tiles.append(Image.open(io.BytesIO(r.content)).convert("RGB"))
        sheet(tiles, 4, ["composite"] * 4).save(OUT / "composites.jpg", quality=85)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
