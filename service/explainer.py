"""One explanation, start to end: parameters, the target, masked forward passes at background priority, the map.

The masked images go through the model's own batcher as background work (``Batcher.submit(background=True)``):
they run only while no live request waits or runs, and a live arrival preempts them. The cost is bounded by
``max_masks`` and by a deadline (the request's ``X-Request-Timeout-Ms``, else ``explain_timeout_s``); progress
is in the metrics (``visionserve_explain_masks_total``, ``visionserve_explain_masks_pending``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import detection
from .dataplane import DataPlane, _outcome
from .errors import InvalidParameter, VisionServeError
from .explain import Masks, Occlusion, Region, Rise, apply, grid_shape, normalise, to_original
from .imaging import Geometry
from .manifest import DetectPostprocess
from .postprocess import probabilities
from .registry import LoadedModel

METHODS = ("occlusion", "rise")
DEFAULT_RISE_MASKS = 128  # with 121 occlusion patches: about a second for a 224-pixel MobileNetV2 on 2 cores
CANDIDATE_THRESHOLD = 0.01  # detector candidates scored against the box in masked images


@dataclass(frozen=True)
class ExplainRequest:
    method: str = "occlusion"
    target: int | None = None
    masks: int | None = None  # RISE: how many masks
    patch: int | None = None  # occlusion: patch side in input-tensor pixels
    stride: int | None = None
    seed: int = 0
    grid: int = 56  # cells along the saliency grid's longer side
    box: tuple[float, float, float, float] | None = None  # detectors: x1, y1, x2, y2 in original pixels


@dataclass
class Explanation:
    body: dict[str, Any]
    saliency: np.ndarray  # rows × cols in [0, 1]


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise InvalidParameter(f"box must be four comma-separated numbers x1,y1,x2,y2, got {text!r}") from None
    if len(values) != 4 or not all(np.isfinite(values)):
        raise InvalidParameter(f"box must be four finite numbers x1,y1,x2,y2, got {text!r}")
    x1, y1, x2, y2 = values
    if x2 <= x1 or y2 <= y1:
        raise InvalidParameter(f"box must have x2 > x1 and y2 > y1, got {text!r}")
    return x1, y1, x2, y2


def check(req: ExplainRequest, model: LoadedModel, max_masks: int) -> None:
    """Parameter errors that need no image (422)."""
    task = model.manifest.task
    if task not in ("classify", "detect"):
        raise InvalidParameter(f"model {model.name} is a {task} model; explanations need a classifier or detector")
    if req.method not in METHODS:
        raise InvalidParameter(f"method must be one of {', '.join(METHODS)}, got {req.method!r}")
    if req.box is not None and task != "detect":
        raise InvalidParameter("box is for detectors; a classifier explains the whole image")
    if req.target is not None and req.target < 0:
        raise InvalidParameter(f"target must be a class index >= 0, got {req.target}")
    if req.masks is not None and not 1 <= req.masks <= max_masks:
        raise InvalidParameter(f"masks must be between 1 and max_masks = {max_masks}, got {req.masks}")
    if (req.patch is not None and req.patch < 1) or (req.stride is not None and req.stride < 1):
        raise InvalidParameter("patch and stride must be at least 1 pixel")
    if not 0 <= req.seed < 2**63:
        raise InvalidParameter(f"seed must be between 0 and 2^63 - 1, got {req.seed}")
    if not 4 <= req.grid <= 256:
        raise InvalidParameter(f"grid must be between 4 and 256 cells, got {req.grid}")


async def explain(dp: DataPlane, model: LoadedModel, data: bytes, req: ExplainRequest, deadline: float | None,
                  ) -> Explanation:
    """Explain the model's score for ``req.target`` (default: its best class / detection) on one image."""
    settings, metrics = dp.settings, dp.metrics
    check(req, model, settings.max_masks)
    started = time.monotonic()
    own = started + settings.explain_timeout_s
    deadline = own if deadline is None else min(deadline, own)
    labels = (model.name, model.version)
    outcome = "error"
    try:
        result = await dp.within(deadline, _explain(dp, model, data, req, deadline))
        outcome = "success"
        return result
    except VisionServeError as e:
        outcome = _outcome(e)  # the labels visionserve_requests_total uses: deadline_exceeded, invalid_parameter…
        raise
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    finally:
        metrics.explanations.labels(*labels, req.method, outcome).inc()
        metrics.explain_duration.labels(*labels, req.method).observe(time.monotonic() - started)


async def _explain(dp: DataPlane, model: LoadedModel, data: bytes, req: ExplainRequest, deadline: float
                   ) -> Explanation:
    tensor, geometry = await dp.preprocess(model, data)
    layout = model.manifest.input.layout
    h, w = (tensor.shape[1], tensor.shape[2]) if layout == "NCHW" else (tensor.shape[0], tensor.shape[1])
    names = model.runners[0].output_names
    base_outputs = await model.batcher.submit(tensor, deadline, background=True)
    if model.manifest.task == "classify":
        target, score_of = _classifier_target(model, names, base_outputs, req)
    else:
        target, score_of = _detector_target(model, names, base_outputs, req, geometry)
    region = Region.of(geometry, w, h)
    masks: Masks
    if req.method == "occlusion":
        masks = Occlusion.with_default_patch(h, w, region, req.patch, req.stride)
    else:
        masks = Rise(h, w, region, req.masks or min(DEFAULT_RISE_MASKS, dp.settings.max_masks), req.seed)
    if masks.count > dp.settings.max_masks:
        raise InvalidParameter(f"{masks.count} occlusion patches exceed max_masks = {dp.settings.max_masks}: "
                               "use a larger patch or stride")
    scores = await _score_masks(dp, model, tensor, masks, score_of, deadline)
    base = score_of(base_outputs)  # a detector's similarity of the unmasked image to its own box
    rows, cols = grid_shape(geometry.width, geometry.height, req.grid)

    def finish() -> np.ndarray:  # off the event loop, at the lowest priority: it must not slow live requests
        return normalise(to_original(masks.saliency(scores, base), geometry, rows, cols))

    grid = await model.batcher.run_idle(finish)
    body: dict[str, Any] = {
        "model": model.name, "version": model.version, "target": target, "method": req.method,
        "image": {"width": geometry.width, "height": geometry.height},
        "masks": masks.count, "grid": {"rows": rows, "cols": cols},
    }
    if req.method == "rise":
        body["seed"] = req.seed
    if req.box is not None or model.manifest.task == "detect":
        body["box"] = target.pop("box")
    body["saliency"] = np.round(grid, 4).tolist()
    return Explanation(body, grid)


async def _score_masks(dp: DataPlane, model: LoadedModel, tensor: np.ndarray, masks: Masks,
                       score_of: Any, deadline: float) -> np.ndarray:
    """Every masked image through the batcher at background priority; the target's score on each."""
    layout = model.manifest.input.layout
    labels = (model.name, model.version)
    done = dp.metrics.explain_masks.labels(*labels)
    pending = dp.metrics.explain_pending.labels(*labels)
    scores = np.zeros(masks.count, dtype=np.float64)

    masked = _Masked(tensor, masks, layout)

    async def one(i: int) -> None:
        outputs, _ = await model.batcher.submit(i, deadline, prepare=masked, background=True)
        scores[i] = score_of(outputs)
        done.inc()
        pending.dec()

    pending.inc(masks.count)
    tasks = [asyncio.ensure_future(one(i)) for i in range(masks.count)]
    try:
        await asyncio.gather(*tasks)
    finally:
        left = sum(1 for t in tasks if not t.done() or t.cancelled() or t.exception() is not None)
        for t in tasks:
            t.cancel()
        pending.dec(left)
    return scores


class _Masked:
    """The prepare function of the masked images: on the background thread, just before its batch; ``into``
    writes the masked tensor straight into the batch buffer (no 600 KB array per mask)."""

    def __init__(self, tensor: np.ndarray, masks: Masks, layout: str) -> None:
        self.tensor, self.masks, self.layout = tensor, masks, layout
        self.shape, self.dtype = tensor.shape, tensor.dtype

    def __call__(self, i: int) -> tuple[np.ndarray, None]:
        return apply(self.tensor, self.masks(i), self.layout), None

    def into(self, i: int, out: np.ndarray) -> None:
        apply(self.tensor, self.masks(i), self.layout, out=out)


def _classifier_target(model: LoadedModel, names: list[str], outputs: list[np.ndarray], req: ExplainRequest
                       ) -> tuple[dict[str, Any], Any]:
    post = model.manifest.postprocess
    idx = names.index(post.output)  # type: ignore[union-attr]
    activation = post.activation  # type: ignore[union-attr]
    probs = probabilities(outputs[idx].reshape(-1), activation)
    target = int(np.argmax(probs)) if req.target is None else req.target
    if target >= probs.shape[0]:
        raise InvalidParameter(f"target must be a class index below {probs.shape[0]}, got {target}")

    def score_of(out: list[np.ndarray]) -> float:
        return float(probabilities(out[idx].reshape(-1), activation)[target])

    return {"index": target, "label": model.manifest.label(target), "score": float(probs[target])}, score_of


def _detector_target(model: LoadedModel, names: list[str], outputs: list[np.ndarray], req: ExplainRequest,
                     geometry: Geometry) -> tuple[dict[str, Any], Any]:
    """The detection to explain: the one that overlaps ``box`` most (of class ``target`` if given), else the
    best. A masked image's score is D-RISE's similarity: max over its detections of that class of IoU with the
    box × score."""
    m = model.manifest
    post = m.postprocess
    assert isinstance(post, DetectPostprocess)
    n_labels = len(m.labels) - post.label_offset if m.labels else 0
    dets = detection.decode(m, dict(zip(names, outputs)), geometry, score_threshold=CANDIDATE_THRESHOLD)
    if req.target is not None:
        if n_labels and not req.target - post.label_offset < n_labels:
            raise InvalidParameter(f"target must be a class index below {n_labels + post.label_offset}, "
                                   f"got {req.target}")
        dets = [d for d in dets if d["index"] == req.target]
    if req.box is not None:
        box = np.clip(np.asarray(req.box, dtype=np.float32), 0, [geometry.width, geometry.height] * 2)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise InvalidParameter(f"box {list(req.box)} lies outside the {geometry.width}x{geometry.height} image")
        overlaps = [(float(detection.box_iou(box[None], np.asarray([d["box"]], np.float32))[0, 0]), d)
                    for d in dets]
        best = max(overlaps, key=lambda o: (o[0], o[1]["score"]), default=(0.0, None))
        if best[1] is None or best[0] <= 0.0:
            raise InvalidParameter(f"no detection{'' if req.target is None else f' of class {req.target}'} "
                                   f"overlaps box {list(req.box)}")
        chosen = best[1]
    else:
        if not dets or float(dets[0]["score"]) < 0.25:  # type: ignore[arg-type]
            raise InvalidParameter("no detection to explain; pass box=x1,y1,x2,y2 (and target=CLASS)")
        chosen = dets[0]
        box = np.asarray(chosen["box"], dtype=np.float32)
    cls = int(chosen["index"]) - post.label_offset  # type: ignore[call-overload]
    # the box in input-tensor pixels, where the candidates are
    tbox = box.copy()
    tbox[0::2] = box[0::2] * geometry.scale_x + geometry.offset_x
    tbox[1::2] = box[1::2] * geometry.scale_y + geometry.offset_y

    def score_of(out: list[np.ndarray]) -> float:
        boxes, scores, classes = detection.candidates(post, dict(zip(names, out)), CANDIDATE_THRESHOLD, n_labels)
        same = classes == cls
        if not same.any():
            return 0.0
        iou = detection.box_iou(tbox[None], boxes[same].astype(np.float32))[0]
        return float(np.max(iou * scores[same]))

    target = {"index": int(chosen["index"]), "label": chosen["label"], "score": float(chosen["score"]),  # type: ignore[call-overload, arg-type]
              "box": [round(float(v), 2) for v in box]}
    return target, score_of
