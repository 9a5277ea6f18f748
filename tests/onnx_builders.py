"""Small ONNX classifiers built in milliseconds with onnx.helper (no torch), for tests that need a model
of a known speed: a stack of 3×3 convolutions whose cost grows with ``depth`` and ``size``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from visionserve.service.manifest import (
    ClassifyPostprocess,
    InputSpec,
    Manifest,
    Preprocess,
    Provenance,
    TensorSpec,
    sha256_file,
)
from visionserve.service.repository import write_version


def conv_stack(path: Path, *, size: int, width: int, depth: int) -> None:
    """``depth`` 3×3 ``width``→``width`` convolutions at ``size``², then global pooling: [N, width] logits."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.05, (width, 3, 3, 3)).astype(np.float32), "w0")]
    nodes = [helper.make_node("Conv", ["input", "w0"], ["h0"], pads=[1, 1, 1, 1])]
    for i in range(1, depth + 1):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.05, (width, width, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [f"h{i - 1}", f"w{i}"], [f"h{i}"], pads=[1, 1, 1, 1]))
    nodes += [helper.make_node("GlobalAveragePool", [f"h{depth}"], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["logits"])]
    graph = helper.make_graph(
        nodes, "conv_stack", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", width])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def write_conv_stack(repo: Path, name: str, *, size: int, width: int, depth: int, max_batch_size: int = 16,
                     version: str = "1", preprocess: Preprocess | None = None) -> Path:
    """Add ``conv_stack`` as model ``name`` to ``repo`` (a classifier with labels "0".."width-1")."""

    def build(staging: Path, version: str) -> Manifest:
        path = staging / "model.onnx"
        conv_stack(path, size=size, width=width, depth=depth)
        return Manifest(
            name=name, version=version, task="classify",
            input=InputSpec(name="input", shape=[-1, 3, size, size]),
            outputs=[TensorSpec(name="logits", shape=[-1, width])],
            preprocess=preprocess or Preprocess(resize_policy="stretch"),
            postprocess=ClassifyPostprocess(output="logits"),
            labels=[str(i) for i in range(width)], max_batch_size=max_batch_size,
            provenance=Provenance(source="tests/onnx_builders.py", onnx_sha256=sha256_file(path)),
        )

    write_version(repo, name, version, build)
    return repo
