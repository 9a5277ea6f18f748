"""int8 of other torchvision ImageNet architectures, with random weights (only MobileNetV2 has real ones here).

    python benchmarks/int8_other_archs.py resnet18 mobilenet_v3_small

Each architecture (seed 0) is converted, quantized by NNCF (fast bias correction, slimmed: the default) and by
ONNX Runtime MinMax, and compared with fp32 on the held-out natural crops. A random network is never
confident, so only overall agreement is printed; where its logits collapse to near-constants (the largest
|fp32 − int8| difference tells), top-1 is a tie-break and the agreement means nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np
    import torch

    from visionserve.convert.pipeline import ConvertOptions, convert_model
    from visionserve.convert.sources import load_source
    from visionserve.quantize.data import load_tensors, open_set
    from visionserve.quantize.heldout import held_out
    from visionserve.quantize.int8 import calibrate, preprocess_model, quantize_with, settings_for
    from visionserve.quantize.measure import predict, session
    from visionserve.quantize.nncf_ptq import nncf_quantize
    from visionserve.quantize.slim import slim
    from visionserve.service.imaging import Preprocessor

    logging.basicConfig(level=logging.ERROR, force=True)
    archs = sys.argv[1:] or ["resnet18", "mobilenet_v3_small"]
    cal_set, ho_set = open_set("natural", role="calibration"), open_set("natural", role="held-out")
    for arch in archs:
        torch.manual_seed(0)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            e = convert_model(load_source(arch=arch), ConvertOptions(name=arch, repository=work / "r"))
            prep = Preprocessor(e.manifest.input, e.manifest.preprocess, draft=False)
            cal, ho = load_tensors(cal_set, prep), load_tensors(ho_set, prep)
            name = e.manifest.input.name
            pre = preprocess_model(e.model_path, work / "pre.onnx")
            ref = predict(session(e.model_path), ho)
            nncf_quantize(pre, work / "n.raw.onnx", cal, name)
            slim(work / "n.raw.onnx", work / "n.onnx")
            s = settings_for("x86-vnni", "minmax")
            quantize_with(pre, work / "o.onnx", s, calibrate(pre, cal, name, s, work).cache)
            for tag, f in (("nncf-fast-bc", work / "n.onnx"), ("ort-minmax", work / "o.onnx")):
                got = predict(session(f), ho)
                h = held_out(ref, got, None, ho_set.groups, ho_set.source)
                print(json.dumps({"arch": arch, "method": tag,
                                  "top1_agreement_all": round(h.fidelity.top1_agreement, 4),
                                  "top5": round(h.fidelity.top5_agreement, 4),
                                  "confident_images": h.fidelity.confident_images,
                                  "max_abs_logit_diff": float(np.abs(got - ref).max()),
                                  "size_ratio": round(f.stat().st_size / e.model_path.stat().st_size, 3),
                                  "seconds": round(time.perf_counter() - started)}), flush=True)


if __name__ == "__main__":
    main()
