"""Which post-training int8 method keeps MobileNetV2's answers on photos it never saw (held-out figures).

    python benchmarks/int8_methods.py --repository model_repository                  # every method
    python benchmarks/int8_methods.py --repository model_repository --methods nncf-bc,ort-minmax

Every method quantizes the same fp32 model with nothing kept in float (no guard: this compares the methods
themselves), then is scored against fp32 on the three disjoint photo sets of ``quantize.natural``: the
*selection* set (what a guard would tune on) and the *held-out* set (reported, with a 95 % bootstrap
interval that resamples whole photos). Speed: batch 8, all models interleaved in one run (medians).
Synthetic calibration needs a distilled set (``--synthetic FILE.npy``, written by ``--distill``; minutes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from visionserve.quantize.data import ImageSet, load_tensors, open_set  # noqa: E402
from visionserve.quantize.guard import fidelity  # noqa: E402
from visionserve.quantize.heldout import held_out  # noqa: E402
from visionserve.quantize.int8 import calibrate, preprocess_model, quantize_with, settings_for  # noqa: E402
from visionserve.quantize.measure import compare_speed, predict, session  # noqa: E402
from visionserve.quantize.natural import jittered  # noqa: E402
from visionserve.quantize.slim import slim  # noqa: E402
from visionserve.service.imaging import Preprocessor  # noqa: E402
from visionserve.service.repository import load_entry, versions  # noqa: E402

METHODS = {
    "ort-minmax": "ONNX Runtime quantize_static, MinMax, per-channel",
    "ort-minmax-per-tensor": "ONNX Runtime, MinMax, per-tensor weights",
    "ort-percentile": "ONNX Runtime, Percentile 99.999",
    "ort-entropy": "ONNX Runtime, Entropy",
    "nncf-no-bc": "NNCF quantize, MinMax, no bias correction",
    "nncf-fast-bc": "NNCF quantize, fast bias correction, per-tensor activations (the default)",
    "nncf-bc": "NNCF quantize, full bias correction",
    "nncf-bc-per-channel-act": "NNCF, full bias correction, NNCF's per-channel activations (depthwise inputs)",
    "nncf-bc-augmented": "NNCF, full bias correction, 512 calibration crops, half colour-jittered",
    "nncf-bc-synthetic": "NNCF, full bias correction, calibrated on distilled data (no photos)",
    "nncf-fast-bc-augmented": "NNCF, fast bias correction, 512 calibration crops, half colour-jittered",
    "nncf-fast-bc-synthetic": "NNCF, fast bias correction, calibrated on distilled data (no photos)",
    "nncf-accuracy-control": "NNCF quantize_with_accuracy_control (selection set, max drop 1 %)",
}


def build(method: str, pre: Path, out: Path, cal: np.ndarray, sel: np.ndarray, ref_sel: np.ndarray,
          input_name: str, work: Path, synthetic: np.ndarray | None) -> Path:
    from visionserve.quantize.nncf_ptq import nncf_quantize

    raw = out.with_suffix(".raw.onnx")
    if method.startswith("ort-"):
        kind = method.split("-")[1]
        s = settings_for("x86-vnni", kind, per_channel=not method.endswith("per-tensor"))
        c = calibrate(pre, cal, input_name, s, work / method)
        quantize_with(pre, raw, s, c.cache)
    elif method == "nncf-accuracy-control":
        accuracy_control(pre, raw, cal, sel, ref_sel, input_name)
    else:
        bc = "none" if method == "nncf-no-bc" else "fast" if method.startswith("nncf-fast-bc") else "full"
        x = synthetic if method.endswith("synthetic") else cal
        if x is None:
            raise SystemExit("nncf-bc-synthetic needs --synthetic FILE.npy (make one with --distill)")
        nncf_quantize(pre, raw, x, input_name, bias_correction=bc,
                      per_channel_activations=method == "nncf-bc-per-channel-act")
    slim(raw, out)
    return out


def accuracy_control(pre: Path, out: Path, cal: np.ndarray, sel: np.ndarray, ref_sel: np.ndarray,
                     input_name: str) -> None:
    """NNCF's rank-and-revert loop, validated by top-1 agreement with fp32 on confident selection images."""
    import os

    os.environ.setdefault("NNCF_CI", "1")
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    from visionserve.quantize.guard import CONFIDENT, confidence

    conf = confidence(ref_sel) >= CONFIDENT
    xs, labels = sel[conf], ref_sel[conf].argmax(1)

    def validate(model: onnx.ModelProto, items) -> tuple[float, list[float]]:
        s = session_from(model)
        per = [float(s.run(None, {input_name: x})[0].argmax(1)[0] == y) for x, y in items]
        return float(np.mean(per)), per

    cal_ds = nncf.Dataset([cal[i:i + 1] for i in range(len(cal))], lambda x: {input_name: x})
    val_ds = nncf.Dataset([(xs[i:i + 1], labels[i]) for i in range(len(xs))], lambda t: {input_name: t[0]})
    q = nncf.quantize_with_accuracy_control(
        onnx.load(str(pre)), cal_ds, val_ds, validate, max_drop=0.01, preset=nncf.QuantizationPreset.MIXED,
        target_device=nncf.TargetDevice.CPU, subset_size=len(cal), fast_bias_correction=False,
        advanced_quantization_parameters=AdvancedQuantizationParameters(
            activations_quantization_params=QuantizationParameters(per_channel=False)))
    onnx.save(q, str(out))


def session_from(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 2, 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--methods", default=",".join(m for m in METHODS if m not in ("ort-entropy",
                                                                                    "nncf-bc-synthetic")))
    ap.add_argument("--synthetic", type=Path, help="distilled calibration inputs (.npy) for nncf-bc-synthetic")
    ap.add_argument("--distill", type=Path, help="distil 64 inputs from MobileNetV2's BatchNorm statistics "
                                                 "into this .npy first")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR, force=True)
    fp32 = load_entry(args.repository / "mobilenet_v2" / versions(args.repository, "mobilenet_v2")[-1])
    m = fp32.manifest
    if args.distill:
        from visionserve.convert.default import mobilenet_v2_weights
        from visionserve.convert.sources import load_source
        from visionserve.quantize.synthetic import distill

        t = time.perf_counter()
        np.save(args.distill, distill(load_source(arch="mobilenet_v2", weights=mobilenet_v2_weights()).model))
        print(f"distilled into {args.distill} in {time.perf_counter() - t:.0f} s")
        args.synthetic = args.distill
    synthetic = np.load(args.synthetic) if args.synthetic else None
    prep = Preprocessor(m.input, m.preprocess, draft=False)
    cal_set, sel_set, ho_set = (open_set("natural", role=r) for r in ("calibration", "selection", "held-out"))
    cal, sel, ho = (load_tensors(s, prep) for s in (cal_set, sel_set, ho_set))
    fp = session(fp32.model_path)
    ref_sel, ref_ho = predict(fp, sel), predict(fp, ho)
    methods = [x for x in args.methods.split(",") if x]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pre = preprocess_model(fp32.model_path, work / "pre.onnx")
        paths = {"fp32": fp32.model_path}
        for method in methods:
            x = cal
            if method.endswith("augmented"):
                more = open_set("natural", role="calibration", count=512)
                half = len(more) // 2
                more_items = list(more.items[:half]) + jittered(list(more.items[half:]))
                x = load_tensors(ImageSet(more_items, "augmented"), prep)
            t = time.perf_counter()
            path = build(method, pre, work / f"{method}.onnx", x, sel, ref_sel, m.input.name, work, synthetic)
            took = time.perf_counter() - t
            s = session(path)
            h = held_out(ref_ho, predict(s, ho), None, ho_set.groups, ho_set.source)
            f_sel = fidelity(ref_sel, predict(s, sel))
            paths[method] = path
            rows.append({"method": method, "what": METHODS[method], "seconds": round(took, 1),
                         "held_out_confident": h.fidelity.top1_agreement_confident,
                         "held_out_confident_ci95": h.agreement_confident_ci,
                         "held_out_confident_images": h.fidelity.confident_images,
                         "held_out_all": h.fidelity.top1_agreement,
                         "selection_confident": f_sel.top1_agreement_confident,
                         "size_ratio": round(path.stat().st_size / fp32.model_path.stat().st_size, 3)})
            print(json.dumps(rows[-1]), flush=True)
        sp = compare_speed(paths, ho[:8], batches=(8,), repeats=10, rounds=3)
    base = sp["fp32"][8].median_ms
    for r in rows:
        r["b8_speedup"] = round(base / sp[str(r["method"])][8].median_ms, 2)
    print(f"\nheld out: {ho_set.source}; selection: {sel_set.source}; calibration: {cal_set.source}\n")
    print("| method | held-out top-1 agreement, confident (95 % CI) | held-out, all | selection, confident "
          "| × fp32 (b8) | size / fp32 | build s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["held_out_confident_ci95"]  # type: ignore[misc]
        print(f"| `{r['method']}`: {r['what']} | **{r['held_out_confident']:.1%}** ({lo:.1%}–{hi:.1%}, "
              f"n={r['held_out_confident_images']}) | {r['held_out_all']:.1%} | {r['selection_confident']:.1%} "
              f"| {r['b8_speedup']:.2f} | {r['size_ratio']:.3f} | {r['seconds']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
