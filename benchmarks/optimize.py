"""int8 vs fp32: throughput at batch 8 and fidelity, per model (medians of interleaved repeats).

    python benchmarks/optimize.py --repository model_repository            # the table
    python benchmarks/optimize.py --repository model_repository --variants # + settings/format comparison

Builds what is missing: ``mobilenet_v2`` / ``mobilenet_v2_int8`` (as ``make models`` does) and the digits
model's int8 from ``tests/data/digits_repo`` (into a temporary copy). Ratios come from one run, with the
models timed in interleaved rounds so that load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from visionserve.quantize.data import load_tensors, open_set, scan_folder  # noqa: E402
from visionserve.quantize.guard import fidelity  # noqa: E402
from visionserve.quantize.measure import compare_speed, predict, session  # noqa: E402
from visionserve.service.imaging import Preprocessor  # noqa: E402
from visionserve.service.repository import load_entry, versions  # noqa: E402


def latest(repo: Path, name: str):
    return load_entry(repo / name / versions(repo, name)[-1])


def row(name: str, fp32, int8, x: np.ndarray, targets, rounds: int, repeats: int, threads: int) -> str:
    sp = compare_speed({"fp32": fp32.model_path, "int8": int8.model_path}, x[:8], batches=(1, 8),
                       repeats=repeats, rounds=rounds, threads=threads)
    f = fidelity(predict(session(fp32.model_path, threads), x), predict(session(int8.model_path, threads), x),
                 targets)
    ratio = sp["int8"][8].throughput / sp["fp32"][8].throughput
    fid = f"top-1 agreement {f.top1_agreement:.1%} (all {f.images})"
    if f.top1_agreement_confident is not None:
        fid += f", {f.top1_agreement_confident:.1%} (confident {f.confident_images})"
    if f.fp32_top1 is not None:
        fid += f"; accuracy {f.fp32_top1:.1%} → {f.int8_top1:.1%}"
    kept = len(int8.manifest.provenance.notes.get("guard", {}).get("kept_in_float", []))
    return (f"| {name} | {sp['fp32'][8].median_ms:.1f} → {sp['int8'][8].median_ms:.1f} ms "
            f"(b1 {sp['fp32'][1].median_ms:.1f} → {sp['int8'][1].median_ms:.1f}) | **× {ratio:.2f}** | {fid} "
            f"| {kept} |")


def variants(fp32, threads: int, rounds: int, repeats: int) -> list[str]:
    """Each target's settings and QOperator vs QDQ on MobileNetV2, one calibration (MinMax) for all."""
    from visionserve.quantize.int8 import TensorReader, preprocess_model, quantize_with, settings_for

    prep = Preprocessor(fp32.manifest.input, fp32.manifest.preprocess, draft=False)
    cal = load_tensors(open_set("natural", role="calibration", count=256), prep)
    ev = load_tensors(open_set("natural", role="held-out"), prep)
    ref = predict(session(fp32.model_path, threads), ev)
    out = ["", "| settings (MinMax, per-channel, nothing kept in float) | batch 8 ms | × fp32 | top-1 agreement "
           "all / confident |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pre = preprocess_model(fp32.model_path, work / "pre.onnx")
        cache = work / "cal.json"
        cases = {
            "u8 act × s8 weight (x86-vnni, arm)": (settings_for("x86-vnni"), "QDQ"),
            "u8 × s8, reduce_range (7-bit weights)": (settings_for("x86-vnni", reduce_range=True), "QDQ"),
            "u8 × u8 (x86-novnni)": (settings_for("x86-novnni"), "QDQ"),
            "s8 × s8 symmetric (tensorrt)": (settings_for("tensorrt"), "QDQ"),
            "u8 × s8, QOperator format": (settings_for("x86-vnni"), "QOperator"),
        }
        paths = {"fp32": fp32.model_path}
        fids = {}
        for i, (label, (s, fmt)) in enumerate(cases.items()):
            p = work / f"v{i}.onnx"
            reader = TensorReader(fp32.manifest.input.name, cal) if not cache.exists() else None
            quantize_with(pre, p, replace(s, method="minmax"), cache, reader, quant_format=fmt)
            paths[label] = p
            fids[label] = fidelity(ref, predict(session(p, threads), ev))
        sp = compare_speed(paths, ev[:8], batches=(8,), repeats=repeats, rounds=rounds, threads=threads)
    base = sp["fp32"][8].median_ms
    out.append(f"| fp32 | {base:.1f} | 1.00 | — |")
    for label, f in fids.items():
        ms = sp[label][8].median_ms
        out.append(f"| {label} | {ms:.1f} | {base / ms:.2f} | {f.top1_agreement:.1%} / "
                   f"{f.top1_agreement_confident:.1%} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", action="store_true", help="also compare target settings and QOperator")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR, force=True)
    from visionserve.quantize.default import build_repository
    from visionserve.quantize.int8 import detect_target, settings_for
    from visionserve.quantize.models import resolve
    from visionserve.quantize.pipeline import QuantizeJob, run_quantize

    build_repository(args.repository)  # idempotent: builds mobilenet_v2 and mobilenet_v2_int8 if missing
    lines = [f"CPU target detected: {detect_target()}; ONNX Runtime, {args.threads} threads; medians of "
             f"{args.rounds} interleaved rounds × {args.repeats} runs", "",
             "| model | batch 8 latency fp32 → int8 | int8 vs fp32 throughput (b8) | fidelity | kept in float |",
             "|---|---|---|---|---|"]
    fp32, int8 = latest(args.repository, "mobilenet_v2"), latest(args.repository, "mobilenet_v2_int8")
    prep = Preprocessor(fp32.manifest.input, fp32.manifest.preprocess, draft=False)
    x = load_tensors(open_set("natural", role="held-out"), prep)
    lines.append(row("mobilenet_v2 (held-out natural photo crops)", fp32, int8, x, None, args.rounds, args.repeats,
                     args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(ROOT / "tests" / "data" / "digits_repo", repo)
        digits = resolve("digits", repo)
        test = scan_folder(ROOT / "tests" / "data" / "digits" / "test")
        cal = open_set(ROOT / "tests" / "data" / "digits" / "test")
        cal.items, cal.targets = cal.items[::3], None  # calibrate on a third, report on the other two
        test.items = [p for i, p in enumerate(test.items) if i % 3]
        test.targets = [t for i, t in enumerate(test.targets or []) if i % 3]
        run_quantize(QuantizeJob(source=digits, repository=repo, name="digits_int8", calibration=cal,
                                 evaluation=None, settings=settings_for(detect_target()), max_drop=None,
                                 measure_speed=False))
        d8 = latest(repo, "digits_int8")
        prep = Preprocessor(digits.manifest.input, digits.manifest.preprocess, draft=False)
        lines.append(row("digits CNN (held-out 2/3 of the committed test set)", digits, d8, load_tensors(test, prep),
                         np.asarray([int(test.classes[t]) for t in test.targets]), args.rounds, args.repeats,
                         args.threads))
    if args.variants:
        lines += variants(fp32, args.threads, args.rounds, args.repeats)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
