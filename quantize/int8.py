"""Static int8 quantization in QDQ format with ONNX Runtime, with settings per deployment target.

Calibration runs once (its ranges are cached in a JSON file); re-quantizing with different nodes kept in
float — what the accuracy guard does — then only re-writes the graph, which takes a second or two.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

log = logging.getLogger("visionserve.quantize")

Target = Literal["x86-novnni", "x86-vnni", "arm", "tensorrt"]
Method = Literal["nncf", "minmax", "entropy", "percentile"]
TARGETS: tuple[str, ...] = ("x86-novnni", "x86-vnni", "arm", "tensorrt")
# nncf: NNCF's MinMax ranges with bias correction (quantize/nncf_ptq.py); the others: ONNX Runtime's calibrators
METHODS: tuple[str, ...] = ("nncf", "minmax", "entropy", "percentile")
NNCF_TARGETS = ("x86-vnni", "arm")  # NNCF's output, after quantize.slim: u8 activations × s8 weights


class QuantizeError(Exception):
    """Quantization could not be done; the message says why, for a person."""


@dataclass(frozen=True)
class Settings:
    """Everything that decides the int8 graph, recorded in the manifest's ``provenance.notes``."""

    target: str = "x86-novnni"
    method: str = "minmax"
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["uint8", "int8"] = "uint8"
    reduce_range: bool = False
    per_channel: bool = True
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    percentile: float = 99.999
    moving_average: bool = False
    nodes_to_exclude: tuple[str, ...] = ()

    def as_notes(self) -> dict[str, object]:
        d = asdict(self)
        d["nodes_to_exclude"] = list(self.nodes_to_exclude)
        return d


def settings_for(target: str, method: str = "auto", **overrides: object) -> Settings:
    """The settings a target wants; ``method="auto"``: NNCF where it fits the target and is installed.

    - ``x86-novnni`` (AVX2 without VNNI): u8 activations × u8 weights. AVX2's u8×s8 kernel adds pairs of
      products in int16 with saturation (``vpmaddubsw``); u8u8 avoids it at full 8-bit weight precision.
      The other cure, ``reduce_range`` (7-bit weights), cost MobileNetV2 far more accuracy than the guard
      could buy back (docs/optimize.md); u8u8's speed there could not be measured (the build host has VNNI).
    - ``x86-vnni`` (AVX512-VNNI / AVX-VNNI): u8 × s8, the fast path there, no saturation.
    - ``arm``: u8 × s8 (the NEON/SDOT kernels take both), full range.
    - ``tensorrt``: symmetric s8 × s8 (TensorRT accepts only symmetric int8 QDQ, zero point 0).
    """
    if target not in TARGETS:
        raise QuantizeError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if method == "auto":
        from .nncf_ptq import available

        method = "nncf" if target in NNCF_TARGETS and available() else "minmax"
    if method == "nncf" and target not in NNCF_TARGETS:
        raise QuantizeError(f"--method nncf writes u8 activations × s8 weights, which target {target} does not "
                            f"run well; use --method minmax (or percentile) for {target}")
    if method not in METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    base = {
        "x86-novnni": Settings(target, method, "uint8", "uint8"),
        "x86-vnni": Settings(target, method, "uint8", "int8"),
        "arm": Settings(target, method, "uint8", "int8"),
        "tensorrt": Settings(target, method, "int8", "int8", activation_symmetric=True),
    }[target]
    return replace(base, **overrides)  # type: ignore[arg-type]


class TensorReader(CalibrationDataReader):
    """An ONNX Runtime ``CalibrationDataReader`` over preprocessed tensors, in small batches."""

    def __init__(self, input_name: str, tensors: np.ndarray, batch: int = 8,
                 progress: Callable[[int], None] | None = None) -> None:
        self.input_name = input_name
        self.tensors = tensors
        self.batch = batch
        self.progress = progress
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self._range = (0, len(self))

    def __len__(self) -> int:
        return -(-len(self.tensors) // self.batch)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Batches [start, end): ONNX Runtime calibrates in strides so memory stays bounded."""
        self._range = (start_index, end_index)
        self._it = None

    def stride(self, most: int = 4) -> int:
        """The largest number of batches ≤ ``most`` that divides the whole (ONNX Runtime's requirement)."""
        return next(s for s in range(min(most, len(self)), 0, -1) if len(self) % s == 0)

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        start, end = self._range
        for i in range(start * self.batch, min(end * self.batch, len(self.tensors)), self.batch):
            chunk = self.tensors[i:i + self.batch]
            yield {self.input_name: chunk}
            if self.progress:
                self.progress(len(chunk))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def preprocess_model(src: Path, dst: Path) -> Path:
    """ONNX Runtime's ``quant_pre_process``: symbolic shape inference + graph optimisation (folds BN etc.)."""
    import contextlib

    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    # when symbolic shape inference fails it leaves sym_shape_infer_temp.onnx and a <uuid>.data in the
    # working directory: run it from the output's folder (a temporary one in the pipeline)
    with contextlib.chdir(dst.parent):
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        except Exception as e:  # symbolic shape inference fails on some graphs; plain optimisation still helps
            log.info("quant_pre_process with symbolic shapes failed (%s); retrying without", str(e)[:200])
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


@dataclass
class Calibration:
    """Ranges of every activation, computed once and reused for each re-quantization."""

    model: Path  # the pre-processed fp32 model the ranges belong to
    cache: Path  # ONNX Runtime's JSON calibration cache
    method: str
    images: int
    extra: dict[str, object] = field(default_factory=dict)


def _ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def _extra_options(s: Settings, reader: TensorReader | None) -> dict[str, object]:
    return {
        # calibrate a few batches at a time: the histogram methods otherwise hold every activation of
        # every image in memory at once (gigabytes for 256 MobileNet inputs)
        **({"CalibStridedMinMax": reader.stride()} if reader is not None else {}),
        "ActivationSymmetric": s.activation_symmetric,
        "WeightSymmetric": s.weight_symmetric,
        "CalibMovingAverage": s.moving_average,
        "CalibPercentile": s.percentile,
    }


def _ort_type(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def calibrate(model: Path, tensors: np.ndarray, input_name: str, settings: Settings, workdir: Path,
              progress: Callable[[int], None] | None = None) -> Calibration:
    """Run the calibration images through ``model`` (already pre-processed) and cache the ranges."""
    if len(tensors) == 0:
        raise QuantizeError("no calibration images")
    cache = workdir / f"calibration-{settings.method}.json"
    cache.unlink(missing_ok=True)
    # Quantizing into a throw-away file is the public way to run calibration and fill the cache.
    quantize_with(model, workdir / "calibration-probe.onnx", settings, cache,
                  TensorReader(input_name, tensors, progress=progress))
    (workdir / "calibration-probe.onnx").unlink(missing_ok=True)
    return Calibration(model, cache, settings.method, len(tensors))


def quantize_with(model: Path, out: Path, settings: Settings, cache: Path,
                  reader: TensorReader | None = None, quant_format: str = "QDQ") -> Path:
    """``quantize_static`` with ``settings``; ranges from ``cache`` (filled from ``reader`` if missing)."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    with tempfile.TemporaryDirectory(prefix="vs-quant-"):
        quantize_static(
            str(model), str(out), calibration_data_reader=reader,  # type: ignore[arg-type]
            quant_format=QuantFormat.QDQ if quant_format == "QDQ" else QuantFormat.QOperator,
            per_channel=settings.per_channel, reduce_range=settings.reduce_range,
            activation_type=_ort_type(settings.activation_type), weight_type=_ort_type(settings.weight_type),
            nodes_to_exclude=list(settings.nodes_to_exclude) or None,
            calibrate_method=_ort_method(settings.method), extra_options=_extra_options(settings, reader),
            calibration_cache_path=str(cache),
        )
    return out


def detect_target() -> str:
    """This machine's target: ``arm`` on ARM, ``x86-vnni`` where the CPU has (AVX512-/AVX-)VNNI."""
    import platform

    if platform.machine().lower() in ("aarch64", "arm64", "armv8l"):
        return "arm"
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return "x86-vnni" if ("avx512_vnni" in flags or "avx_vnni" in flags) else "x86-novnni"
