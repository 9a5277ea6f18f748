"""The runner: an ONNX Runtime session with the best execution provider this build offers.

TensorRT and CUDA options follow onnxruntime's documented provider options. A preferred provider that this
onnxruntime build lacks, or that fails to initialise (no GPU, missing libraries), is skipped with a log
line; CPU is always the last resort.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .settings import ModelSettings

log = logging.getLogger("visionserve.runtime")


class ProviderUnavailable(Exception):
    """A required execution provider is missing from this build or failed to initialise."""

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

    def __init__(self, model_path: Path, cfg: ModelSettings, *, threads: int | None = None,
                 spinning: bool | None = None) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads if threads is not None else cfg.intra_op_threads
        so.inter_op_num_threads = cfg.inter_op_threads
        so.graph_optimization_level = _OPT_LEVEL[cfg.graph_optimization]
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        spin = cfg.allow_spinning if spinning is None else spinning
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
        if spin:  # spin between operators, not after the run: the next request's decode needs that core
            so.add_session_config_entry("session.force_spinning_stop", "1")
        # Grow the CPU arena by what a run asks for, not to the next power of two (118 -> 104 MiB for
        # MobileNetV2 fp32 after batches 1-4, same speed).
        so.add_session_config_entry("session.arena_extend_strategy", "kSameAsRequested")
        providers = choose_providers(list(cfg.providers))
        required = cfg.require_provider
        if required is not None and required not in providers:
            available = ort.get_available_providers()
            if required not in available:
                raise ProviderUnavailable(f"{required} is required but this onnxruntime build has only "
                                          f"{', '.join(available)}")
            providers.insert(len(providers) - 1, required)  # required but not preferred: before CPU
        self.session = self._create(str(model_path), so, providers, cfg)
        self.providers: list[str] = self.session.get_providers()
        if required is not None and required not in self.providers:
            # onnxruntime may also fall back without raising (a CUDA build without a usable GPU or cuDNN)
            raise ProviderUnavailable(f"{required} is required but failed to initialise; the session would run "
                                      f"on {', '.join(self.providers)}")
        if self.providers[0] != providers[0]:
            log.warning("%s: preferred execution provider %s is not in use; running on %s", Path(model_path).name,
                        providers[0], self.providers[0])
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
                if providers[0] == cfg.require_provider:
                    raise ProviderUnavailable(f"{providers[0]} is required but failed to initialise: "
                                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
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


def release_arena_after(options: ort.RunOptions) -> ort.RunOptions:
    """Run options that hand the CPU arena's free chunks back after the run (used on the largest warm-up
    run, so that warming up does not pin the largest batch's memory for ever: 118 -> 45 MiB, MobileNetV2)."""
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def gpu_preferred(cfg: ModelSettings) -> bool:
    """True when a GPU provider is preferred and present in this onnxruntime build."""
    return choose_providers(list(cfg.providers))[0] != "CPUExecutionProvider"


@dataclass(frozen=True)
class Plan:
    """How one model is laid out on this machine: batch workers, threads, the solo session, batch size."""

    instances: int
    intra_threads: int
    solo_threads: int
    batch: int  # largest batch the batcher forms
    decode_in_worker: bool  # per-core pipelines (CPU) or a decode pool feeding the device (GPU)
    shared_session: bool  # the instances run concurrently on one session (CPU) or each has its own (GPU)


def plan(cfg: ModelSettings, max_batch: int, *, cpus: int, gpu: bool | None = None) -> Plan:
    """Settings left unset filled in from ``cpus``, the CPUs really available (``Settings.usable_cpus()``: the
    ``cpus`` setting, else the affinity mask and cgroup quota)."""
    gpu = gpu_preferred(cfg) if gpu is None else gpu
    # On the CPU provider the instances share one session: ONNX Runtime's Run is thread-safe, and with one
    # intra-op thread each concurrent run computes on its caller's thread. Measured against a session each:
    # the same throughput (MobileNetV2 fp32 and int8, within noise), one copy of the weights and one arena.
    if gpu:
        instances = cfg.instances or 2
        threads = cfg.intra_op_threads or max(1, cpus // instances)
        solo = cfg.solo_threads or 0
        batch = cfg.preferred_batch_size or max_batch
    else:
        instances = cfg.instances or cpus
        threads = cfg.intra_op_threads or 1
        solo = cpus if cfg.solo_threads is None and cpus > 1 else (cfg.solo_threads or 0)
        batch = cfg.preferred_batch_size or min(4, max_batch)
    return Plan(instances, threads, solo if solo > threads else 0, min(batch, max_batch), not gpu, not gpu)
