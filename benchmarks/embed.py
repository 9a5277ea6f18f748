"""Issue 16's targets for ImageNet MobileNetV2 embeddings, over real HTTP against ``visionserve serve``.

    .venv/bin/python benchmarks/embed.py --repository model_repository [--duration 8] [--rounds 2]

1. **One-shot crops**: every photo of skimage.data and sklearn's sample images is one identity; one random
   crop of each is enrolled in a gallery (``PUT``), and other random crops of the same photos are identified
   (``POST …/identify``). Accuracy = share named right. (Crops: 35-65 % of each side, anywhere in the photo;
   some overlap the enrolled crop, some do not.)
2. **Identify vs embed latency** over a 10 000-item gallery: the photos' crops plus 9 980 filler items (random
   unit vectors written through the gallery store, so no 10 000 uploads), then single requests alternated
   embed / identify, medians.
3. **Saturation**: closed-loop load (``loadtest``, 16 connections) on ``mobilenet_v2`` classify and
   ``mobilenet_v2_embed`` embed, alternated over ``--rounds``; the same backbone, so embed should match.

The repository needs ``mobilenet_v2`` and ``mobilenet_v2_embed`` (``make models`` builds both).
"""

from __future__ import annotations

import argparse
import io
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server import start_server  # noqa: E402

from visionserve.convert.samples import sample_image  # noqa: E402
from visionserve.loadtest.config import LoadConfig  # noqa: E402
from visionserve.loadtest.runner import run_load  # noqa: E402
from visionserve.service.galleries import Gallery, GalleryStore, Item  # noqa: E402

EMBED, CLASSIFY = "mobilenet_v2_embed", "mobilenet_v2"
SKIMAGE = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle", "hubble_deep_field", "camera", "coins",
           "immunohistochemistry", "retina", "cat", "page", "horse", "moon", "brick", "grass", "gravel",
           "logo", "text", "clock")


def photos() -> dict[str, Image.Image]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    out = {}
    for name in SKIMAGE:
        try:
            img = sample_image(name) if name in ("motorcycle",) else Image.fromarray(np.asarray(getattr(data, name)()))
        except Exception as e:  # a data set missing from this scikit-image: skip it, say so
            print(f"skipped {name}: {e}")
            continue
        out[name] = img.convert("RGB")
    for i, arr in enumerate(load_sample_images().images):
        out[f"sklearn_{i}"] = Image.fromarray(arr).convert("RGB")
    return out


def crop(img: Image.Image, rng: np.random.Generator) -> bytes:
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.35, 0.65)), int(h * rng.uniform(0.35, 0.65))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    buf = io.BytesIO()
    img.crop((x, y, x + cw, y + ch)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def start(repo: Path, data: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """``visionserve serve`` on a free port with its galleries under ``data``, ready."""
    server = start_server(repo, data, env={"VISIONSERVE_DATA_DIR": str(data)}, timeout=180)
    return server.url, server.process


def one_shot(url: str, imgs: dict[str, Image.Image], per_photo: int, seed: int) -> tuple[float, int]:
    rng = np.random.default_rng(seed)
    with httpx.Client(timeout=60) as c:
        for name, img in imgs.items():
            r = c.put(f"{url}/v1/galleries/photos/items/{name}", content=crop(img, rng),
                      params={"model": EMBED, "label": name}, headers={"Content-Type": "image/jpeg"})
            r.raise_for_status()
        hits = total = 0
        for name, img in imgs.items():
            for _ in range(per_photo):
                r = c.post(f"{url}/v1/galleries/photos/identify", content=crop(img, rng),
                           headers={"Content-Type": "image/jpeg"})
                r.raise_for_status()
                hits += r.json()["label"] == name
                total += 1
    return hits / max(total, 1), total


def fill(data: Path, total: int, dim: int) -> None:
    """Filler items (random unit vectors) up to ``total``, written through the store like any update."""
    store = GalleryStore(data)
    rng = np.random.default_rng(1)

    def add(g: Gallery | None) -> Gallery:
        assert g is not None
        n = total - len(g.items)
        v = rng.standard_normal((n, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        items = tuple(Item(f"filler{i}", "filler", "0" * 64) for i in range(n))
        return Gallery(g.name, g.model, g.version, g.items + items, np.concatenate([g.vectors, v]))

    store.update("photos", add)


def latency(url: str, image: bytes, repeats: int) -> tuple[float, float, float]:
    """Medians of embed and identify alternated, and the median of the paired differences (identify minus
    the embed just before it: machine noise that moves both cancels)."""
    emb, ident = [], []
    h = {"Content-Type": "image/jpeg"}
    with httpx.Client(timeout=60) as c:
        for _ in range(5):  # warm
            c.post(f"{url}/v1/models/{EMBED}/embed", content=image, headers=h)
            c.post(f"{url}/v1/galleries/photos/identify", content=image, headers=h)
        for _ in range(repeats):
            t = time.perf_counter()
            c.post(f"{url}/v1/models/{EMBED}/embed", content=image, headers=h).raise_for_status()
            emb.append(time.perf_counter() - t)
            t = time.perf_counter()
            c.post(f"{url}/v1/galleries/photos/identify", content=image, headers=h).raise_for_status()
            ident.append(time.perf_counter() - t)
    paired = statistics.median(i - e for i, e in zip(ident, emb))
    return statistics.median(emb) * 1e3, statistics.median(ident) * 1e3, paired * 1e3


def search_ms(url: str) -> float:
    """The server's own mean search time per identify (``visionserve_gallery_search_seconds``)."""
    text = httpx.get(f"{url}/metrics").text
    total = sum(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("visionserve_gallery_search_seconds_sum"))
    count = sum(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("visionserve_gallery_search_seconds_count"))
    return total / max(count, 1) * 1e3


def saturation(url: str, image: bytes, duration: float, rounds: int) -> tuple[list[float], list[float]]:
    out: dict[str, list[float]] = {"classify": [], "embed": []}
    for _ in range(rounds):
        for kind, model in (("classify", CLASSIFY), ("embed", EMBED)):
            cfg = LoadConfig(url=url, model=model, kind=kind, images=[image], concurrency=16, duration=duration,
                             warmup=1.0, metrics=False)
            out[kind].append(run_load(cfg).throughput_rps)
    return out["classify"], out["embed"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("model_repository"))
    ap.add_argument("--per-photo", type=int, default=10, help="crops identified per photo")
    ap.add_argument("--gallery-size", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: oneshot, saturation")
    ap.add_argument("--write-crops", type=Path, default=None,
                    help="only write an ImageFolder of crops (one folder per photo) for `visionserve evaluate`")
    args = ap.parse_args()

    data = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    imgs = photos()
    if args.write_crops:
        rng = np.random.default_rng(args.seed)
        for name, img in imgs.items():
            (args.write_crops / name).mkdir(parents=True, exist_ok=True)
            for i in range(args.per_photo + 1):
                (args.write_crops / name / f"{i:02d}.jpg").write_bytes(crop(img, rng))
        print(f"wrote {len(imgs)} x {args.per_photo + 1} crops to {args.write_crops}")
        return
    skip = set(args.skip.split(","))
    url, proc = start(args.repository, data)
    try:
        acc, n = one_shot(url, imgs, 0 if "oneshot" in skip else args.per_photo, args.seed)
        if "oneshot" not in skip:
            print(f"one-shot crops: {acc:.1%} of {n} crops of {len(imgs)} photos named right ({len(imgs)}-way, "
                  "1 shot)")
        first = crop(imgs["chelsea"], np.random.default_rng(0))
        dim = httpx.post(f"{url}/v1/models/{EMBED}/embed", content=first,
                         headers={"Content-Type": "image/jpeg"}).json()["dim"]
        fill(data, args.gallery_size, dim)
        probe = (ROOT / "examples" / "images" / "cat.jpg").read_bytes()
        e_ms, i_ms, d_ms = latency(url, probe, args.repeats)
        print(f"latency, {args.gallery_size:,}-item gallery, median of {args.repeats} alternated: embed "
              f"{e_ms:.2f} ms, identify {i_ms:.2f} ms; identify - embed: {i_ms - e_ms:+.2f} ms (medians), "
              f"{d_ms:+.2f} ms (median of pairs); server-side search {search_ms(url):.2f} ms a query (mean)")
        if "saturation" in skip:
            return
        cls, emb = saturation(url, probe, args.duration, args.rounds)
        ratio = statistics.median(emb) / statistics.median(cls)
        print(f"saturation (16 connections, {args.rounds} rounds alternated): classify "
              f"{', '.join(f'{x:.0f}' for x in cls)} req/s, embed {', '.join(f'{x:.0f}' for x in emb)} req/s; "
              f"embed / classify = {ratio:.2f}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


if __name__ == "__main__":
    main()
