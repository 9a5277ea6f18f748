"""The accuracy guard: int8 against fp32 on held-out images, and what to keep in float when it falls short.

The drop the guard bounds (``--max-drop``, a fraction):
- on an ImageFolder (labels known): fp32 top-1 accuracy minus int8 top-1 accuracy;
- on unlabelled images: the share of *confident* images (fp32 probability ≥ 0.5) whose int8 top-1 differs
  from the fp32 one — confident images are where a changed answer is a real error, not a coin flip between
  two near-equal classes. With fewer than ``MIN_CONFIDENT`` of them, all images count.

Sensitive nodes are ranked by how much quantization error each one *adds*: the signal-to-quantization-noise
ratio (SQNR, dB) of its output against the fp32 model, minus that of its input (ONNX Runtime's
``qdq_loss_debug`` gives both). Ranking by the output SQNR alone blames every node downstream of the real
culprit; the difference isolates it (docs/optimize.md has the comparison).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from visionserve.service.postprocess import probabilities

log = logging.getLogger("visionserve.quantize")

CONFIDENT = 0.5
MIN_CONFIDENT = 20


GUARD_METRICS = ("top1", "map50", "cosine")  # what this guard can compare fp32 with int8 on


def guard_metric(task: str) -> str | None:
    """What a task's int8 guard compares: the task's declared ``guard_metric`` (service.tasks; classify top-1,
    detect mAP@0.5, embed cosine); None for a task that is not registered."""
    from visionserve.service.tasks import get

    plugin = get(task)
    return None if plugin is None else plugin.guard_metric


def activation_of(manifest: object) -> str:
    """The classifier's ``postprocess.activation`` (softmax for anything without one)."""
    return str(getattr(getattr(manifest, "postprocess", None), "activation", "softmax"))


def confidence(ref: np.ndarray, activation: str = "softmax") -> np.ndarray:
    """The fp32 model's probability of its top class per image, through the manifest's ``activation``
    (service.postprocess.probabilities, the function the server answers with; float64 here)."""
    return probabilities(ref, activation, np.float64).max(1)


@dataclass(frozen=True)
class Fidelity:
    """How the int8 model's answers compare with the fp32 model's (and with labels, when known)."""

    images: int
    top1_agreement: float
    top5_agreement: float  # fp32 top-1 is among the int8 top-5
    confident_images: int
    top1_agreement_confident: float | None
    fp32_top1: float | None = None
    int8_top1: float | None = None
    fp32_top5: float | None = None
    int8_top5: float | None = None

    @property
    def drop(self) -> float:
        if self.fp32_top1 is not None and self.int8_top1 is not None:
            return self.fp32_top1 - self.int8_top1
        if self.top1_agreement_confident is not None and self.confident_images >= MIN_CONFIDENT:
            return 1.0 - self.top1_agreement_confident
        return 1.0 - self.top1_agreement

    @property
    def drop_kind(self) -> str:
        if self.fp32_top1 is not None:
            return "top-1 accuracy drop"
        if self.top1_agreement_confident is not None and self.confident_images >= MIN_CONFIDENT:
            return f"top-1 disagreement on confident images (fp32 p ≥ {CONFIDENT})"
        return "top-1 disagreement"

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "drop": round(self.drop, 5), "drop_kind": self.drop_kind}

    def summary(self) -> str:
        s = f"top-1 agreement {self.top1_agreement:.1%} over {self.images} images"
        if self.top1_agreement_confident is not None:
            s += f", {self.top1_agreement_confident:.1%} over the {self.confident_images} confident ones"
        s += f", top-5 {self.top5_agreement:.1%}"
        if self.fp32_top1 is not None:
            s += f"; accuracy fp32 {self.fp32_top1:.1%} → int8 {self.int8_top1:.1%}"
        return s


def topk_hits(logits: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return (top == targets[:, None]).any(1)


def fidelity(ref: np.ndarray, got: np.ndarray, targets: np.ndarray | None = None,
             activation: str = "softmax") -> Fidelity:
    """Compare int8 logits ``got`` with fp32 logits ``ref``; ``targets`` are model class indices;
    ``activation`` is the manifest's (what makes a probability of the outputs, for "confident")."""
    r1, g1 = ref.argmax(1), got.argmax(1)
    same = r1 == g1
    conf = confidence(ref, activation) >= CONFIDENT
    kw: dict[str, float] = {}
    if targets is not None:
        kw = {"fp32_top1": float(np.mean(r1 == targets)), "int8_top1": float(np.mean(g1 == targets)),
              "fp32_top5": float(topk_hits(ref, targets, 5).mean()),
              "int8_top5": float(topk_hits(got, targets, 5).mean())}
    return Fidelity(
        images=len(ref), top1_agreement=float(same.mean()),
        top5_agreement=float(topk_hits(got, r1, 5).mean()), confident_images=int(conf.sum()),
        top1_agreement_confident=float(same[conf].mean()) if conf.any() else None, **kw,
    )


# -- sensitivity ---------------------------------------------------------------------------------------
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


def candidate_nodes(model_path: Path) -> list[str]:
    """Nodes the guard may keep in float: the ones with weights (where nearly all of the time goes)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    return [n.name for n in m.graph.node if n.op_type in QUANTIZED_OPS]


def rank_sensitive(fp32_model: Path, qdq_model: Path, tensors: np.ndarray, input_name: str,
                   how: str = "added") -> list[tuple[str, float]]:
    """Weighted nodes of ``fp32_model``, most harmful to quantize first, with their score (dB).

    ``how``: ``added`` — SQNR of the node's input minus that of its output, both against fp32 (the
    error the node itself adds); ``output`` — minus the output's SQNR (ONNX Runtime's example ranking).
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_activation_error,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    from .int8 import TensorReader

    graph = onnx.load(str(fp32_model), load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type in QUANTIZED_OPS]
    with tempfile.TemporaryDirectory(prefix="vs-sqnr-") as tmp:
        aug_f, aug_q = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        modify_model_output_intermediate_tensors(str(fp32_model), str(aug_f))
        modify_model_output_intermediate_tensors(str(qdq_model), str(aug_q))
        fa = collect_activations(str(aug_f), TensorReader(input_name, tensors))
        qa = collect_activations(str(aug_q), TensorReader(input_name, tensors))
    errors = compute_activation_error(create_activation_matching(qa, fa))
    sqnr = {k: v["xmodel_err"] for k, v in errors.items() if "xmodel_err" in v}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def quantized_output(name: str) -> str:
        # Conv → Relu/Clip is fused by the quantizer: the QDQ pair sits after the activation
        for _ in range(3):
            nxt = consumers.get(name, [])
            if name in sqnr or len(nxt) != 1 or nxt[0].op_type not in ("Relu", "Clip", "LeakyRelu"):
                break
            name = nxt[0].output[0]
        return name

    scored = []
    for n in nodes:
        out = sqnr.get(quantized_output(n.output[0]))
        if out is None:
            continue
        if how == "output":
            scored.append((n.name, -out))
        else:
            inp = sqnr.get(n.input[0], out)
            scored.append((n.name, inp - out))
    scored.sort(key=lambda t: -t[1])
    return scored
