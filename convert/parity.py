"""Prove an export faithful: ONNX Runtime against PyTorch on the same inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from visionserve.service.manifest import Parity

from .ort_cpu import cpu_session


class ParityError(Exception):
    """ONNX Runtime and PyTorch disagree beyond tolerance."""


@dataclass
class ParityCheck:
    atol: float = 1e-3
    rtol: float = 1e-3
    classify: bool = True
    batches: list[tuple[str, np.ndarray]] = field(default_factory=list)


def _outputs(out: object) -> list[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().numpy()]
    if isinstance(out, dict):
        out = list(out.values())
    return [o.detach().numpy() for o in out]  # type: ignore[union-attr]


def compare(model: nn.Module, onnx_path: str, check: ParityCheck) -> Parity:
    """Run every batch through both; raise ParityError naming the worst output if over tolerance."""
    sess = cpu_session(onnx_path)
    input_name = sess.get_inputs()[0].name
    worst_abs = worst_rel = 0.0
    agree = total = samples = real = 0
    failures = []
    for label, batch in check.batches:
        with torch.no_grad():
            ref = _outputs(model(torch.from_numpy(batch)))
        got = sess.run(None, {input_name: batch})
        if len(ref) != len(got):
            raise ParityError(f"{label}: PyTorch gave {len(ref)} outputs, ONNX Runtime {len(got)}")
        samples += batch.shape[0]
        real += batch.shape[0] if label.startswith("image") else 0
        for i, (r, g) in enumerate(zip(ref, got)):
            if r.shape != g.shape:
                raise ParityError(f"{label}: output {i} shape {g.shape} in ONNX vs {r.shape} in PyTorch")
            diff = np.abs(r.astype(np.float64) - g.astype(np.float64))
            abs_err = float(diff.max()) if diff.size else 0.0
            scale = float(np.abs(r).max()) if r.size else 0.0
            worst_abs = max(worst_abs, abs_err)
            worst_rel = max(worst_rel, abs_err / max(scale, 1e-12))
            bad = diff > check.atol + check.rtol * np.abs(r)
            if bad.any():
                failures.append(
                    f"{label} output {i}: {int(bad.sum())} of {bad.size} values off, max abs error "
                    f"{abs_err:.3g} (atol {check.atol}, rtol {check.rtol})"
                )
        if check.classify and ref[0].ndim == 2:
            r, g = ref[0], got[0]
            top_r = r.argmax(1)
            top_g = g.argmax(1)
            rows = np.arange(r.shape[0])
            # a tie (within atol in PyTorch's own logits) is not a disagreement
            same = (top_r == top_g) | (r[rows, top_r] - r[rows, top_g] <= check.atol)
            agree += int(same.sum())
            total += r.shape[0]
    top1 = agree / total if total else None
    if top1 is not None and top1 < 1.0:
        failures.append(f"top-1 agreement {top1:.1%} ({total - agree} of {total} differ)")
    if failures:
        raise ParityError("ONNX Runtime and PyTorch disagree: " + "; ".join(failures[:4]))
    return Parity(
        max_abs_error=worst_abs, max_rel_error=worst_rel, top1_agreement=top1,
        batch_sizes=sorted({b.shape[0] for _, b in check.batches}), samples=samples, real_images=real,
        atol=check.atol, rtol=check.rtol,
    )
