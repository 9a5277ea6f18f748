"""The recipe search behind the digits one-shot model: each named variant trained and scored on digits 0–4 only.

    python examples/search_digits_oneshot.py --list
    python examples/search_digits_oneshot.py base elastic families --seeds 0,1
    python examples/search_digits_oneshot.py --all --jobs 2        # ~4 min a run on one core

Never loads an image of 5–9. Two held-out scores, printed at every fifth of a run and in a final table:

* ``val``: 5-way 1-shot on the real digits 0–4 (300 episodes). Meaningful for variants trained without digits
  (every variant but the ``digits*`` ones, which train on some of 0–4).
* ``v3``: 3-way 1-shot on the real digits 2, 3, 4 (300 episodes). Held out for every variant here, including
  the ``digits*`` ones, which add 0 and 1 to the training data: the question "do real-handwriting classes
  help a learned metric on other real-handwriting classes" asked without 5–9.

The variants change one thing each against ``base`` (the committed recipe's glyph part, ``examples/
train_digits_oneshot.py --validate``): the glyph generator (pen, arcs, jitter, number of classes, families of
templates that differ by one stroke, allographs), the network (width, embedding size), the loss (Euclidean
prototypes, a CosFace classifier over all classes), the augmentation (elastic) or the digits added.
Results of this machine's run are in docs/embeddings.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as `python examples/<script>.py`: the repository root is importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import glyphs as G
from examples.train_digits_oneshot import (
    SIZE,
    OneShotNet,
    augment,
    digit_classes,
    digit_ink,
    embed,
    one_shot_accuracy,
    upsample,
)


@dataclass(frozen=True)
class Variant:
    glyphs: int = 2000
    per: int = 10
    jitter: float = 0.05
    pen: tuple[float, float] = (2.0, 5.0)
    fill: bool = False  # the frame filled to within 0.3 pen widths (thicker, fuller glyphs) instead of 1–2 px
    arc: float = 0.25
    families: int = 0  # classes come in families of this size whose templates differ by one stroke
    family_episodes: bool = False  # an episode draws whole families (hard negatives)
    allograph: float = 0.0  # share of a class's instances written with an extra short stroke
    steps: int = 1000
    width: int = 32
    dim: int = 64
    loss: str = "proto"  # proto (cosine), euclid (squared distance), cosface (classifier over all classes)
    elastic: float = 0.0
    digits: tuple[int, ...] = ()
    digit_views: str = "all"  # all: 4 rotations x 2 mirrorings each a class; upright: the digit itself
    digit_share: float = 0.0  # share of an episode's classes drawn from the digits (0: as often as any class)
    note: str = ""


BASE = Variant(note="the committed recipe's glyph part (--validate)")
VARIANTS: dict[str, Variant] = {
    "base": BASE,
    "elastic": replace(BASE, elastic=2.0, note="+ elastic distortion (alpha 2 px of 32)"),
    "jitter10_8k": replace(BASE, glyphs=8000, jitter=0.10, note="8 000 classes, control-point jitter 0.10"),
    "thick": replace(BASE, pen=(4.0, 8.0), fill=True,
                     note="pen 4-8 px, frame filled: ink statistics of load_digits (mean 4.8 vs 3.0)"),
    "classes8k": replace(BASE, glyphs=8000, note="8 000 glyph classes"),
    "arcs50": replace(BASE, arc=0.5, note="half the strokes elliptic arcs (loops), not a quarter"),
    "wide": replace(BASE, width=48, note="1.5x the channels"),
    "dim128": replace(BASE, dim=128, note="128-D embedding"),
    "euclid": replace(BASE, loss="euclid", note="Euclidean prototypes (Snell et al.)"),
    "cosface": replace(BASE, loss="cosface", note="CosFace classifier over all 2 000 classes (m 0.1, s 16)"),
    "families": replace(BASE, families=4, note="families of 4 templates differing by one stroke"),
    "families_hard": replace(BASE, families=4, family_episodes=True,
                             note="... and every episode draws whole families"),
    "allograph30": replace(BASE, allograph=0.3, note="30 % of a class's instances carry an extra short stroke"),
    "allograph50": replace(BASE, allograph=0.5, note="... 50 %"),
    "digits01": replace(BASE, digits=(0, 1), note="+ digits 0, 1 under 8 views (16 classes)"),
    "digits01_share25": replace(BASE, digits=(0, 1), digit_share=0.25, note="... a quarter of each episode"),
    "digits01_upright": replace(BASE, digits=(0, 1), digit_views="upright", digit_share=0.05,
                                note="+ digits 0, 1 upright, both in every episode"),
}


# -- generator variants (examples/glyphs.py's template and instance, with the knobs above) ------------------
def _family(rng: np.random.Generator, size: int, arc: float) -> list[list[np.ndarray]]:
    """A template and ``size - 1`` siblings that differ from it by one stroke added, removed or replaced."""
    box = np.array([rng.uniform(0.35, 1.0), 1.0])
    parent: list[np.ndarray] = []
    for _ in range(int(rng.choice([1, 2, 2, 3]))):
        parent.append(G.stroke(rng, box, parent, arc, last=False))
    out = [parent]
    while len(out) < size:
        op = rng.choice(["add", "remove", "replace"] if len(parent) > 1 else ["add", "replace"])
        if op == "add":
            out.append([*parent, G.stroke(rng, box, parent, arc, last=False)])
        elif op == "remove":
            i = int(rng.integers(len(parent)))
            out.append(parent[:i] + parent[i + 1:])
        else:
            i = int(rng.integers(len(parent)))
            rest = parent[:i] + parent[i + 1:]
            out.append([*rest, G.stroke(rng, box, rest, arc, last=False)])
    return out


def _serif(rng: np.random.Generator, strokes: list[np.ndarray]) -> np.ndarray:
    """A short extra stroke (a foot, a flag, a bar) at an end or the middle of a stroke, touching or crossing."""
    c = G._curve(strokes[int(rng.integers(len(strokes)))])
    p = c[rng.choice([0, len(c) - 1, len(c) // 2])]
    a, n = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.35)
    q = p + n * np.array([np.cos(a), np.sin(a)])
    return np.stack([p - (q - p) / 2, p + (q - p) / 2]) if rng.random() < 0.5 else np.stack([p, q])


def glyph_set(v: Variant, seed: int) -> np.ndarray:
    """``[classes, per, 8, 8]`` ink counts of the variant's glyph classes (for ``base``: exactly
    ``examples.glyphs.glyph_set``, the committed generator)."""
    rng = np.random.default_rng(seed)
    out = np.empty((v.glyphs, v.per, 8, 8), dtype=np.float32)
    pending: list[list[np.ndarray]] = []
    for c in range(v.glyphs):
        if v.families:
            pending = pending or _family(rng, v.families, v.arc)
            t = pending.pop()
        else:
            t = G.template(rng, v.arc)
        variants = [t, [*t, _serif(rng, t)]] if v.allograph else [t]
        for i in range(v.per):
            written = variants[1] if v.allograph and rng.random() < v.allograph else t
            out[c, i] = G.instance(written, rng, v.jitter, v.pen, v.fill)
    return out


def elastic(x: torch.Tensor, g: torch.Generator, alpha: float) -> torch.Tensor:
    """A smooth random displacement field (4x4 control grid, bicubic), ``alpha`` pixels of 32 in scale."""
    n, _, h, w = x.shape
    d = F.interpolate(torch.randn(n, 2, h // 4, w // 4, generator=g), size=(h, w), mode="bicubic",
                      align_corners=False) * (alpha * 2 / h)
    base = F.affine_grid(torch.eye(2, 3).expand(n, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, base + d.permute(0, 2, 3, 1), padding_mode="border", align_corners=False)


# -- one run ---------------------------------------------------------------------------------------------
def run(name: str, seed: int) -> dict:
    v = VARIANTS[name]
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    started = time.perf_counter()
    gl = glyph_set(v, 1000 + seed)
    classes = list(upsample(gl.reshape(-1, 8, 8)).view(v.glyphs, v.per, 1, SIZE, SIZE))
    n_digit = 0
    if v.digits:
        ink, y = digit_ink(v.digits)
        extra = ([upsample(ink[y == d]) for d in v.digits] if v.digit_views == "upright"
                 else digit_classes(ink, y))
        classes += extra
        n_digit = len(extra)
    val_x, val_y = digit_ink((0, 1, 2, 3, 4))
    val_x = upsample(val_x)
    v3_x, v3_y = digit_ink((2, 3, 4))
    v3_x = upsample(v3_x)

    model = OneShotNet(width=v.width, dim=v.dim)
    g = torch.Generator().manual_seed(seed)
    log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
    weights = nn.Parameter(torch.randn(len(classes), v.dim) * 0.1)  # the CosFace classifier's class vectors
    params = [*model.parameters(), log_scale] + ([weights] if v.loss == "cosface" else [])
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=v.steps, pct_start=0.15)
    ways, queries = 40, 3
    target = torch.arange(ways).repeat_interleave(queries)
    val = v3 = 0.0
    emb = np.zeros((0, v.dim), np.float32)
    for step in range(v.steps):
        if v.digit_share:
            nd = min(n_digit, round(ways * v.digit_share))
            n_glyph = len(classes) - n_digit
            chosen = (torch.randperm(n_glyph, generator=g)[:ways - nd].tolist()
                      + (n_glyph + torch.randperm(n_digit, generator=g)[:nd]).tolist())
        elif v.family_episodes:
            fams = torch.randperm(v.glyphs // v.families, generator=g)[:ways // v.families].tolist()
            chosen = [f * v.families + k for f in fams for k in range(v.families)]
        else:
            chosen = torch.randperm(len(classes), generator=g)[:ways].tolist()
        batch = torch.cat([classes[c][torch.randperm(len(classes[c]), generator=g)[:1 + queries]]
                           for c in chosen])
        x = augment(batch, g)
        if v.elastic:
            x = elastic(x, g, v.elastic)
        e = model(x)
        if v.loss == "cosface":
            labels = torch.tensor(chosen).repeat_interleave(1 + queries)
            cos = F.normalize(e, dim=1) @ F.normalize(weights, dim=1).T
            loss = F.cross_entropy(16.0 * (cos - 0.1 * F.one_hot(labels, len(classes))), labels)
        else:
            e = (F.normalize(e, dim=1) if v.loss == "proto" else e).view(len(chosen), 1 + queries, -1)
            q = e[:, 1:].reshape(-1, e.shape[-1])
            logits = (q @ e[:, 0].T if v.loss == "proto" else -torch.cdist(q, e[:, 0]) ** 2 / e.shape[-1])
            loss = F.cross_entropy(log_scale.exp() * logits, target[:len(q)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, v.steps // 5) == 0:
            emb = embed(model, val_x)
            val = one_shot_accuracy(emb, val_y, 300, 0)[0]
            v3 = one_shot_accuracy(embed(model, v3_x), v3_y, 300, 0)[0]
            print(f"[{name} seed {seed}] step {step + 1}/{v.steps}: loss {loss.item():.3f}, val {val:.2%}, "
                  f"v3 {v3:.2%}, {time.perf_counter() - started:.0f} s", flush=True)
    return {"variant": name, "seed": seed, "val": val, "v3": v3, "seconds": time.perf_counter() - started,
            "embeddings": emb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help="names from --list, each optionally with its own seeds: base:0,1,2")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, one core each")
    args = ap.parse_args()
    if args.list:
        for k, v in VARIANTS.items():
            print(f"{k:18s} {v.note}")
        return
    asked = {n.partition(":")[0]: n.partition(":")[2] or args.seeds for n in args.variants}
    if args.all:
        asked = {n: asked.get(n, args.seeds) for n in VARIANTS}
    unknown = [n for n in asked if n not in VARIANTS]
    if unknown or not asked:
        ap.error(f"unknown or no variants: {unknown}; see --list")
    jobs = [(n, int(s)) for n, seeds in asked.items() for s in seeds.split(",")]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, *zip(*jobs)))
    print("\n| variant | seed | val: 5-way 1-shot on 0-4 | v3: 3-way 1-shot on 2-4 | s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in results:
        flag = " (trains on 0-4)" if VARIANTS[str(r["variant"])].digits else ""
        print(f"| {r['variant']} | {r['seed']} | {r['val']:.2%}{flag} | {r['v3']:.2%} | {r['seconds']:.0f} |")
    # ensembles: the mean of the members' cosines is the cosine of their concatenated unit embeddings
    _, val_y = digit_ink((0, 1, 2, 3, 4))
    base = [r["embeddings"] for r in results if r["variant"] == "base"]
    glyph_only = [r["embeddings"] for r in results if not VARIANTS[r["variant"]].digits]
    for label, members in (("every base seed", base), ("every run without digits", glyph_only)):
        if len(members) > 1:
            acc = one_shot_accuracy(np.concatenate(members, 1) / np.sqrt(len(members)), val_y, 300, 0)[0]
            print(f"ensemble of {label} ({len(members)}): val {acc:.2%}")


if __name__ == "__main__":
    main()
