"""The picture in docs/embeddings.md: generated glyph classes beside the training digits, and a PCA of the
trained model's embeddings of the unseen digits 5–9 (a report of the final model, not used to choose it).

    python examples/plot_digits_oneshot.py --weights tests/data/digits_oneshot/oneshot_cnn.pt \
        --out docs/embeddings/digits_oneshot.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

if __package__ in (None, ""):  # run as `python examples/<script>.py`: the repository root is importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.glyphs import glyph_set
from examples.train_digits_oneshot import (
    TRAIN_DIGITS,
    UNSEEN_DIGITS,
    OneShotNet,
    digit_images,
    digit_ink,
    embed,
    to_tensor,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=Path("tests/data/digits_oneshot/oneshot_cnn.pt"))
    ap.add_argument("--out", type=Path, default=Path("docs/embeddings/digits_oneshot.png"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows, cols = 10, 8
    glyphs = glyph_set(rows, cols, seed=1000)  # the first classes the training script generates
    ink, y = digit_ink(TRAIN_DIGITS)
    fig = plt.figure(figsize=(13, 6.5))
    grid = fig.add_gridspec(rows + 1, cols + 9)
    for r in range(rows + 1):
        for c in range(cols):
            ax = fig.add_subplot(grid[r, c])
            img = glyphs[r, c] if r < rows else ink[np.flatnonzero(y == c % 5)[c // 5]]
            ax.imshow(img, cmap="gray_r", vmin=0, vmax=16)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel("0–4" if r == rows else f"g{r}", rotation=0, labelpad=12, fontsize=8)
    fig.text(0.02, 0.97, "generated glyph classes (a row = one class), bottom: training digits 0–4", fontsize=9)
    model = OneShotNet()
    model.load_state_dict(torch.load(args.weights, map_location="cpu"))
    imgs, targets, _ = digit_images(UNSEEN_DIGITS)
    emb = embed(model, to_tensor(imgs))
    centred = emb - emb.mean(0)
    pcs = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
    ax = fig.add_subplot(grid[:, cols + 1:])
    for d in UNSEEN_DIGITS:
        p = pcs[targets == d]
        ax.scatter(p[:, 0], p[:, 1], s=6, alpha=0.6, label=str(d))
    ax.legend(title="digit", markerscale=3)
    ax.set_title("unseen digits 5–9: PCA of the 64-D embeddings", fontsize=10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
