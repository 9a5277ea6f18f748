"""Train a small metric-learning CNN for one-shot recognition of digits 5–9 it never saw.

    python examples/train_digits_oneshot.py --out tests/data/digits_oneshot \
        --repository tests/data/digits_oneshot_repo
    python examples/train_digits_oneshot.py --validate   # recipe selection: never loads a 5–9
    python examples/search_digits_oneshot.py --list      # the variants tried against this recipe, on 0–4 only

Trained on scikit-learn's digits **0–4 and procedurally generated non-digit glyphs; no image of 5–9**
(``examples/glyphs.py``: random pen strokes drawn and reduced to 8×8 the way ``load_digits`` was made).
A prototypical network (Snell et al., 2017): every step is a many-way episode — one support image per class
is its prototype, queries are classified by cosine similarity × a learned scale, and the loss is the
cross-entropy of that. The classes are thousands of glyph templates plus the training digits under 4
rotations × 2 mirrorings. Meta-learning over many classes is what makes one-shot generalise (Omniglot):
five base classes alone gave an embedding no better than raw pixels (docs/embeddings.md).

Recipe selection used ``--validate`` only: the same recipe trained on glyphs alone, scored by 5-way 1-shot
on the real digits 0–4 (classes it never saw). Digits 5–9 appear only in the final report.

Writes ``oneshot_cnn.pt`` (state_dict), ``unseen/<digit>/*.png`` (every 5–9 image, 32×32 grey: the
ImageFolder for ``visionserve evaluate``) and, with ``--repository``, the converted embedding model
``digits_oneshot`` (``visionserve convert --task embed``: output L2-normalised in the graph)::

    visionserve convert --task embed --module examples.train_digits_oneshot:oneshot_net \
        --weights tests/data/digits_oneshot/oneshot_cnn.pt --input-size 32 --resize 32 \
        --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5 --name digits_oneshot --repository model_repository
    visionserve evaluate digits_oneshot -r model_repository -d tests/data/digits_oneshot/unseen
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

if __package__ in (None, ""):  # run as `python examples/<script>.py`: the repository root is importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.glyphs import glyph_set

SIZE = 32
MEAN, STD = 0.5, 0.5
TRAIN_DIGITS = (0, 1, 2, 3, 4)
UNSEEN_DIGITS = (5, 6, 7, 8, 9)
DIM = 64


class OneShotNet(nn.Module):
    """Grey, 2× average-pooled input (the source is 8×8: 16×16 loses nothing), four conv-BN-ReLU blocks, the
    4×4 map flattened and projected to a 64-D embedding (L2-normalised by the converter's wrapper, in the
    ONNX graph, and by the training loss)."""

    def __init__(self, width: int = 32, dim: int = DIM) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                       nn.ReLU(inplace=True)]
            return [*layers, nn.MaxPool2d(2)] if pool else layers

        w = width
        self.features = nn.Sequential(*block(1, w, False), *block(w, 2 * w, True), *block(2 * w, 4 * w, True),
                                      *block(4 * w, 4 * w, False))
        # where a stroke is matters for a digit: keep the 4x4 layout (a global average pool threw it away)
        self.project = nn.Linear(4 * w * (SIZE // 8) ** 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x.mean(1, keepdim=True), 2)
        return self.project(torch.flatten(self.features(x), 1))


def oneshot_net() -> OneShotNet:
    """Factory for ``visionserve convert --task embed --module examples.train_digits_oneshot:oneshot_net``."""
    return OneShotNet()


def upsample(ink: np.ndarray) -> torch.Tensor:
    """``[N, 8, 8]`` ink counts (0–16) → ``[N, 1, 32, 32]`` model input, as served: grey levels ×255/16,
    bilinear to 32×32 (within one grey level of PIL's resize of the PNGs), then (x/255 − 0.5) / 0.5."""
    grey = torch.round(torch.as_tensor(ink, dtype=torch.float32) * (255.0 / 16.0))[:, None]
    up = F.interpolate(grey, size=SIZE, mode="bilinear", align_corners=False).round().clamp(0, 255)
    return (up / 255.0 - MEAN) / STD


def digit_images(which: tuple[int, ...]) -> tuple[list[Image.Image], np.ndarray, np.ndarray]:
    """The sklearn digits of the given classes as 32×32 RGB images (bilinear upscale of the 0–16 grey
    levels), their labels and their indices in ``load_digits``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.flatnonzero(np.isin(d.target, which))
    imgs = []
    for x in d.images[idx]:
        grey = Image.fromarray((x * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        imgs.append(grey.resize((SIZE, SIZE), Image.Resampling.BILINEAR).convert("RGB"))
    return imgs, d.target[idx].astype(np.int64), idx


def digit_ink(which: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The 8×8 ink counts of the sklearn digits of the given classes, and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.isin(d.target, which)
    return d.images[keep].astype(np.float32), d.target[keep].astype(np.int64)


def to_tensor(imgs: list[Image.Image]) -> torch.Tensor:
    """What the manifest's preprocessing does: scale 1/255, (x - 0.5) / 0.5, NCHW."""
    arr = np.stack([np.asarray(i, dtype=np.float32) for i in imgs]) / 255.0
    return torch.from_numpy(((arr - MEAN) / STD).transpose(0, 3, 1, 2).copy())


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random rotation (±12°), scale (±10 %), shear (±0.15) and shift (±2 px of 32): handwriting varies so."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(12)
    scale = 1 + (torch.rand(n, generator=g) * 2 - 1) * 0.1
    shear = (torch.rand(n, generator=g) * 2 - 1) * 0.15
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 / (SIZE / 2))
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def digit_classes(ink: np.ndarray, y: np.ndarray) -> list[torch.Tensor]:
    """Each training digit under 4 rotations × 2 mirrorings is a class of its own (the Omniglot trick)."""
    out = []
    for c in sorted(set(y.tolist())):
        x = upsample(ink[y == c])
        for flip in (False, True):
            for k in range(4):
                v = torch.rot90(x, k, dims=(2, 3))
                out.append(torch.flip(v, dims=(3,)) if flip else v)
    return out


def one_shot_accuracy(emb: np.ndarray, y: np.ndarray, episodes: int, seed: int) -> tuple[float, float]:
    """5-way 1-shot (N-way for N classes): per episode one random support image per class, every other
    image a query; cosine similarity."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(y.tolist()))
    accs = []
    for _ in range(episodes):
        support = np.array([rng.choice(np.flatnonzero(y == c)) for c in classes])
        query = np.setdiff1d(np.arange(len(y)), support)
        pred = np.asarray(classes)[(emb[query] @ emb[support].T).argmax(1)]
        accs.append(float((pred == y[query]).mean()))
    return float(np.mean(accs)), float(np.std(accs))


def embed(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        out = F.normalize(model(x), dim=1).numpy()
    model.train()
    return out


def train(model: nn.Module, classes: list[torch.Tensor], steps: int, seed: int, ways: int = 40,
          queries: int = 3, lr: float = 3e-3,
          validation: tuple[torch.Tensor, np.ndarray] | None = None) -> None:
    """Prototypical-network episodes: ``ways`` classes, 1 support + ``queries`` images each; cosine
    similarity × a learned scale as logits. ``validation`` (digits 0–4, when the classes hold none of them)
    is scored every fifth of the run."""
    g = torch.Generator().manual_seed(seed)
    log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
    opt = torch.optim.AdamW([*model.parameters(), log_scale], lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    ways = min(ways, len(classes))
    target = torch.arange(ways).repeat_interleave(queries)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        chosen = torch.randperm(len(classes), generator=g)[:ways].tolist()
        batch = torch.cat([classes[c][torch.randperm(len(classes[c]), generator=g)[:1 + queries]]
                           for c in chosen])
        emb = F.normalize(model(augment(batch, g)), dim=1).view(ways, 1 + queries, -1)
        q = emb[:, 1:].reshape(-1, emb.shape[-1])
        loss = F.cross_entropy(log_scale.exp() * q @ emb[:, 0].T, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            line = f"step {step + 1}/{steps}: loss {loss.item():.3f}, {time.perf_counter() - started:.0f} s"
            if validation is not None and ((step + 1) % max(1, steps // 5) == 0 or step + 1 == steps):
                acc, std = one_shot_accuracy(embed(model, validation[0]), validation[1], 300, 0)
                line += f"; validation 5-way 1-shot on digits 0-4: {acc:.2%} ± {std:.2%}"
            print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/data/digits_oneshot"))
    ap.add_argument("--repository", type=Path, default=None, help="also convert into this repository")
    ap.add_argument("--glyphs", type=int, default=2000, help="procedurally generated glyph classes")
    ap.add_argument("--per-glyph", type=int, default=10, help="instances of each glyph class")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--validate", action="store_true",
                    help="train on glyphs alone and score 5-way 1-shot on digits 0-4; writes nothing")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a small net: one thread is nearly as fast, and leaves the other core alone
    started = time.perf_counter()
    glyphs = glyph_set(args.glyphs, args.per_glyph, seed=1000 + args.seed)
    classes = list(upsample(glyphs.reshape(-1, 8, 8)).view(args.glyphs, args.per_glyph, 1, SIZE, SIZE))
    ink, y = digit_ink(TRAIN_DIGITS)
    if args.validate:
        print(f"{len(classes)} glyph classes ({time.perf_counter() - started:.0f} s); validating on digits 0-4")
        train(OneShotNet(), classes, args.steps, args.seed, validation=(upsample(ink), y))
        return
    classes += digit_classes(ink, y)
    print(f"{args.glyphs} glyph classes + {len(classes) - args.glyphs} digit pseudo-classes "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    model = OneShotNet()
    train(model, classes, args.steps, args.seed)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "oneshot_cnn.pt")
    print(f"trained in {time.perf_counter() - started:.0f} s; wrote {args.out / 'oneshot_cnn.pt'}")
    # the report, and the only place digits 5-9 are loaded
    imgs, targets, idx = digit_images(UNSEEN_DIGITS)
    mean, std = one_shot_accuracy(embed(model, to_tensor(imgs)), targets, 500, args.seed)
    for img, t, i in zip(imgs, targets, idx):
        d = args.out / "unseen" / str(int(t))
        d.mkdir(parents=True, exist_ok=True)
        img.convert("L").save(d / f"{int(i):04d}.png", optimize=True)
    print(f"unseen digits 5-9, 5-way 1-shot (PyTorch, 500 episodes): {mean:.2%} ± {std:.2%}")
    if args.repository:
        from visionserve.convert.embed import embedder
        from visionserve.convert.pipeline import ConvertOptions, convert_model
        from visionserve.convert.sources import Source
        from visionserve.service.manifest import Preprocess

        pre = Preprocess(resize=SIZE, mean=(MEAN,) * 3, std=(STD,) * 3)
        source = Source(embedder(model, None), "module:examples.train_digits_oneshot:oneshot_net (embedding at "
                        "its output)", args.out / "oneshot_cnn.pt")
        entry = convert_model(source, ConvertOptions(
            name="digits_oneshot", repository=args.repository, task="embed", input_size=(SIZE, SIZE),
            preprocess=pre, overwrite=True, version="1", max_batch_size=64))
        print(f"wrote {entry.directory}")


if __name__ == "__main__":
    main()
