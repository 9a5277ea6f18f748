"""Structural channel pruning with Torch-Pruning (DepGraph): fewer channels, really smaller convolutions.

The classifier head (every ``nn.Linear`` that produces the class logits) keeps its outputs; channel counts
are rounded to ``round_to`` (8: what int8 and SIMD kernels like). Optionally fine-tunes on an ImageFolder
with knowledge distillation from the unpruned model. The result is saved as a whole module
(``torch.save``; rebuild with ``torch.load(path, weights_only=False)``) and, if asked, as TorchScript, which
``visionserve convert --torchscript`` accepts.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visionserve.service.manifest import Preprocess

log = logging.getLogger("visionserve.quantize")


class PruneError(Exception):
    """Pruning could not be done; the message says why, for a person."""


@dataclass
class PruneOptions:
    output: Path | None = None
    arch: str | None = None
    module: str | None = None
    weights: Path | None = None
    num_classes: int | None = None
    target_macs: float | None = None  # keep this fraction of the MACs
    ratio: float | None = None  # or prune this fraction of each layer's channels
    input_size: int = 224
    round_to: int = 8
    finetune: Path | None = None
    epochs: int = 1
    lr: float = 1e-3
    batch: int = 32
    distill: bool = True
    preprocess: Preprocess = field(default_factory=Preprocess)
    torchscript: Path | None = None
    measure_speed: bool = True
    seed: int = 0


@dataclass
class PruneResult:
    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    speed: dict[str, dict[str, float]]
    finetune: dict[str, object]
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return {"macs_before": self.macs_before, "macs_after": self.macs_after,
                "macs_ratio": round(self.macs_after / self.macs_before, 4), "params_before": self.params_before,
                "params_after": self.params_after, "speed": self.speed, "finetune": self.finetune,
                "seconds": round(self.seconds, 1)}

    def summary(self) -> str:
        s = (f"MACs {self.macs_before / 1e6:.1f} M → {self.macs_after / 1e6:.1f} M "
             f"({self.macs_after / self.macs_before:.0%}), parameters {self.params_before / 1e6:.2f} M → "
             f"{self.params_after / 1e6:.2f} M")
        if self.speed:
            b = self.speed
            s += (f"\nONNX Runtime batch 1: {b['original']['b1_ms']:.2f} → {b['pruned']['b1_ms']:.2f} ms, "
                  f"batch 8: {b['original']['b8_ms']:.2f} → {b['pruned']['b8_ms']:.2f} ms "
                  f"(× {b['original']['b8_ms'] / b['pruned']['b8_ms']:.2f} throughput)")
        if self.finetune:
            s += f"\nfine-tuning: {self.finetune}"
        return s


def count(model: nn.Module, size: int) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, torch.randn(1, 3, size, size))
    return int(macs), int(params)


def head_layers(model: nn.Module, size: int) -> list[nn.Module]:
    """The layers that produce the logits: Linear (or 1×1 Conv) whose outputs are the model's classes."""
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, size, size))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise PruneError("prune handles classifiers that return one [N, classes] tensor")
    n = out.shape[1]
    heads = [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features == n)
             or (isinstance(m, nn.Conv2d) and m.out_channels == n and m.kernel_size == (1, 1))]
    return heads[-1:] if heads else []


def prune_model(model: nn.Module, size: int, *, ratio: float | None, target_macs: float | None,
                round_to: int = 8) -> nn.Module:
    """Prune ``model`` in place with DepGraph; either a per-layer ``ratio`` or a ``target_macs`` fraction."""
    import torch_pruning as tp

    if (ratio is None) == (target_macs is None):
        raise PruneError("give exactly one of --ratio or --target-macs")
    if ratio is not None and not 0 < ratio < 1:
        raise PruneError(f"--ratio must be between 0 and 1, got {ratio}")
    if target_macs is not None and not 0 < target_macs < 1:
        raise PruneError(f"--target-macs is the fraction of MACs to keep, between 0 and 1; got {target_macs}")
    example = torch.randn(1, 3, size, size)
    model.eval()
    base, _ = count(model, size)
    steps = 1 if ratio is not None else 40
    pruner = tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio if ratio is not None else 0.9, iterative_steps=steps,
        ignored_layers=head_layers(model, size), round_to=round_to,
    )
    for _ in range(steps):
        pruner.step()
        macs, _ = count(model, size)
        if target_macs is not None and macs <= target_macs * base:
            break
    return model


def finetune(student: nn.Module, teacher: nn.Module | None, folder: Path, pre: Preprocess, size: int,
             epochs: int, lr: float, batch: int, seed: int) -> dict[str, object]:
    """Fine-tune on an ImageFolder; with a teacher, half the loss is distillation (T = 4)."""
    from visionserve.service.imaging import Preprocessor
    from visionserve.service.manifest import InputSpec

    from .data import DatasetError, load_tensors, scan_folder

    images = scan_folder(folder, what="fine-tuning folder")
    if not images.labelled or images.targets is None:
        raise DatasetError(f"{folder} is not an ImageFolder (one sub-folder per class)")
    prep = Preprocessor(InputSpec(name="input", shape=[-1, 3, size, size]), pre, draft=False)
    x = torch.from_numpy(load_tensors(images, prep))
    y = torch.as_tensor(images.targets)
    with torch.no_grad():
        n_out = student.eval()(x[:1]).shape[1]
    if int(y.max()) >= n_out:
        raise DatasetError(f"{folder} has {len(images.classes or [])} classes but the model has {n_out} outputs")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    ce, temp = nn.CrossEntropyLoss(), 4.0
    losses = []
    for _ in range(epochs):
        student.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            out = student(x[idx])
            loss = ce(out, y[idx])
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x[idx])
                kd = nn.functional.kl_div(nn.functional.log_softmax(out / temp, 1),
                                          nn.functional.softmax(t / temp, 1), reduction="batchmean")
                loss = 0.5 * loss + 0.5 * kd * temp * temp
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
        losses.append(round(total / len(x), 4))
    student.eval()
    with torch.no_grad():
        acc = float((torch.cat([student(x[i:i + 256]) for i in range(0, len(x), 256)]).argmax(1) == y)
                    .float().mean())
    return {"images": len(x), "epochs": epochs, "distill": teacher is not None, "loss": losses,
            "train_top1": round(acc, 4)}


def onnx_speed(models: dict[str, nn.Module], size: int, threads: int = 2) -> dict[str, dict[str, float]]:
    """Export each model (legacy exporter: quick) and time it in ONNX Runtime at batch 1 and 8."""
    from visionserve.convert.export import export_onnx

    from .measure import compare_speed

    with tempfile.TemporaryDirectory(prefix="vs-prune-") as tmp:
        paths = {}
        for k, m in models.items():
            p = Path(tmp) / f"{k}.onnx"
            export_onnx(m.eval(), torch.randn(2, 3, size, size), p, exporter="legacy")
            paths[k] = p
        sample = np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
        res = compare_speed(paths, sample, batches=(1, 8), repeats=10, rounds=3, threads=threads)
    return {k: {"b1_ms": v[1].median_ms, "b8_ms": v[8].median_ms, "b8_ips": round(v[8].throughput, 1)}
            for k, v in res.items()}


def run_prune(opts: PruneOptions, model: nn.Module | None = None) -> PruneResult:
    """Load (unless ``model`` is given), prune, fine-tune, measure, save."""
    started = time.perf_counter()
    if model is None:
        from visionserve.convert.sources import SourceError, load_source

        try:
            model = load_source(arch=opts.arch, module=opts.module, weights=opts.weights,
                                num_classes=opts.num_classes).model
        except SourceError as e:
            raise PruneError(str(e)) from None
    torch.manual_seed(opts.seed)
    original = copy.deepcopy(model).eval()
    macs0, params0 = count(original, opts.input_size)
    pruned = prune_model(model, opts.input_size, ratio=opts.ratio, target_macs=opts.target_macs,
                         round_to=opts.round_to)
    macs1, params1 = count(pruned, opts.input_size)
    log.info("pruned: MACs %.1f M → %.1f M", macs0 / 1e6, macs1 / 1e6)
    ft: dict[str, object] = {}
    if opts.finetune is not None:
        ft = finetune(pruned, original if opts.distill else None, opts.finetune, opts.preprocess,
                      opts.input_size, opts.epochs, opts.lr, opts.batch, opts.seed)
    pruned.eval()
    speed = onnx_speed({"original": original, "pruned": pruned}, opts.input_size) if opts.measure_speed else {}
    if opts.output is not None:
        opts.output.parent.mkdir(parents=True, exist_ok=True)
        torch.save(pruned, opts.output)
    if opts.torchscript is not None:
        opts.torchscript.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            torch.jit.trace(pruned, torch.randn(1, 3, opts.input_size, opts.input_size)).save(str(opts.torchscript))
    return PruneResult(pruned, macs0, macs1, params0, params1, speed, ft, time.perf_counter() - started)
