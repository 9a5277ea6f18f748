"""A bootstrap interval for a detector's mAP@0.5 drop: resample the held-out images, re-accumulate COCO AP.

pycocotools matches detections to ground truth image by image (``COCOeval.evaluate``); only the
accumulation (precision over the pooled, score-sorted detections) mixes images. So the per-image matches are
computed once, and each bootstrap replicate only pools the drawn images' matches again — the same 101-point
interpolated AP as ``COCOeval.accumulate`` at IoU 0.5, all areas, 100 detections an image — for fp32 and
int8 on the *same* draw (a paired interval for the drop).
"""

from __future__ import annotations

from typing import Any

import numpy as np

REC_THRS = np.linspace(0.0, 1.0, 101)


def per_image(ev: Any) -> list[list[tuple[np.ndarray, np.ndarray, int]]]:
    """[category][image] → (scores, true-positive flags of the non-ignored detections, non-ignored GT count)."""
    cats, imgs = ev.params.catIds, ev.params.imgIds
    n_area = len(ev.params.areaRng)
    out = []
    for k in range(len(cats)):
        row = []
        for i in range(len(imgs)):
            e = ev.evalImgs[k * n_area * len(imgs) + i]  # area range 0: all
            if e is None:
                row.append((np.zeros(0), np.zeros(0, bool), 0))
                continue
            keep = ~np.asarray(e["dtIgnore"][0], bool)
            scores = np.asarray(e["dtScores"])[keep]
            tp = (np.asarray(e["dtMatches"][0]) > 0)[keep]
            row.append((scores, tp, int((~np.asarray(e["gtIgnore"], bool)).sum())))
        out.append(row)
    return out


def ap50(rows: list[tuple[np.ndarray, np.ndarray, int]]) -> float | None:
    """COCO's interpolated AP over the pooled rows of one category (None without ground truth)."""
    npig = sum(r[2] for r in rows)
    if npig == 0:
        return None
    scores = np.concatenate([r[0] for r in rows])
    tp = np.concatenate([r[1] for r in rows])
    order = np.argsort(-scores, kind="mergesort")
    tp = tp[order]
    tps, fps = np.cumsum(tp), np.cumsum(~tp)
    recall = tps / npig
    precision = tps / np.maximum(tps + fps, np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    idx = np.searchsorted(recall, REC_THRS, side="left")
    q = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(q.mean())


def map50(table: list[list[tuple[np.ndarray, np.ndarray, int]]], draw: np.ndarray) -> float:
    aps = [a for row in table if (a := ap50([row[i] for i in draw])) is not None]
    return float(np.mean(aps)) if aps else 0.0


def drop_ci(ev_ref: Any, ev_got: Any, reps: int = 500, level: float = 0.95, seed: int = 0
            ) -> tuple[float, float]:
    """Paired percentile-bootstrap interval of mAP@0.5(fp32) − mAP@0.5(int8) over the same images."""
    ref, got = per_image(ev_ref), per_image(ev_got)
    n = len(ev_ref.params.imgIds)
    rng = np.random.default_rng(seed)
    drops = []
    for _ in range(reps):
        draw = rng.integers(0, n, n)
        drops.append(map50(ref, draw) - map50(got, draw))
    lo, hi = np.quantile(drops, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
