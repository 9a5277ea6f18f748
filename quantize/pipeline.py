"""quantize = pre-process → calibrate → quantize → guard (keep sensitive nodes in float) → repository entry."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from service.imaging import Preprocessor
from service.manifest import Manifest, Provenance, sha256_file
from service.repository import ModelEntry, write_version

from .data import ImageSet, load_tensors, map_classes
from .guard import Fidelity, candidate_nodes, fidelity, rank_sensitive
from .int8 import QuantizeError, Settings, calibrate, preprocess_model, quantize_with
from .measure import compare_speed, predict, session
from .progress import bar

log = logging.getLogger("visionserve.quantize")


@dataclass
class QuantizeJob:
    source: ModelEntry
    repository: Path
    name: str
    calibration: ImageSet
    evaluation: ImageSet | None
    settings: Settings
    max_drop: float | None = 0.01
    max_excluded: float = 0.25  # share of the weighted nodes the guard may keep in float
    rank_by: str = "added"
    version: str | None = None
    overwrite: bool = False
    threads: int = 2
    measure_speed: bool = True
    derived_from: str | None = None


@dataclass
class GuardStep:
    excluded: int
    drop: float

    def as_dict(self) -> dict[str, float]:
        return {"excluded": self.excluded, "drop": round(self.drop, 5)}


@dataclass
class QuantizeResult:
    entry: ModelEntry
    fidelity: Fidelity | None
    first_fidelity: Fidelity | None
    excluded: list[str]
    steps: list[GuardStep]
    speed: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


def _tensors(images: ImageSet, prep: Preprocessor, what: str) -> np.ndarray:
    with bar(f"{what}: preprocessing {len(images)} images", len(images)) as advance:
        return load_tensors(images, prep, advance)


def run_quantize(job: QuantizeJob) -> QuantizeResult:
    """Quantize ``job.source`` into ``job.repository``; raise QuantizeError if the guard cannot be met."""
    started = time.perf_counter()
    m = job.source.manifest
    prep = Preprocessor(m.input, m.preprocess, draft=False)
    with tempfile.TemporaryDirectory(prefix="vs-quantize-") as tmp:
        work = Path(tmp)
        cal = _tensors(job.calibration, prep, "calibration")
        ev = _tensors(job.evaluation, prep, "evaluation") if job.evaluation is not None else None
        log.info("pre-processing the graph (quant_pre_process)")
        pre = preprocess_model(job.source.model_path, work / "pre.onnx")
        with bar(f"calibrating ({job.settings.method})", len(cal)) as advance:
            calib = calibrate(pre, cal, m.input.name, job.settings, work, progress=advance)
        targets = None
        ref = None
        if ev is not None:
            fp32 = session(job.source.model_path, job.threads)
            ref = predict(fp32, ev)
            if job.evaluation is not None and job.evaluation.labelled:
                mapping = map_classes(job.evaluation, m, ref.shape[1])
                targets = np.asarray([mapping[t] for t in job.evaluation.targets or []])

        def attempt(excluded: list[str], path: Path) -> Fidelity | None:
            s = replace(job.settings, nodes_to_exclude=tuple(excluded))
            quantize_with(pre, path, s, calib.cache)
            if ev is None or ref is None:
                return None
            return fidelity(ref, predict(session(path, job.threads), ev), targets)

        first_path = work / "int8-all.onnx"
        first = attempt(list(job.settings.nodes_to_exclude), first_path)
        final_path, final, excluded = first_path, first, list(job.settings.nodes_to_exclude)
        steps = [GuardStep(len(excluded), first.drop)] if first else []
        if first is not None:
            log.info("int8, everything quantized: %s; %s %.2f%%", first.summary(), first.drop_kind,
                     100 * first.drop)
        if first is not None and job.max_drop is not None and first.drop > job.max_drop:
            final_path, final, excluded, steps = _fall_back(job, pre, first_path, first, cal, attempt, work,
                                                               steps)
        speed = _speed(job, first_path, final_path, cal) if job.measure_speed else {}
        entry = _write(job, final_path, calib.images, final, first, excluded, steps, speed, started)
    return QuantizeResult(entry, final, first, excluded, steps, speed, time.perf_counter() - started)


def _fall_back(job: QuantizeJob, pre: Path, first_path: Path, first: Fidelity, cal: np.ndarray,
               attempt, work: Path, steps: list[GuardStep]) -> tuple[Path, Fidelity, list[str], list[GuardStep]]:
    """Keep the most sensitive nodes in float, more and more, until the drop fits the budget."""
    assert job.max_drop is not None
    log.info("over budget (max drop %.2f%%): ranking nodes by the quantization error they add",
             100 * job.max_drop)
    ranking = rank_sensitive(pre, first_path, cal[:16], job.source.manifest.input.name, how=job.rank_by)
    fixed = list(job.settings.nodes_to_exclude)
    order = [n for n, _ in ranking if n not in fixed]
    limit = int(job.max_excluded * len(candidate_nodes(pre)))
    sizes = [k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128) if k <= min(limit, len(order))]
    best: tuple[Path, Fidelity, list[str]] | None = None
    lo = 0
    for k in sizes:
        path = work / f"int8-x{k}.onnx"
        f = attempt(fixed + order[:k], path)
        steps.append(GuardStep(len(fixed) + k, f.drop))
        log.info("  %d kept in float: %s %.2f%%", len(fixed) + k, f.drop_kind, 100 * f.drop)
        if f.drop <= job.max_drop:
            best = (path, f, fixed + order[:k])
            break
        lo = k
    if best is None:
        worst = min(steps, key=lambda s: s.drop)
        raise QuantizeError(
            f"the int8 model cannot meet --max-drop {job.max_drop:.2%}: its {steps[0].drop:.2%} "
            f"({first.drop_kind}) only came down to {worst.drop:.2%} with {worst.excluded} of the most sensitive "
            f"nodes kept in float (the limit is {limit}, --max-excluded {job.max_excluded:.0%}). Try another "
            f"--method or --target, more calibration images, or a larger --max-drop."
        )
    # the smallest count between the last failing and the first passing size that still passes
    hi = len(best[2]) - len(fixed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        path = work / f"int8-x{mid}.onnx"
        f = attempt(fixed + order[:mid], path)
        steps.append(GuardStep(len(fixed) + mid, f.drop))
        if f.drop <= job.max_drop:
            best, hi = (path, f, fixed + order[:mid]), mid
        else:
            lo = mid
    return best[0], best[1], best[2], steps


def _speed(job: QuantizeJob, first: Path, final: Path, cal: np.ndarray) -> dict[str, dict[str, float]]:
    paths = {"fp32": job.source.model_path, "int8": final}
    if final != first:
        paths["int8_all_quantized"] = first
    res = compare_speed(paths, cal[:8], batches=(1, 8), repeats=10, rounds=3, threads=job.threads)
    out: dict[str, dict[str, float]] = {}
    for k, per in res.items():
        out[k] = {f"b{b}_ms": lat.median_ms for b, lat in per.items()}
        out[k]["b8_ips"] = round(per[8].throughput, 1)
    out["ratio"] = {"int8_vs_fp32_b8": round(out["int8"]["b8_ips"] / out["fp32"]["b8_ips"], 3)}
    if "int8_all_quantized" in out:
        out["ratio"]["float_nodes_cost_b8"] = round(
            out["int8"]["b8_ms"] / out["int8_all_quantized"]["b8_ms"], 3)
    return out


def _write(job: QuantizeJob, model: Path, n_cal: int, final: Fidelity | None, first: Fidelity | None,
           excluded: list[str], steps: list[GuardStep], speed: dict[str, dict[str, float]], started: float
           ) -> ModelEntry:
    import onnx

    src = job.source.manifest
    opset = next((o.version for o in onnx.load(str(model), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), None)
    notes: dict[str, object] = {
        "quantization": {**replace(job.settings, nodes_to_exclude=tuple(excluded)).as_notes(),
                         "format": "QDQ", "pre_process": "quant_pre_process"},
        "calibration": {"source": job.calibration.source, "images": n_cal},
        "guard": {
            "evaluation": job.evaluation.source if job.evaluation is not None else None,
            "max_drop": job.max_drop, "ranked_by": job.rank_by,
            "passed": final is not None and (job.max_drop is None or final.drop <= job.max_drop),
            "fidelity": final.as_dict() if final else None,
            "fidelity_all_quantized": first.as_dict() if first else None,
            "kept_in_float": excluded, "steps": [s.as_dict() for s in steps],
        },
        "speed": speed,
        "quantize_seconds": round(time.perf_counter() - started, 1),
    }

    def build(staging: Path, version: str) -> Manifest:
        shutil.copyfile(model, staging / "model.onnx")
        prov = Provenance(
            source=f"quantize:{src.name}:{src.version}", weights=src.provenance.weights,
            weights_sha256=src.provenance.weights_sha256, exporter="onnxruntime.quantization",
            opset=opset, torch_version="", onnx_sha256=sha256_file(staging / "model.onnx"),
            parity=None, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            derived_from=job.derived_from or f"{src.name}:{src.version}", notes=notes,
        )
        return src.model_copy(update={"name": job.name, "version": version, "provenance": prov})

    return write_version(job.repository, job.name, job.version, build, overwrite=job.overwrite)
