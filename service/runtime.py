"""The runner: an ONNX Runtime session with the best execution provider this build offers.

TensorRT and CUDA options follow onnxruntime's documented provider options. A preferred provider that this
onnxruntime build lacks, or that fails to initialise (no GPU, missing libraries), is skipped with a log
line; CPU is always the last resort.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .settings import ModelSettings

log = logging.getLogger("visionserve.runtime")

_OPT_LEVEL = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def provider_options(name: str, cfg: ModelSettings) -> dict[str, Any]:
    """onnxruntime's documented options for each provider we configure."""
    if name == "TensorrtExecutionProvider":
        opts: dict[str, Any] = {
            "device_id": cfg.device_id,
            "trt_fp16_enable": cfg.trt_fp16,
            "trt_int8_enable": cfg.trt_int8,
            "trt_max_workspace_size": cfg.trt_max_workspace_bytes,
        }
        if cfg.trt_engine_cache:
            Path(cfg.trt_engine_cache).mkdir(parents=True, exist_ok=True)
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=cfg.trt_engine_cache,
                        trt_timing_cache_enable=True, trt_timing_cache_path=cfg.trt_engine_cache)
        return opts
    if name == "CUDAExecutionProvider":
        return {"device_id": cfg.device_id, "cudnn_conv_algo_search": "HEURISTIC"}
    return {}


def choose_providers(preferred: list[str], available: list[str] | None = None) -> list[str]:
    """The preferred providers this build has, in order, ending with CPU."""
    available = available if available is not None else ort.get_available_providers()
    chosen = [p for p in preferred if p in available and p != "CPUExecutionProvider"]
    skipped = [p for p in preferred if p not in available]
    if skipped:
        log.info("execution providers not in this onnxruntime build, skipped: %s", ", ".join(skipped))
    return [*chosen, "CPUExecutionProvider"]


class Runner:
    """One ONNX Runtime session; ``run`` is called from a worker thread, never the event loop."""

    def __init__(self, model_path: Path, cfg: ModelSettings, *, threads: int | None = None) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads if threads is not None else cfg.intra_op_threads
        so.inter_op_num_threads = cfg.inter_op_threads
        so.graph_optimization_level = _OPT_LEVEL[cfg.graph_optimization]
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if not cfg.allow_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers = choose_providers(list(cfg.providers))
        self.session = self._create(str(model_path), so, providers, cfg)
        self.providers: list[str] = self.session.get_providers()
        inp = self.session.get_inputs()[0]
        self.input_name: str = inp.name
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]

    @staticmethod
    def _create(path: str, so: ort.SessionOptions, providers: list[str], cfg: ModelSettings
                ) -> ort.InferenceSession:
        while True:
            try:
                return ort.InferenceSession(
                    path, so, providers=[(p, provider_options(p, cfg)) for p in providers])
            except Exception as e:  # a GPU provider that fails to start: drop it and go on
                if len(providers) == 1:
                    raise
                log.warning("execution provider %s failed to initialise (%s); falling back", providers[0],
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
                providers = providers[1:]

    @property
    def provider(self) -> str:
        return self.providers[0]

    def run(self, batch: np.ndarray, options: ort.RunOptions | None = None) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: batch}, options)


def terminable_run_options() -> ort.RunOptions:
    """Run options whose ``terminate = True``, set from another thread, stops the run between operators."""
    options = ort.RunOptions()
    options.log_severity_level = 4  # a terminated run is expected, not worth an error line
    return options


def default_threads(cfg: ModelSettings) -> int:
    """Intra-op threads per session: as configured, else the cores shared among instances."""
    if cfg.intra_op_threads:
        return cfg.intra_op_threads
    return max(1, (os.cpu_count() or 1) // cfg.instances)
