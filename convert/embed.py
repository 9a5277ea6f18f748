"""Embedding models for ``visionserve convert --task embed``: a network cut at one layer, pooled and
L2-normalised inside the graph, so the ONNX model's output is the unit-length embedding itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .sources import SourceError


class Embedder(nn.Module):
    """``body``'s output, global-average-pooled (4-D feature maps) or flattened, then L2-normalised."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        if isinstance(f, dict):  # a torchvision feature extractor returns {name: tensor}
            f = next(iter(f.values()))
        if f.ndim == 4:
            f = f.mean(dim=(2, 3))
        elif f.ndim != 2:
            f = f.flatten(1)
        return F.normalize(f, p=2.0, dim=1, eps=1e-12)


def embedder(model: nn.Module, layer: str | None) -> Embedder:
    """``model`` up to ``layer`` (a module name, as in ``model.named_modules()``), pooled and normalised;
    without ``layer``, the whole network's output is the embedding."""
    if layer is None:
        return Embedder(model).eval()
    names = [n for n, _ in model.named_modules() if n]
    if layer not in names:
        tops = [n for n in names if "." not in n]
        raise SourceError(f"--embed-layer {layer!r} is not a module of the model; its top-level modules are "
                          f"{tops[:12]} (nested ones are named like 'features.18')")
    if isinstance(model, torch.jit.ScriptModule):
        raise SourceError("--embed-layer needs a Python module (--arch or --module), not TorchScript")
    from torchvision.models.feature_extraction import create_feature_extractor

    try:
        body = create_feature_extractor(model.eval(), return_nodes={layer: "embedding"})
    except Exception as e:  # torch.fx cannot trace every model; say which layer and why
        raise SourceError(f"cannot cut the model at {layer!r}: {str(e).splitlines()[0][:300]}") from None
    return Embedder(body).eval()
