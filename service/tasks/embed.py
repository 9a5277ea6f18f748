"""Embeddings: an image → one L2-normalised vector, so that a dot product is a cosine similarity.

Models come from ``visionserve convert --task embed`` (the network up to ``--embed-layer``, pooled and
normalised inside the ONNX graph). ``POST /v1/models/{m}/embed`` answers ``{"model", "version", "dim",
"embedding"}``; the Open Inference Protocol returns the same vector as the model's output tensor. One-shot
galleries (``service.galleries``) are built on this task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from .base import Section, Task

if TYPE_CHECKING:
    from ..imaging import Geometry
    from ..registry import LoadedModel


class EmbedPostprocess(Section):
    """Embedding: one output of shape [N, D] (or [N, D, 1, 1]) per image."""

    kind: Literal["embed"] = "embed"
    output: str
    normalized: bool = Field(default=True, description="the graph L2-normalises its output (else the server does)")


class EmbedResponse(BaseModel):
    model: str
    version: str
    dim: int
    embedding: list[float] = Field(description="L2-normalised: a dot product of two embeddings is their cosine")


def l2_normalise(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    x = x.astype(np.float32, copy=False)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def embedding_of(model: LoadedModel, outputs: dict[str, np.ndarray]) -> np.ndarray:
    """One image's embedding, unit length, float32."""
    post = model.manifest.postprocess
    assert isinstance(post, EmbedPostprocess)
    vec = outputs[post.output].reshape(-1).astype(np.float32, copy=False)
    return vec if post.normalized else l2_normalise(vec)


class EmbedTask(Task):
    name = "embed"
    section = EmbedPostprocess
    route = "embed"
    summary = "Embed one image: an L2-normalised vector (raw body or multipart field 'image')"
    response = EmbedResponse
    guard_metric = "cosine"  # int8 vs fp32: cosine similarity of the embeddings, and one-shot accuracy
    evaluator = "visionserve.quantize.evaluate_embed:evaluate_embedding"
    loadtest_kinds = ("embed", "identify")

    def answer(self, model: LoadedModel, outputs: dict[str, np.ndarray], geometry: Geometry,
               params: Any) -> dict[str, Any]:
        vec = embedding_of(model, outputs)
        return {"model": model.name, "version": model.version, "dim": int(vec.shape[0]),
                "embedding": vec.tolist()}

    def oip_output(self, model: LoadedModel, name: str, array: np.ndarray, parameters: dict[str, Any]
                   ) -> np.ndarray:
        array = super().oip_output(model, name, array, parameters)
        post = model.manifest.postprocess
        assert isinstance(post, EmbedPostprocess)
        if name == post.output and not post.normalized:  # the contract: the vector is unit length
            return l2_normalise(array.reshape(array.shape[0], -1))
        return array

    def routers(self) -> list[Any]:
        from ..http.galleries import router

        return [router]


TASK = EmbedTask()
