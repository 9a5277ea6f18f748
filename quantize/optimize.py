"""optimize = prune? → convert → quantize (guarded) → evaluate, with one report for every stage.

Stages measured side by side (latency interleaved round by round, so machine noise hits all alike):
``original fp32`` (the unpruned model), ``pruned fp32`` (when pruning), and ``int8`` (the new entry).
Writes ``<name>_fp32`` (the converted, possibly pruned, model) and ``<name>`` (its int8) into the repository.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionserve.service.imaging import Preprocessor
from visionserve.service.manifest import Preprocess

from .data import hold_out, load_tensors, map_classes, open_set
from .guard import activation_of, fidelity, topk_hits
from .measure import compare_speed, file_size, onnx_macs, predict, session

log = logging.getLogger("visionserve.quantize")


@dataclass
class OptimizeOptions:
    repository: Path
    name: str
    calibration: str
    evaluation: str | None = None
    arch: str | None = None
    module: str | None = None
    weights: Path | None = None
    num_classes: int | None = None
    labels: Path | None = None
    input_size: int = 224
    resize: int | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    target_macs: float | None = None
    ratio: float | None = None
    finetune: Path | None = None
    epochs: int = 1
    max_drop: float = 0.01
    target: str = "auto"
    method: str = "auto"  # NNCF where the target takes it (quantize.int8.settings_for)
    report: Path = Path("optimize-report")
    calibration_limit: int = 256
    eval_limit: int = 600


def run_optimize(o: OptimizeOptions) -> str:
    import copy

    import torch

    from visionserve.convert.export import export_onnx
    from visionserve.convert.pipeline import ConvertOptions, convert_model, read_labels
    from visionserve.convert.sources import Source, load_source

    from .int8 import detect_target, settings_for
    from .pipeline import QuantizeJob, run_quantize
    from .prune import PruneOptions, run_prune

    started = time.perf_counter()
    o.report.mkdir(parents=True, exist_ok=True)
    pre = Preprocess(resize=o.resize or round(o.input_size * 256 / 224), mean=o.mean, std=o.std)
    labels = read_labels(o.labels) if o.labels else []
    src = load_source(arch=o.arch, module=o.module, weights=o.weights, num_classes=o.num_classes)
    original = copy.deepcopy(src.model).eval()
    # read the data first: a bad folder fails in seconds, not after pruning and conversion
    cal_set = open_set(o.calibration, role="calibration", count=o.calibration_limit)
    if o.evaluation == "natural":
        ev_set = open_set("natural", role="selection", count=o.eval_limit)
        ho_set = open_set("natural", role="held-out", count=o.eval_limit)
    elif o.evaluation:
        ev_set, ho_set = hold_out(open_set(o.evaluation, role="selection", count=o.eval_limit), every=2,
                                  names=("selection", "held out"))
    else:
        cal_set, ev_set, ho_set = hold_out(cal_set, three=True)
    stages: dict[str, dict[str, object]] = {}
    prune_info = None
    model = src.model
    if o.target_macs is not None or o.ratio is not None:
        res = run_prune(PruneOptions(
            target_macs=o.target_macs, ratio=o.ratio, input_size=o.input_size, finetune=o.finetune,
            epochs=o.epochs, preprocess=pre, output=o.report / "pruned.pt", torchscript=o.report / "pruned.ts",
            measure_speed=False), model=model)
        model, prune_info = res.model, res.as_dict()
    fp32 = convert_model(
        Source(model.eval(), src.description + (" (pruned)" if prune_info else ""), src.weights),
        ConvertOptions(name=f"{o.name}_fp32", repository=o.repository, input_size=(o.input_size,) * 2,
                       preprocess=pre, labels=labels, notes={"pruning": prune_info} if prune_info else {}),
    )
    tgt = detect_target() if o.target == "auto" else o.target
    q = run_quantize(QuantizeJob(
        source=fp32, repository=o.repository, name=o.name, calibration=cal_set, evaluation=ev_set, held_out=ho_set,
        settings=settings_for(tgt, o.method), max_drop=o.max_drop if ev_set is not None else None,
        measure_speed=False,
    ))
    with tempfile.TemporaryDirectory(prefix="vs-optimize-") as tmp:
        paths: dict[str, Path] = {}
        if prune_info:
            paths["original fp32"] = Path(tmp) / "original.onnx"
            export_onnx(original, torch.randn(2, 3, o.input_size, o.input_size), paths["original fp32"],
                        exporter="legacy")
        paths["pruned fp32" if prune_info else "fp32"] = fp32.model_path
        paths["int8"] = q.entry.model_path
        prep = Preprocessor(fp32.manifest.input, pre, draft=False)
        # the report's accuracy columns: the held-out images, which the guard never saw
        x_ev = load_tensors(ho_set, prep)
        ev_set = ho_set
        x_cal = load_tensors(cal_set, prep)[:8] if x_ev is None else x_ev[:8]
        speed = compare_speed(paths, x_cal, batches=(1, 8), repeats=10, rounds=3)
        ref = None
        targets = None
        for stage, path in paths.items():
            row: dict[str, object] = {
                "model": str(path.name if stage == "original fp32" else path.parent),
                "size_mb": round(file_size(path) / 1e6, 3), "macs_m": round(onnx_macs(path) / 1e6, 2),
                "b1_ms": speed[stage][1].median_ms, "b8_ms": speed[stage][8].median_ms,
                "b8_ips": round(speed[stage][8].throughput, 1),
            }
            if x_ev is not None and ev_set is not None:
                logits = predict(session(path), x_ev)
                if ref is None:
                    ref = logits
                    if ev_set.labelled:
                        mapping = map_classes(ev_set, fp32.manifest, logits.shape[1])
                        targets = np.asarray([mapping[t] for t in ev_set.targets or []])
                f = fidelity(ref, logits, targets, activation_of(fp32.manifest))
                row["top1_agreement_vs_first"] = round(f.top1_agreement, 4)
                if f.top1_agreement_confident is not None:
                    row["top1_agreement_confident_vs_first"] = round(f.top1_agreement_confident, 4)
                if targets is not None:
                    row["top1"] = round(float(np.mean(logits.argmax(1) == targets)), 4)
                    row["top5"] = round(float(topk_hits(logits, targets, 5).mean()), 4)
            stages[stage] = row
    report = {
        "name": o.name, "repository": str(o.repository), "fp32_entry": str(fp32.directory),
        "int8_entry": str(q.entry.directory), "calibration": cal_set.source,
        "evaluation": ev_set.source if ev_set is not None else None, "pruning": prune_info,
        "quantization": q.entry.manifest.provenance.notes, "stages": stages,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (o.report / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = render_report(report)
    (o.report / "report.md").write_text(md)
    return md + f"\nwrote {o.report / 'report.md'} and report.json"


def render_report(r: dict[str, object]) -> str:
    stages: dict[str, dict[str, object]] = r["stages"]  # type: ignore[assignment]
    first = next(iter(stages.values()))
    cols = ["size_mb", "macs_m", "b1_ms", "b8_ms", "b8_ips"]
    extra = [c for c in ("top1", "top5", "top1_agreement_vs_first", "top1_agreement_confident_vs_first")
             if c in first]
    head = ["stage", "size MB", "MACs M", "batch 1 ms", "batch 8 ms", "img/s (b8)", "× b8 vs first",
            *[c.replace("_vs_first", " vs first").replace("_", " ") for c in extra]]
    lines = [f"# optimize report: {r['name']}", "",
             f"Calibration: {r['calibration']}. Evaluation: {r['evaluation']}. "
             "Latency: ONNX Runtime CPU, 2 threads, median of 3 interleaved rounds × 10 runs.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = float(first["b8_ips"])  # type: ignore[arg-type]
    for stage, row in stages.items():
        vals = [stage, *[str(row[c]) for c in cols], f"{float(row['b8_ips']) / base:.2f}",  # type: ignore[arg-type]
                *[f"{float(row[c]):.2%}" if c in row else "" for c in extra]]  # type: ignore[arg-type]
        lines.append("| " + " | ".join(vals) + " |")
    notes: dict[str, object] = r["quantization"]  # type: ignore[assignment]
    guard: dict[str, object] = notes.get("guard", {})  # type: ignore[assignment]
    qs: dict[str, object] = notes.get("quantization", {})  # type: ignore[assignment]
    lines += ["", "## int8", "",
              f"- target {qs.get('target')}: {qs.get('activation_type')} activations × {qs.get('weight_type')} "
              f"weights, per-channel {qs.get('per_channel')}, reduce_range {qs.get('reduce_range')}, "
              f"calibration {qs.get('method')}",
              f"- guard: max drop {guard.get('max_drop')}, passed {guard.get('passed')}; kept in float: "
              f"{', '.join(guard.get('kept_in_float') or []) or 'nothing'}"]  # type: ignore[arg-type]
    if guard.get("fidelity"):
        f: dict[str, object] = guard["fidelity"]  # type: ignore[assignment]
        lines.append(f"- {f['drop_kind']}: {float(f['drop']):.2%}")  # type: ignore[arg-type]
    if r.get("pruning"):
        p: dict[str, object] = r["pruning"]  # type: ignore[assignment]
        lines += ["", "## pruning", "", f"- MACs {p['macs_before']} → {p['macs_after']} "
                  f"({float(p['macs_ratio']):.0%}), parameters {p['params_before']} → {p['params_after']}",  # type: ignore[arg-type]
                  f"- fine-tuning: {p.get('finetune') or 'none'}"]
    lines += ["", f"Entries: `{r['fp32_entry']}`, `{r['int8_entry']}`. Total {r['seconds']} s.", ""]
    return "\n".join(lines)
