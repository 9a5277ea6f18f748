"""Detection: an image → boxes in the original image's pixels, with labels and scores.

``POST /v1/models/{m}/detect?score_threshold=0.25&iou_threshold=0.45&max_detections=100`` answers
``{"model", "version", "image": {"width", "height"}, "detections": [{"index", "label", "score", "box"}]}``;
``annotate=true`` answers the image with the boxes drawn (PNG) instead. The Open Inference Protocol returns the
output tensors. Decoding per output format and class-aware NMS: ``service.detection``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from ..errors import InvalidParameter
from .base import Section, Task

if TYPE_CHECKING:
    from ..imaging import Geometry
    from ..registry import LoadedModel
    from ..settings import Settings

MAX_DETECTIONS = 10_000


class DetectPostprocess(Section):
    """Detection: how the outputs are decoded into boxes in input-tensor pixels.

    ``format`` names the output layout:
    - ``visionserve``: ``boxes`` [N, A, 4] (x1, y1, x2, y2 in input pixels) and ``scores`` [N, A, C];
    - ``yolo``: one output [N, 4 + C (+1 objectness for v5)], A] or [N, A, 4 + C (+1)], cx, cy, w, h;
    - ``torchvision``: post-processed ``boxes`` [K, 4], ``labels`` [K], ``scores`` [K] for one image.
    """

    kind: Literal["detect"] = "detect"
    format: Literal["visionserve", "yolo", "torchvision"] = "visionserve"
    outputs: list[str]
    nms: Literal["server", "in_graph", "none"] = "server"
    objectness: bool = False
    label_offset: int = Field(default=0, description="added to a decoded class index before the label lookup")
    score_activation: Literal["none", "sigmoid", "softmax"] = Field(
        default="none", description="what turns the score outputs into probabilities (none: already are)"
    )

    def reads(self) -> list[str]:
        return list(self.outputs)

    @property
    def batched(self) -> bool:
        return self.format != "torchvision"  # torchvision's post-processed detectors answer for one image


class DetectParams(BaseModel):
    score_threshold: float = Field(0.25, description="keep boxes scoring above this, in [0, 1]")
    iou_threshold: float = Field(0.45, description="NMS: drop a box overlapping a better one more than this")
    max_detections: int = Field(100, description=f"at most this many boxes, 1 to {MAX_DETECTIONS}")
    annotate: bool = Field(False, description="return the image with boxes drawn (PNG)")


class Detection(BaseModel):
    index: int
    label: str
    score: float
    box: list[float] = Field(description="x1, y1, x2, y2 in the original image's pixels")


class ImageSize(BaseModel):
    width: int
    height: int


class DetectResponse(BaseModel):
    model: str
    version: str
    image: ImageSize
    detections: list[Detection] = Field(description="best first")


class DetectTask(Task):
    name = "detect"
    section = DetectPostprocess
    route = "detect"
    summary = "Detect objects in one image; boxes in the original image's pixels"
    params = DetectParams
    response = DetectResponse
    guard_metric = "map50"  # int8 vs fp32: COCO mAP@0.5 on the guard's annotated images
    evaluator = "visionserve.quantize.evaluate:evaluate_detector"
    loadtest_kinds = ("detect",)

    def check(self, params: DetectParams, settings: Settings) -> None:
        if not 0.0 <= params.score_threshold <= 1.0:
            raise InvalidParameter(f"score_threshold must be in [0, 1], got {params.score_threshold}")
        if not 0.0 <= params.iou_threshold <= 1.0:
            raise InvalidParameter(f"iou_threshold must be in [0, 1], got {params.iou_threshold}")
        if not 1 <= params.max_detections <= MAX_DETECTIONS:
            raise InvalidParameter(f"max_detections must be between 1 and {MAX_DETECTIONS}, got "
                                   f"{params.max_detections}")

    def answer(self, model: LoadedModel, outputs: dict[str, np.ndarray], geometry: Geometry,
               params: DetectParams) -> dict[str, Any]:
        from ..detection import decode

        dets = decode(model.manifest, outputs, geometry, params.score_threshold, params.iou_threshold,
                      params.max_detections)
        return {"model": model.name, "version": model.version,
                "image": {"width": geometry.width, "height": geometry.height}, "detections": dets}

    def render_type(self, params: DetectParams) -> str | None:
        return "image/png" if params.annotate else None

    def render(self, image: bytes, answer: dict[str, Any], params: DetectParams) -> bytes:
        from ..detection import annotate

        return annotate(image, answer["detections"])


TASK = DetectTask()
