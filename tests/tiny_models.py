"""Small nn.Modules for the converter's tests (imported as ``tests.tiny_models:factory``)."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


class Divergent(TinyNet):
    """Behaves differently while being exported: the converter's parity check must catch it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if torch.onnx.is_in_onnx_export():
            out = out + 0.5
        return out


def divergent() -> nn.Module:
    torch.manual_seed(0)
    return Divergent()


def not_a_module() -> object:
    return {"weights": 1}
