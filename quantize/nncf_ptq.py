"""Post-training int8 with NNCF (``nncf.quantize`` on the ONNX model): MinMax ranges + bias correction.

Measured on MobileNetV2 against ONNX Runtime's own ``quantize_static`` with the same 256 calibration crops
(docs/optimize.md, ``benchmarks/int8_methods.py``): held-out top-1 agreement on confident crops 97.8 %
(ORT MinMax) → 98.4 % (NNCF, fast bias correction) → 99.7 % (NNCF, full bias correction), in the same
~30 s. Bias correction is what depthwise-heavy networks need: int8 rounding of a 3×3 depthwise kernel
shifts each channel's mean output, and the correction moves that shift back into the bias, measured on
the calibration images.

NNCF writes signed int8 for activations that can be negative; ``quantize.slim`` turns those into the
uint8 form ONNX Runtime's x86 kernels run fastest, without changing a value.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger("visionserve.quantize")


def available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("nncf") is not None
    except ValueError:
        return False


def nncf_quantize(model: Path, out: Path, tensors: np.ndarray, input_name: str, *,
                  ignored: tuple[str, ...] = (), bias_correction: str = "fast",
                  per_channel_activations: bool = False) -> Path:
    """Quantize ``model`` (fp32 ONNX) with NNCF on ``tensors``; nodes named in ``ignored`` stay float."""
    # NNCF's usage telemetry (openvino-telemetry) is off: a build tool sends nothing anywhere
    os.environ.setdefault("NNCF_CI", "1")
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    m = onnx.load(str(model))
    data = nncf.Dataset([tensors[i:i + 1] for i in range(len(tensors))], lambda x: {input_name: x})
    q = nncf.quantize(
        m, data, preset=nncf.QuantizationPreset.MIXED, target_device=nncf.TargetDevice.CPU,
        subset_size=len(tensors), fast_bias_correction=bias_correction == "fast",
        ignored_scope=nncf.IgnoredScope(names=list(ignored), validate=False) if ignored else None,
        advanced_parameters=AdvancedQuantizationParameters(
            disable_bias_correction=bias_correction == "none",
            # per-channel activation scales (NNCF's choice for depthwise inputs) have no int8 kernel in ONNX
            # Runtime: those convolutions would run in float between a DQ and a Q
            activations_quantization_params=None if per_channel_activations else QuantizationParameters(
                per_channel=False)),
    )
    onnx.save(q, str(out))
    return out
