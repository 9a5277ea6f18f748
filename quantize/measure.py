"""What every stage of ``optimize`` reports: size, MACs, latency, throughput, and model outputs."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from visionserve.convert.ort_cpu import DEFAULT_THREADS
from visionserve.convert.ort_cpu import cpu_session as session  # the tools' one CPU session factory

__all__ = ["DEFAULT_THREADS", "Latency", "compare_speed", "file_size", "latency", "onnx_macs", "predict",
           "session"]


def predict(sess: ort.InferenceSession, tensors: np.ndarray, batch: int = 8) -> np.ndarray:
    """The first output for every input, run ``batch`` at a time."""
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: tensors[i:i + batch]})[0] for i in range(0, len(tensors), batch)]
    return np.concatenate(outs)


@dataclass(frozen=True)
class Latency:
    batch: int
    median_ms: float
    p90_ms: float
    repeats: int

    @property
    def throughput(self) -> float:
        """Images per second at this batch size."""
        return self.batch / (self.median_ms / 1000.0)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "throughput_ips": round(self.throughput, 1)}


def latency(sess: ort.InferenceSession, sample: np.ndarray, batch: int, repeats: int = 20,
            warmup: int = 3) -> Latency:
    """Median wall time of ``sess.run`` at ``batch`` (inputs tiled from ``sample``)."""
    x = np.ascontiguousarray(np.resize(sample, (batch, *sample.shape[1:])).astype(np.float32))
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t) * 1000.0)
    times.sort()
    return Latency(batch, round(statistics.median(times), 3), round(times[int(0.9 * (len(times) - 1))], 3),
                   repeats)


def compare_speed(paths: dict[str, Path], sample: np.ndarray, batches: tuple[int, ...] = (1, 8),
                  repeats: int = 20, rounds: int = 3, threads: int = DEFAULT_THREADS
                  ) -> dict[str, dict[int, Latency]]:
    """Latency of several models, interleaved run by run so that load from other processes hits all alike.

    Each model's figure is the median of ``rounds`` × ``repeats`` runs, after a warm-up.
    """
    sessions = {k: session(p, threads) for k, p in paths.items()}
    out: dict[str, dict[int, Latency]] = {k: {} for k in paths}
    for b in batches:
        x = np.ascontiguousarray(np.resize(sample, (b, *sample.shape[1:])).astype(np.float32))
        feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
        for k, s in sessions.items():
            for _ in range(3):
                s.run(None, feeds[k])
        times: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds * repeats):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append((time.perf_counter() - t) * 1000.0)
        for k, ts in times.items():
            ts.sort()
            out[k][b] = Latency(b, round(statistics.median(ts), 3), round(ts[int(0.9 * (len(ts) - 1))], 3),
                                len(ts))
    return out


def file_size(path: Path) -> int:
    return os.path.getsize(path)


def onnx_macs(path: Path | str) -> int:
    """Multiply-accumulates of one image through the Conv / Gemm / MatMul nodes (shape inference)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path))
    # a concrete batch of 1 makes every shape static
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for vi in [*model.graph.value_info, *model.graph.output, *model.graph.input]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    # QDQ graphs: a weight reaches Conv through DequantizeLinear; follow it back to the initializer
    producer = {o: n for n in model.graph.node for o in n.output}
    consts = {n.output[0]: list(numpy_helper.to_array(a.t).shape) for n in model.graph.node
              if n.op_type == "Constant" for a in n.attribute if a.name == "value"}

    def shape_of(name: str) -> list[int] | None:
        if name in inits:
            return inits[name]
        if name in consts:
            return consts[name]
        if shapes.get(name):
            return shapes[name]
        p = producer.get(name)
        if p is not None and p.op_type in ("DequantizeLinear", "QuantizeLinear", "Identity", "Cast"):
            return shape_of(p.input[0])
        return None

    total = 0
    for n in model.graph.node:
        if n.op_type == "Conv":
            w, y = shape_of(n.input[1]), shape_of(n.output[0])
            if w and y:
                total += int(np.prod(y)) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul"):
            a, y = shape_of(n.input[0]), shape_of(n.output[0])
            if a and y:
                k = a[-1]
                if n.op_type == "Gemm" and any(at.name == "transA" and at.i for at in n.attribute):
                    k = a[0]
                total += int(np.prod(y)) * int(k)
    return total
