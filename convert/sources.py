"""Where a PyTorch model comes from: a torchvision architecture, a ``pkg.mod:factory``, or TorchScript."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from visionserve.service.manifest import sha256_file


class SourceError(Exception):
    """The model cannot be loaded; the message says why, for a person."""


@dataclass
class Source:
    model: nn.Module
    description: str
    weights: Path | None = None
    torchscript: bool = False

    @property
    def weights_sha256(self) -> str | None:
        return sha256_file(self.weights) if self.weights else None


def load_source(
    arch: str | None = None,
    module: str | None = None,
    torchscript: Path | None = None,
    weights: Path | None = None,
    num_classes: int | None = None,
) -> Source:
    """Exactly one of ``arch``, ``module`` or ``torchscript``."""
    given = [x for x in (arch, module, torchscript) if x]
    if len(given) != 1:
        raise SourceError("give exactly one of --arch, --module or --torchscript")
    if weights is not None and not Path(weights).is_file():
        raise SourceError(f"weights file not found: {weights}")
    if torchscript:
        if weights:
            raise SourceError("--weights does not apply to --torchscript (the file holds its weights)")
        return _torchscript(Path(torchscript))
    if arch:
        model = _torchvision(arch, num_classes)
        desc = f"torchvision:{arch}"
    else:
        model = _factory(str(module))
        desc = f"module:{module}"
    if weights:
        load_weights(model, Path(weights))
    return Source(model.eval(), desc, Path(weights) if weights else None)


def _torchvision(arch: str, num_classes: int | None) -> nn.Module:
    import torchvision

    names = set(torchvision.models.list_models())
    if arch not in names:
        close = sorted(n for n in names if arch.split("_")[0].lower() in n)[:8]
        hint = f"; did you mean one of {close}?" if close else ""
        raise SourceError(f"unknown torchvision architecture {arch!r}{hint}")
    kwargs = {"num_classes": num_classes} if num_classes else {}
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def _factory(spec: str) -> nn.Module:
    if ":" not in spec:
        raise SourceError(f"--module must look like 'package.module:factory', got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # let users name modules in the current directory
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise SourceError(f"cannot import module {mod_name!r}: {e}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SourceError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(model, nn.Module):
        raise SourceError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchscript(path: Path) -> Source:
    if not path.is_file():
        raise SourceError(f"TorchScript file not found: {path}")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as e:
        raise SourceError(f"{path} is not a TorchScript file: {str(e).splitlines()[0]}") from None
    return Source(model.eval(), f"torchscript:{path.name}", path, torchscript=True)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state_dict or a checkpoint holding one; refuse anything that does not match exactly."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise SourceError(f"cannot read weights {path}: {str(e).splitlines()[0]}") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SourceError(f"{path} does not hold a state_dict (a dict of tensors)")
    state = {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel checkpoints
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with the wrong shape (e.g. {k}: file {tuple(state[k].shape)} vs model "
                f"{tuple(own[k].shape)})"
            )
        raise SourceError(f"weights {path} do not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
