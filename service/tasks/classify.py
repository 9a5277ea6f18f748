"""Classification: an image → the k most probable labels.

``POST /v1/models/{m}/classify?top_k=5`` answers ``{"model", "version", "predictions": [{"index", "label",
"score"}]}`` (scores are probabilities, descending). The Open Inference Protocol returns the logits, or —
with Triton's ``classification`` extension (``"parameters": {"classification": k}`` on an output) — the top k
as ``"score:index:label"`` strings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from ..errors import BadTensor, InvalidParameter
from .base import Section, Task

if TYPE_CHECKING:
    from ..imaging import Geometry
    from ..registry import LoadedModel
    from ..settings import Settings


class ClassifyPostprocess(Section):
    """Classification: one output of shape [N, C]."""

    kind: Literal["classify"] = "classify"
    output: str
    activation: Literal["softmax", "sigmoid", "none"] = Field(
        default="softmax", description="what turns the output into probabilities (none: already probabilities)"
    )


class ClassifyParams(BaseModel):
    top_k: int = Field(5, description="how many classes to return")


class Prediction(BaseModel):
    index: int
    label: str
    score: float = Field(description="a probability")


class ClassifyResponse(BaseModel):
    model: str
    version: str
    predictions: list[Prediction] = Field(description="scores descending")


class ClassifyTask(Task):
    name = "classify"
    section = ClassifyPostprocess
    route = "classify"
    summary = "Classify one image (raw body or multipart field 'image')"
    params = ClassifyParams
    response = ClassifyResponse
    guard_metric = "top1"  # int8 vs fp32: top-1 agreement, or accuracy on labelled images
    evaluator = "visionserve.quantize.evaluate:evaluate_classifier"
    loadtest_kinds = ("classify",)

    def check(self, params: ClassifyParams, settings: Settings) -> None:
        if not 1 <= params.top_k <= settings.max_top_k:
            raise InvalidParameter(f"top_k must be between 1 and {settings.max_top_k}, got {params.top_k}")

    def answer(self, model: LoadedModel, outputs: dict[str, np.ndarray], geometry: Geometry,
               params: ClassifyParams) -> dict[str, Any]:
        from ..postprocess import top_k

        post: ClassifyPostprocess = model.manifest.postprocess  # type: ignore[assignment]
        return {"model": model.name, "version": model.version,
                "predictions": top_k(model.manifest, outputs[post.output], params.top_k)}

    def oip_output(self, model: LoadedModel, name: str, array: np.ndarray, parameters: dict[str, Any]
                   ) -> np.ndarray:
        k = parameters.get("classification", 0)
        if not k:
            return array
        if not isinstance(k, int) or k < 1:
            raise BadTensor("'classification' must be a positive integer on a classifier's output")
        return classification_strings(model, array, k)


def classification_strings(model: LoadedModel, output: np.ndarray, k: int) -> np.ndarray:
    """Triton's classification extension: ``"score:index:label"`` strings, [N, k]."""
    from ..postprocess import top_k

    rows = [[f"{p['score']:f}:{p['index']}:{p['label']}" for p in top_k(model.manifest, row, k)]
            for row in output]
    return np.array(rows, dtype=object)


TASK = ClassifyTask()
