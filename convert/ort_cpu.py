"""The one ONNX Runtime CPU session factory of the tools (convert/ and quantize/ both use it).

The server builds its sessions elsewhere (service/runtime.py: providers, threads and arenas from the
settings); the tools only ever need a CPU session with a fixed number of threads, quiet logs, and no
inter-op pool, so that parity checks, guards and timings all run the graph the same way.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

DEFAULT_THREADS = 2


def cpu_session(model: Path | str | bytes, threads: int = DEFAULT_THREADS) -> ort.InferenceSession:
    """An ONNX Runtime session on the CPU for ``model`` (a path, or the serialized model's bytes)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])
