"""Post-training int8 with NNCF (``nncf.quantize`` on the ONNX model): MinMax ranges + bias correction.

Measured on MobileNetV2 with the same 256 calibration crops, nothing kept in float (docs/optimize.md,
``benchmarks/int8_methods.py``), top-1 agreement with fp32 on confident crops of the *selection* photos /
of the *held-out* photos: ONNX Runtime MinMax 95.3 % / 97.8 %; NNCF with fast bias correction 100 % / 100 %;
NNCF with full bias correction 99.5 % / 98.1 %. Fast bias correction is the default, chosen on the
selection set (the held-out figures are reported, never used to choose).

Two settings make NNCF's graph run fast in ONNX Runtime: per-tensor activation scales (NNCF picks
per-channel ones for depthwise inputs, which ONNX Runtime has no integer kernel for), and ``quantize.slim``
afterwards (int32 biases, uint8 activations), so that every convolution fuses into ``QLinearConv``.
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
