"""Make a QDQ int8 graph small and fast to run: one pass over the ONNX model, nothing that changes an answer.

- signed int8 *activations* become uint8 with the zero point moved by 128 (``q + 128``, the same scale: the
  same real values exactly). ONNX Runtime's x86 kernels are fastest on u8 activations × s8 weights; NNCF
  writes s8 activations for signed tensors, which ran slower than fp32 here (docs/optimize.md);
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
    from onnx import numpy_helper

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

    # 2. int8 activations → uint8 (zero point + 128): every Q of a non-constant and the DQs that read it
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

    # 3. share identical small initializers, then drop what nothing reads
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
    return SlimReport(Path(src).stat().st_size, Path(dst).stat().st_size, to_u8, folded, len(dead), shared)
