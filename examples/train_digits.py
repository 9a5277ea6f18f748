"""Train a compact CNN on scikit-learn's 8×8 digits, upscaled to 32×32 RGB — the tiny model the tests use.

    python examples/train_digits.py --out tests/data/digits

writes ``digits_cnn.pt`` (state_dict), ``labels.txt``, and ImageFolders ``test/`` (and with ``--train-images``
``train/``) of 32×32 PNGs, one sub-folder per digit. Fixed seed, stratified 75/25 split, about a minute on
two CPU cores. Convert it with::

    visionserve convert --module examples.train_digits:digits_net --weights tests/data/digits/digits_cnn.pt \
        --labels tests/data/digits/labels.txt --input-size 32 --resize 32 --mean 0.5,0.5,0.5 \
        --std 0.5,0.5,0.5 --name digits --repository model_repository
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

SIZE = 32
MEAN, STD = 0.5, 0.5  # per channel, after scaling pixels to [0, 1]


class DigitsNet(nn.Module):
    """Four conv-BN-ReLU blocks and a linear head: ~60 k parameters, ~5 M MACs at 32×32."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                       nn.ReLU(inplace=True)]
            return [*layers, nn.MaxPool2d(2)] if pool else layers

        w = width
        self.features = nn.Sequential(*block(3, w, True), *block(w, 2 * w, True), *block(2 * w, 4 * w, False),
                                      *block(4 * w, 4 * w, False))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def digits_net() -> DigitsNet:
    """Factory for ``visionserve convert --module examples.train_digits:digits_net``."""
    return DigitsNet()


def digit_images() -> tuple[list[Image.Image], np.ndarray]:
    """Every sklearn digit as a 32×32 RGB image (bilinear upscale of the 0–16 grey levels)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = []
    for x in d.images:
        grey = Image.fromarray((x * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
        imgs.append(grey.resize((SIZE, SIZE), Image.Resampling.BILINEAR).convert("RGB"))
    return imgs, d.target.astype(np.int64)


def to_tensor(imgs: list[Image.Image]) -> torch.Tensor:
    """Exactly what the model's manifest preprocessing does: scale 1/255, (x - 0.5) / 0.5, NCHW."""
    arr = np.stack([np.asarray(i, dtype=np.float32) for i in imgs]) / 255.0
    return torch.from_numpy(((arr - MEAN) / STD).transpose(0, 3, 1, 2).copy())


def split(n: int, targets: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(n), test_size=0.25, random_state=seed, stratify=targets)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * (-(-len(x) // 64)))
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            xb = x[idx]
            # small random shifts (±2 px): cheap augmentation, keeps the net from memorising positions
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            opt.zero_grad()
            loss = loss_fn(model(xb), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}", flush=True)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def write_folder(directory: Path, imgs: list[Image.Image], targets: np.ndarray, idx: np.ndarray) -> None:
    for i in idx:
        d = directory / str(int(targets[i]))
        d.mkdir(parents=True, exist_ok=True)
        imgs[i].convert("L").save(d / f"{int(i):04d}.png", optimize=True)  # grey PNG: a third of the bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/data/digits"))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-images", action="store_true", help="also write the training ImageFolder")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    started = time.perf_counter()
    imgs, targets = digit_images()
    tr, te = split(len(imgs), targets, args.seed)
    x, y = to_tensor(imgs), torch.from_numpy(targets)
    model = DigitsNet()
    train(model, x[tr], y[tr], args.epochs, args.seed)
    acc = accuracy(model, x[te], y[te])
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "digits_cnn.pt")
    (args.out / "labels.txt").write_text("".join(f"{d}\n" for d in range(10)))
    write_folder(args.out / "test", imgs, targets, te)
    if args.train_images:
        write_folder(args.out / "train", imgs, targets, tr)
    print(f"test accuracy {acc:.2%} on {len(te)} images; wrote {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
