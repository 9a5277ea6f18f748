"""Export a PyTorch model to ONNX with a dynamic batch axis."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
import torch
from torch import nn

log = logging.getLogger("visionserve.convert")

Exporter = Literal["auto", "dynamo", "legacy"]


class ExportError(Exception):
    """The model could not be exported; the message says why."""


@dataclass(frozen=True)
class Exported:
    exporter: str
    opset: int
    input_name: str
    output_names: list[str]


def output_count(model: nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad():
        out = model(example)
    if isinstance(out, torch.Tensor):
        return 1
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return len(out)
    if isinstance(out, dict):
        return len(out)
    raise ExportError(f"model returns {type(out).__name__}; expected a tensor or a tuple of tensors")


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    exporter: Exporter = "auto",
    opset: int = 18,
    input_name: str = "input",
    output_names: list[str] | None = None,
    torchscript: bool = False,
) -> Exported:
    """Export with batch as a dynamic axis; ``example`` must have batch ≥ 2 (dynamo specialises 1).

    ``auto`` tries the dynamo exporter (torch.export) and falls back to the TorchScript-based one, which is
    also the only one that takes TorchScript modules.
    """
    if example.shape[0] < 2:
        raise ExportError("the example batch must have at least 2 samples to keep the batch axis dynamic")
    n_out = output_count(model, example)
    names = output_names or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
    if len(names) != n_out:
        raise ExportError(f"model has {n_out} outputs but {len(names)} output names were given: {names}")
    order = ["legacy"] if torchscript or exporter == "legacy" else ["dynamo"] if exporter == "dynamo" else [
        "dynamo", "legacy"]
    errors = []
    for kind in order:
        try:
            if kind == "dynamo":
                _dynamo(model, example, path, opset, input_name, names)
            else:
                _legacy(model, example, path, min(opset, 17), input_name, names)
            used_opset = _check(path, input_name)
            log.info("exported with the %s exporter (opset %d)", kind, used_opset)
            return Exported(kind, used_opset, input_name, names)
        except Exception as e:  # exporters raise many types; report them all if nothing works
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            errors.append(f"{kind}: {first[:400]}")
            log.info("%s exporter failed: %s", kind, first[:200])
            for leftover in (path, path.with_name(path.name + ".data")):
                leftover.unlink(missing_ok=True)
    raise ExportError("ONNX export failed — " + " | ".join(errors))


def _dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int, input_name: str,
            names: list[str]) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=True, external_data=False, opset_version=opset,
            input_names=[input_name], output_names=names, dynamic_shapes=({0: batch},), verbose=False,
        )


def _legacy(model: nn.Module, example: torch.Tensor, path: Path, opset: int, input_name: str,
            names: list[str]) -> None:
    axes = {n: {0: "batch"} for n in [input_name, *names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=opset, input_names=[input_name],
            output_names=names, dynamic_axes=axes, do_constant_folding=True,
        )


def _check(path: Path, input_name: str) -> int:
    """Validate the exported graph and its dynamic batch axis; return its opset."""
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    inputs = {i.name: i for i in m.graph.input}
    if input_name not in inputs:
        raise ExportError(f"exported graph has no input {input_name!r}")
    dim0 = inputs[input_name].type.tensor_type.shape.dim[0]
    if dim0.HasField("dim_value"):
        raise ExportError(f"the batch axis was fixed to {dim0.dim_value} by the exporter")
    return next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
