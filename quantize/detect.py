"""int8 for detectors: which nodes stay in float, and the guard on COCO mAP@0.5.

Measured on ``shapes_detector`` (benchmarks/detect.py, docs/detection.md):

- activations must be ``uint8`` (``QUInt8``): with ONNX Runtime's int8 activations the depthwise
  convolutions are not fused and int8 runs slower than fp32;
- the convolution that regresses the boxes and the decoding after it stay fp32 (boxes are pixel
  coordinates: 8 bits over 0-256 px cost ~3 points of mAP@[.5:.95]);
- the first convolution stays fp32 when it has ≤ 4 input channels (int8 is slower there).

Used by ``visionserve quantize`` (quantize/pipeline.py) and by the benchmark.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionserve.service.repository import ModelEntry


def tail_nodes(model: Any) -> list[str]:
    """Names of nodes with no Conv downstream: detection heads and box decoding."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    memo: dict[Any, bool] = {}

    def feeds_conv(node: Any) -> bool:
        key = node.name or id(node)
        if key not in memo:
            memo[key] = False
            memo[key] = any(c.op_type == "Conv" or feeds_conv(c) for o in node.output for c in consumers.get(o, []))
        return memo[key]

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    return [n.name for n in model.graph.node if not feeds_conv(n)]


def float_nodes(model: Any, box_output: str = "boxes") -> list[str]:
    """Nodes an int8 detector keeps in fp32 (``model``: an ``onnx.ModelProto``, after quant_pre_process):

    - the tail after the last convolutions (decoding: Exp, Sigmoid, box arithmetic), and the convolution
      that regresses the boxes (everything on the path to ``box_output`` with no Conv downstream);
    - the first convolution when it has ≤ 4 input channels.
    The class/centerness convolution is quantised: it is where int8 gains most, and mAP does not move.
    """
    from onnx import numpy_helper

    tail = set(tail_nodes(model))
    producer = {o: n for n in model.graph.node for o in n.output}
    box_side: set[str] = set()
    stack = [box_output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in box_side or node.name not in tail:
            continue
        box_side.add(node.name)
        stack.extend(node.input)
    keep = [n.name for n in model.graph.node if n.name in tail and (n.op_type != "Conv" or n.name in box_side)]
    inits = {i.name: i for i in model.graph.initializer}
    first = next((n for n in model.graph.node if n.op_type == "Conv"), None)
    if (first is not None and first.input[1] in inits
            and numpy_helper.to_array(inits[first.input[1]]).shape[1] <= 4):
        keep.append(first.name)
    return keep


def detector_float_nodes(pre_model: Path, entry: ModelEntry) -> list[str]:
    """``float_nodes`` of a pre-processed repository detector (its boxes output from the manifest)."""
    import onnx

    model = onnx.load(str(pre_model), load_external_data=False)
    names = list(getattr(entry.manifest.postprocess, "outputs", []) or [])
    outputs = [o.name for o in model.graph.output]
    # visionserve layout: the "boxes" output; yolo: the single output (boxes and scores together)
    box = next((n for n in names if "box" in n.lower()), None) or next(
        (o for o in outputs if "box" in o.lower()), outputs[0])
    return float_nodes(model, box)


@dataclass(frozen=True)
class DetectFidelity:
    """int8 against fp32 on a COCO set: the guard bounds the (absolute) mAP@0.5 drop."""

    images: int
    fp32_map50: float
    int8_map50: float
    fp32_map: float  # mAP@[.5:.95]
    int8_map: float
    drop_ci: tuple[float, float] | None = None  # 95 % paired bootstrap over images (held-out report)

    @property
    def drop(self) -> float:
        return self.fp32_map50 - self.int8_map50

    @property
    def drop_kind(self) -> str:
        return "mAP@0.5 drop"

    def as_dict(self) -> dict[str, object]:
        return {"images": self.images, "fp32_mAP@0.5": self.fp32_map50, "int8_mAP@0.5": self.int8_map50,
                "fp32_mAP@[.5:.95]": self.fp32_map, "int8_mAP@[.5:.95]": self.int8_map,
                "drop": round(self.drop, 5), "drop_kind": self.drop_kind,
                **({"drop_ci95": [round(v, 5) for v in self.drop_ci]} if self.drop_ci else {})}

    def summary(self) -> str:
        ci = (f" (drop {100 * self.drop:.2f} pt, 95 % CI {100 * self.drop_ci[0]:.2f}–{100 * self.drop_ci[1]:.2f} pt)"
              if self.drop_ci else "")
        return (f"mAP@0.5 fp32 {self.fp32_map50:.3f} → int8 {self.int8_map50:.3f}{ci}, mAP@[.5:.95] "
                f"{self.fp32_map:.3f} → {self.int8_map:.3f} over {self.images} images")


def detect_fidelity(ref: dict[str, Any], got: dict[str, Any],
                    drop_ci: tuple[float, float] | None = None) -> DetectFidelity:
    """From two ``evaluate_detection`` results (fp32, int8)."""
    return DetectFidelity(int(got["images"]), float(ref["mAP@0.5"]), float(got["mAP@0.5"]),
                          float(ref["mAP@[.5:.95]"]), float(got["mAP@[.5:.95]"]), drop_ci)


def check_quantizable(entry: ModelEntry) -> None:
    """Raise QuantizeError for detectors this pipeline leaves alone."""
    from .int8 import QuantizeError

    pp = entry.manifest.postprocess
    if getattr(pp, "format", None) == "torchvision":
        raise QuantizeError(
            f"{entry.manifest.name} is a torchvision-format detector (post-processing and NMS inside the "
            "graph, one image per run); quantize leaves it in fp32 — static int8 of its data-dependent "
            "graph is not supported. Serve the fp32 entry, or export a visionserve/yolo-layout detector.")
