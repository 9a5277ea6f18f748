"""Make a QDQ int8 graph small and fast to run: one pass over the ONNX model, nothing that changes an answer.

- signed int8 *activations* become uint8 with the zero point moved by 128 (``q + 128``, the same scale: the
  same real values exactly). ONNX Runtime's x86 kernels are fastest on u8 activations × s8 weights; NNCF
  writes s8 activations for signed tensors, which ran slower than fp32 here (docs/optimize.md);
- a float bias of a Conv / Gemm whose input and weight are dequantized becomes int32 at scale
  ``input scale × weight scale`` (ONNX Runtime's own convention). NNCF leaves biases in float, and then
  ONNX Runtime cannot fuse the node into ``QLinearConv`` and runs it in float between a DQ and a Q: 34 of
  MobileNetV2's 52 convolutions, which made NNCF's int8 *slower* than fp32 here (× 0.56 at batch 8).
  The rounding error is at most half a unit of ``input scale × weight scale``, far below int8's own;
- a ``QuantizeLinear`` of a constant (a float weight quantized at run time) is folded into the int8 constant
  it computes, so the float copy of the weight leaves the file;
- initializers that nothing reads are dropped, and identical small ones (scales, zero points) are shared.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SMALL = 1 << 16  # bytes: larger initializers (weights) are never compared for sharing


@dataclass(frozen=True)
class SlimReport:
    bytes_before: int
    bytes_after: int
    biases_to_int32: int
    activations_to_uint8: int
    weights_folded: int
    dropped: int
    shared: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    info = np.iinfo(zp.dtype)
    return np.clip(np.rint(x / scale) + zp.astype(np.int32), info.min, info.max).astype(zp.dtype)


def slim(src: Path, dst: Path) -> SlimReport:
    """Write the slimmed ``src`` to ``dst`` and say what changed."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    def axis_of(n: onnx.NodeProto) -> int:
        return next((a.i for a in n.attribute if a.name == "axis"), 1)

    # 1. fold Q(constant) → int8 constant
    folded = 0
    keep_nodes = []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in inits and len(n.input) == 3 and n.input[2] in inits:
            w = numpy_helper.to_array(inits[n.input[0]])
            q = _quantize(w, numpy_helper.to_array(inits[n.input[1]]), numpy_helper.to_array(inits[n.input[2]]),
                          axis_of(n))
            new = numpy_helper.from_array(q, n.output[0])
            g.initializer.append(new)
            inits[new.name] = new
            folded += 1
            continue
        keep_nodes.append(n)
    del g.node[:]
    g.node.extend(keep_nodes)  # copies: look nodes up only from here on
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)

    # 2. float biases of quantized Conv/Gemm → int32 behind a DequantizeLinear
    producer = {o: n for n in g.node for o in n.output}
    biases = 0
    new_nodes = []
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        dq_x, dq_w = producer.get(n.input[0]), producer.get(n.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"
                and dq_x.input[1] in inits and dq_w.input[1] in inits):
            continue
        sx = numpy_helper.to_array(inits[dq_x.input[1]]).astype(np.float64)
        sw = numpy_helper.to_array(inits[dq_w.input[1]]).astype(np.float64)
        if sx.size != 1:
            continue
        b = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
        scale = (sx.reshape(()) * sw).astype(np.float32)
        scale = np.broadcast_to(scale, b.shape).copy() if scale.size == 1 and b.size > 1 else scale.reshape(-1)
        q = np.clip(np.rint(b / scale), -(2**31), 2**31 - 1).astype(np.int32)
        name = n.input[2]
        for t in (numpy_helper.from_array(q, name + "_int32"), numpy_helper.from_array(scale, name + "_scale")):
            g.initializer.append(t)
            inits[t.name] = t
        # no zero point: an int32 DequantizeLinear's defaults to 0, and a tensor of zeros per channel is waste
        new_nodes.append(helper.make_node("DequantizeLinear", [name + "_int32", name + "_scale"],
                                          [name + "_dq"], name=name + "_DequantizeLinear", axis=0))
        n.input[2] = name + "_dq"
        biases += 1
    # a DequantizeLinear must come before its reader in the node list (ONNX wants topological order)
    order = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes + order)
    consumers = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)

    # 3. int8 activations → uint8 (zero point + 128): every Q of a non-constant and the DQs that read it
    to_u8 = 0
    retyped: dict[str, str] = {}
    changed: set[str] = set()
    for n in list(g.node):
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or len(n.input) < 3:
            continue
        zp = inits.get(n.input[2])
        if zp is None or zp.data_type != onnx.TensorProto.INT8:
            continue
        readers = consumers.get(n.output[0], [])
        if not readers or any(r.op_type != "DequantizeLinear" for r in readers):
            continue  # a consumer that reads int8 directly would change meaning
        for node in (n, *readers):
            name = node.input[2]
            if name not in retyped:
                a = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
                u8 = numpy_helper.from_array(a.astype(np.uint8), name + "_u8")
                g.initializer.append(u8)
                inits[u8.name] = u8
                retyped[name] = u8.name
            node.input[2] = retyped[name]
        changed.add(n.output[0])
        to_u8 += 1
    # a stored type of a retyped tensor would now be wrong: drop it (ONNX Runtime infers it again)
    stale = [vi for vi in g.value_info if vi.name in changed]
    for vi in stale:
        g.value_info.remove(vi)

    # 4. share identical small initializers, then drop what nothing reads
    by_content: dict[tuple[int, tuple[int, ...], str], str] = {}
    alias: dict[str, str] = {}
    for t in g.initializer:
        if len(t.raw_data) + 4 * len(t.float_data) + 8 * len(t.int64_data) > SMALL:
            continue
        a = numpy_helper.to_array(t)
        key = (t.data_type, tuple(a.shape), hashlib.sha1(a.tobytes()).hexdigest())
        alias[t.name] = by_content.setdefault(key, t.name)
    shared = 0
    for n in g.node:
        for k, i in enumerate(n.input):
            if alias.get(i, i) != i:
                n.input[k] = alias[i]
                shared += 1
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    dead = [t for t in g.initializer if t.name not in used]
    for t in dead:
        g.initializer.remove(t)
    onnx.save(model, str(dst))
    return SlimReport(Path(src).stat().st_size, Path(dst).stat().st_size, biases, to_u8, folded, len(dead),
                      shared)
