"""Calibration without images: inputs distilled from the model's own BatchNorm statistics (ZeroQ).

ZeroQ (Cai et al., CVPR 2020): start from Gaussian noise in the model's input space and optimise it until
the mean and standard deviation of every BatchNorm layer's input, over the batch and the pixels, match the
running statistics that layer stored during training; the input itself is pulled to mean 0, std 1 (the
normalised input space). The result looks nothing like a photo but drives every layer through the ranges
real data did in training — which is all that calibrating activation ranges needs.

It needs the PyTorch model (the ONNX graph has BatchNorm folded into the convolutions), so the command
takes ``--weights`` (and the architecture from the source entry's provenance, or ``--arch``/``--module``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

log = logging.getLogger("visionserve.quantize")


def distill(model, count: int = 32, size: tuple[int, int] = (224, 224), iterations: int = 60, batch: int = 32,
            lr: float = 0.25, tile: int = 2, seed: int = 0, progress: Callable[[int], None] | None = None
            ) -> np.ndarray:
    """``count`` inputs (N, 3, H, W, float32, normalised space) whose BatchNorm statistics match ``model``'s.

    ``tile``: optimise at 1/tile of the size and repeat the result tile × tile times. A convolutional
    network's per-channel statistics are averages over positions, so a tiled image drives it through
    nearly the same ranges, at 1/tile² of the cost (on 2 CPU cores a full-size MobileNetV2 step of 32
    images takes several seconds).
    """
    import torch
    from torch import nn

    model = model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        from .int8 import QuantizeError

        raise QuantizeError("synthetic calibration needs BatchNorm layers (their running statistics are the "
                            "data it matches); this model has none: calibrate on images instead")
    for p in model.parameters():
        p.requires_grad_(False)
    seen: list[torch.Tensor] = []
    hooks = [bn.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0])) for bn in bns]
    gen = torch.Generator().manual_seed(seed)
    out = []
    started = time.perf_counter()
    try:
        for start in range(0, count, batch):
            n = min(batch, count - start)
            small = (size[0] // tile, size[1] // tile)
            x = torch.randn(n, 3, *small, generator=gen).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
            for it in range(iterations):
                seen.clear()
                opt.zero_grad()
                model(x)
                loss = (x.mean((0, 2, 3))).norm() + (x.std((0, 2, 3)) - 1).norm()
                for bn, a in zip(bns, seen):
                    loss = loss + (a.mean((0, 2, 3)) - bn.running_mean).norm() + (
                        (a.var((0, 2, 3), unbiased=False) + bn.eps).sqrt() - (bn.running_var + bn.eps).sqrt()
                    ).norm()
                loss.backward()
                opt.step()
                if it % 20 == 0:
                    log.debug("step %d: BN-statistics loss %.3f", it, float(loss.detach()))
                sched.step()
            full = np.tile(x.detach().numpy().astype(np.float32), (1, 1, tile + 1, tile + 1))
            out.append(np.ascontiguousarray(full[:, :, :size[0], :size[1]]))
            log.info("distilled %d/%d inputs (BN-statistics loss %.3f, %.0f s)", start + n, count, float(loss.detach()),
                     time.perf_counter() - started)
            if progress:
                progress(n)
    finally:
        for h in hooks:
            h.remove()
    return np.concatenate(out)


def synthetic_for(entry, weights, arch: str | None, module: str | None, count: int = 32) -> np.ndarray:
    """Distilled calibration inputs for a repository entry, from its PyTorch weights.

    The architecture comes from ``--arch``/``--module``, else from the entry's ``provenance.source``
    (``torchvision:ARCH`` or ``module:FACTORY``); when the manifest records the weights' SHA-256, the file
    must match it (synthetic data from other weights would calibrate another model).
    """
    from visionserve.convert.sources import load_source
    from visionserve.service.manifest import sha256_file

    from .int8 import QuantizeError

    if weights is None:
        raise QuantizeError("--calibration synthetic needs --weights (the PyTorch state_dict of the model): "
                            "the ONNX graph no longer holds the BatchNorm statistics it distils from")
    prov = entry.manifest.provenance
    if arch is None and module is None:
        kind, _, what = prov.source.partition(":")
        if kind == "torchvision":
            arch = what
        elif kind == "module":
            module = what
        else:
            raise QuantizeError(f"cannot tell the architecture of {entry.manifest.name} from its provenance "
                                f"({prov.source!r}); give --arch or --module")
    if prov.weights_sha256 and sha256_file(weights) != prov.weights_sha256:
        raise QuantizeError(f"{weights} are not the weights {entry.manifest.name} was converted from "
                            f"(SHA-256 differs from the manifest's)")
    shape = entry.manifest.input.shape
    size = (int(shape[2]), int(shape[3])) if entry.manifest.input.layout == "NCHW" else (int(shape[1]),
                                                                                          int(shape[2]))
    source = load_source(arch=arch, module=module, weights=weights)
    log.info("distilling %d calibration inputs from the BatchNorm statistics of %s", count, source.description)
    return distill(source.model, count=count, size=size)
