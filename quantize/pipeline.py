"""quantize = pre-process → calibrate → quantize → guard → held-out report → slim → speed guard → entry.

Three image sets that share nothing: ``calibration`` fits the ranges, ``evaluation`` (the guard's selection
set) decides what stays in float, ``held_out`` is only measured — its figure, with a bootstrap interval, is
the one the manifest and the summary report (quantize/heldout.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from visionserve.service.imaging import Preprocessor
from visionserve.service.manifest import Manifest, Provenance, sha256_file
from visionserve.service.repository import ModelEntry, write_version

from .data import ImageSet, load_tensors, map_classes
from .detect import DetectFidelity, check_quantizable, detect_fidelity, detector_float_nodes
from .evaluate_embed import Episodes
from .guard import Fidelity, activation_of, candidate_nodes, fidelity, guard_metric, rank_sensitive
from .guard_embed import EmbedFidelity, EmbedHeldOut, embed_fidelity, embed_held_out, gate, one_shot_classes
from .heldout import HeldOut, held_out
from .int8 import QuantizeError, Settings, calibrate, preprocess_model, quantize_with
from .measure import predict, session
from .progress import bar
from .slim import slim

log = logging.getLogger("visionserve.quantize")
AnyFidelity = Fidelity | DetectFidelity | EmbedFidelity  # what the guard compares, per task


@dataclass
class QuantizeJob:
    source: ModelEntry
    repository: Path
    name: str
    calibration: ImageSet
    evaluation: ImageSet | None  # the guard's selection set
    settings: Settings
    held_out: ImageSet | None = None  # measured only: the figure reported
    max_drop: float | None = 0.01
    max_excluded: float = 0.25  # share of the weighted nodes the guard may keep in float
    rank_by: str = "added"
    version: str | None = None
    overwrite: bool = False
    threads: int = 2
    measure_speed: bool = True
    derived_from: str | None = None
    # detectors (manifest.task == "detect"): the guard's COCO json and its images folder; the drop is
    # then the absolute mAP@0.5 drop (0.01 = 1 point)
    detect_eval: tuple[Path, Path] | None = None
    detect_held_out: tuple[Path, Path] | None = None
    # the speed guard (quantize/speed.py): int8 under min_speedup × fp32 throughput at serving_batch is refused
    min_speedup: float | None = 1.2
    allow_slow: bool = False
    serving_batch: int = 8
    # calibration inputs made elsewhere (``--calibration synthetic``): used instead of ``calibration``'s images
    calibration_tensors: np.ndarray | None = None
    bias_correction: str = "fast"  # NNCF: fast, full or none (chosen on the selection set: docs/optimize.md)
    # embed models (quantize/guard_embed.py): ``max_drop`` is 1 − the smallest mean cosine to fp32 allowed (on
    # the selection set, then on the held-out set); the held-out one-shot accuracy may fall this much at most
    max_oneshot_drop: float | None = None
    episodes: Episodes = field(default_factory=Episodes)


def show_drop(drop: float, kind: str) -> str:
    """A drop as people read it: points of mAP for detectors, 1 − cosine for embeddings, percent otherwise."""
    if kind.startswith("cosine"):
        return f"{drop:.4f} (mean cosine {1 - drop:.4f})"
    return f"{100 * drop:.2f} pt" if kind.startswith("mAP") else f"{drop:.2%}"


@dataclass
class GuardStep:
    excluded: int
    drop: float

    def as_dict(self) -> dict[str, float]:
        return {"excluded": self.excluded, "drop": round(self.drop, 5)}


@dataclass
class QuantizeResult:
    entry: ModelEntry
    fidelity: AnyFidelity | None
    first_fidelity: AnyFidelity | None
    excluded: list[str]
    steps: list[GuardStep]
    speed: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    held_out: HeldOut | DetectFidelity | EmbedHeldOut | None = None
    size: dict[str, object] = field(default_factory=dict)


def _tensors(images: ImageSet, prep: Preprocessor, what: str) -> np.ndarray:
    with bar(f"{what}: preprocessing {len(images)} images", len(images)) as advance:
        return load_tensors(images, prep, advance)


def run_quantize(job: QuantizeJob) -> QuantizeResult:
    """Quantize ``job.source`` into ``job.repository``; raise QuantizeError if the guard cannot be met."""
    started = time.perf_counter()
    m = job.source.manifest
    detect = m.task == "detect"
    embed = guard_metric(m.task) == "cosine"  # the task's declared guard (service/tasks: embed)
    if detect:
        check_quantizable(job.source)
    prep = Preprocessor(m.input, m.preprocess, draft=False)
    with tempfile.TemporaryDirectory(prefix="vs-quantize-") as tmp:
        work = Path(tmp)
        cal = job.calibration_tensors if job.calibration_tensors is not None else _tensors(
            job.calibration, prep, "calibration")
        ev = _tensors(job.evaluation, prep, "selection") if job.evaluation is not None and not detect else None
        ho = _tensors(job.held_out, prep, "held-out") if job.held_out is not None and not detect else None
        log.info("pre-processing the graph (quant_pre_process)")
        pre = preprocess_model(job.source.model_path, work / "pre.onnx")
        ref_map = None
        if detect:
            # what works for detectors (quantize/detect.py): u8 activations, box tail + first conv in fp32
            keep = list(dict.fromkeys([*job.settings.nodes_to_exclude, *detector_float_nodes(pre, job.source)]))
            job = replace(job, settings=replace(job.settings, activation_type="uint8",
                                                nodes_to_exclude=tuple(keep)))
            log.info("detector: uint8 activations; kept in float: %s", ", ".join(keep))
            if job.detect_eval is not None:
                from .evaluate_detect import evaluate_detection

                coco, images_dir = job.detect_eval
                ref_map = evaluate_detection(job.source, coco, images_dir, threads=job.threads)
                log.info("fp32: mAP@0.5 %.3f, mAP@[.5:.95] %.3f on %d images", ref_map["mAP@0.5"],
                         ref_map["mAP@[.5:.95]"], ref_map["images"])
        nncf = job.settings.method == "nncf"
        calib = None
        if not nncf:
            with bar(f"calibrating ({job.settings.method})", len(cal)) as advance:
                calib = calibrate(pre, cal, m.input.name, job.settings, work, progress=advance)
        targets = classes = None
        ref = None
        if ev is not None:
            fp32 = session(job.source.model_path, job.threads)
            ref = predict(fp32, ev)
            if embed and job.evaluation is not None:
                classes = one_shot_classes(job.evaluation.targets, job.evaluation.groups)
            elif job.evaluation is not None and job.evaluation.labelled:
                mapping = map_classes(job.evaluation, m, ref.shape[1])
                targets = np.asarray([mapping[t] for t in job.evaluation.targets or []])

        def build(excluded: list[str], path: Path) -> None:
            raw = path.with_suffix(".raw.onnx")
            if nncf:
                from .nncf_ptq import nncf_quantize

                log.info("quantizing with NNCF (MinMax ranges, %s bias correction), %d in float",
                         job.bias_correction, len(excluded))
                nncf_quantize(pre, raw, cal, m.input.name, ignored=tuple(excluded),
                              bias_correction=job.bias_correction)
            else:
                assert calib is not None
                quantize_with(pre, raw, replace(job.settings, nodes_to_exclude=tuple(excluded)), calib.cache)
            slimmed[path] = slim(raw, path).as_dict()
            raw.unlink()

        slimmed: dict[Path, dict[str, int]] = {}

        def attempt(excluded: list[str], path: Path) -> AnyFidelity | None:
            build(excluded, path)
            if detect:
                if ref_map is None or job.detect_eval is None:
                    return None
                from .evaluate_detect import evaluate_detection

                return detect_fidelity(ref_map, evaluate_detection(
                    job.source, job.detect_eval[0], job.detect_eval[1], onnx_path=path, threads=job.threads))
            if ev is None or ref is None:
                return None
            if embed:
                return embed_fidelity(ref, predict(session(path, job.threads), ev), classes, job.episodes)
            return fidelity(ref, predict(session(path, job.threads), ev), targets, activation_of(m))

        first_path = work / "int8-all.onnx"
        first = attempt(list(job.settings.nodes_to_exclude), first_path)
        final_path, final, excluded = first_path, first, list(job.settings.nodes_to_exclude)
        steps = [GuardStep(len(excluded), first.drop)] if first else []
        if first is not None:
            log.info("int8, everything quantized: %s; %s %s", first.summary(), first.drop_kind,
                     show_drop(first.drop, first.drop_kind))
        if first is not None and job.max_drop is not None and first.drop > job.max_drop:
            rank_on = first_path
            if nncf:
                # qdq_loss_debug pairs tensors by ONNX Runtime's QDQ names: rank on an ORT MinMax model instead
                s_ort = replace(job.settings, method="minmax")
                c = calibrate(pre, cal, m.input.name, s_ort, work)
                rank_on = quantize_with(pre, work / "rank-ort.onnx", s_ort, c.cache)
            final_path, final, excluded, steps = _fall_back(job, pre, rank_on, first, cal, attempt, work, steps)
        report = _held_out(job, final_path, ho, None if embed else targets_of(job.held_out, m, job.source.model_path))
        if embed:  # the held-out figures accept or refuse (quantize/guard_embed.py)
            gate(report.fidelity if isinstance(report, EmbedHeldOut) else None,
                 final if isinstance(final, EmbedFidelity) else None, job.max_drop, job.max_oneshot_drop)
        size = {"fp32_bytes": job.source.model_path.stat().st_size, "int8_bytes": final_path.stat().st_size,
                "slim": slimmed.get(final_path, {})}
        size["ratio"] = round(int(size["int8_bytes"]) / int(size["fp32_bytes"]), 4)  # type: ignore[call-overload]
        speed: dict[str, dict[str, float]] = {}
        if job.measure_speed:
            from . import speed as speed_guard

            speed = speed_guard.measure(job.source.model_path, final_path, first_path, ev if ev is not None else cal,
                                        job.serving_batch, job.threads)
            if job.min_speedup is not None:
                speed_guard.check(speed, job.min_speedup, job.allow_slow, job.settings.target)
        entry = _write(job, final_path, len(cal), final, first, excluded, steps, speed, started, report, size)
    return QuantizeResult(entry, final, first, excluded, steps, speed, time.perf_counter() - started, report, size)


def targets_of(images: ImageSet | None, m: Manifest, model: Path) -> np.ndarray | None:
    """The model class index of each labelled image (None for unlabelled sets)."""
    if images is None or not images.labelled:
        return None
    n_out = session(model).get_outputs()[0].shape[-1]
    mapping = map_classes(images, m, n_out if isinstance(n_out, int) else 10**9)
    return np.asarray([mapping[t] for t in images.targets or []])


def _held_out(job: QuantizeJob, model: Path, ho: np.ndarray | None, targets: np.ndarray | None
              ) -> HeldOut | DetectFidelity | EmbedHeldOut | None:
    """The reported figure: int8 against fp32 on the held-out set, which no decision above has seen."""
    if job.detect_held_out is not None:
        from .evaluate_detect import evaluate_detection
        from .map_bootstrap import drop_ci

        coco, images = job.detect_held_out
        sinks: tuple[dict, dict] = ({}, {})
        ref = evaluate_detection(job.source, coco, images, threads=job.threads, sink=sinks[0])
        got = evaluate_detection(job.source, coco, images, onnx_path=model, threads=job.threads, sink=sinks[1])
        ci = drop_ci(sinks[0]["coco_eval"], sinks[1]["coco_eval"]) if all(sinks) else None
        result = detect_fidelity(ref, got, ci)
    elif ho is not None and job.held_out is not None and guard_metric(job.source.manifest.task) == "cosine":
        ref = predict(session(job.source.model_path, job.threads), ho)
        result = embed_held_out(ref, predict(session(model, job.threads), ho),
                                one_shot_classes(job.held_out.targets, job.held_out.groups), job.held_out.groups,
                                job.held_out.source, job.episodes)
    elif ho is not None and job.held_out is not None:
        ref = predict(session(job.source.model_path, job.threads), ho)
        result = held_out(ref, predict(session(model, job.threads), ho), targets, job.held_out.groups,
                          job.held_out.source, activation_of(job.source.manifest))
    else:
        return None
    log.info("%s", result.summary())
    return result


def _fall_back(job: QuantizeJob, pre: Path, rank_on: Path, first: AnyFidelity, cal: np.ndarray,
               attempt, work: Path, steps: list[GuardStep]) -> tuple[Path, Fidelity, list[str], list[GuardStep]]:
    """Keep the most sensitive nodes in float, more and more, until the drop fits the budget."""
    assert job.max_drop is not None
    kind = first.drop_kind
    log.info("over budget (max drop %s): ranking nodes by the quantization error they add",
             show_drop(job.max_drop, kind))
    ranking = rank_sensitive(pre, rank_on, cal[:16], job.source.manifest.input.name, how=job.rank_by)
    fixed = list(job.settings.nodes_to_exclude)
    order = [n for n, _ in ranking if n not in fixed]
    limit = int(job.max_excluded * len(candidate_nodes(pre)))
    sizes = [k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128) if k <= min(limit, len(order))]
    best: tuple[Path, AnyFidelity, list[str]] | None = None
    lo = 0
    for k in sizes:
        path = work / f"int8-x{k}.onnx"
        f = attempt(fixed + order[:k], path)
        steps.append(GuardStep(len(fixed) + k, f.drop))
        log.info("  %d kept in float: %s %s", len(fixed) + k, f.drop_kind, show_drop(f.drop, kind))
        if f.drop <= job.max_drop:
            best = (path, f, fixed + order[:k])
            break
        lo = k
    if best is None:
        worst = min(steps, key=lambda s: s.drop)
        raise QuantizeError(
            f"the int8 model cannot meet --max-drop {job.max_drop:g} ({show_drop(job.max_drop, kind)}): its "
            f"{show_drop(steps[0].drop, kind)} ({kind}) only came down to {show_drop(worst.drop, kind)} with "
            f"{worst.excluded} nodes kept in float ({len(fixed)} from the start, then up to {limit} of the most "
            f"sensitive: --max-excluded {job.max_excluded:.0%}). Try another "
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


def _write(job: QuantizeJob, model: Path, n_cal: int, final: AnyFidelity | None,
           first: AnyFidelity | None,
           excluded: list[str], steps: list[GuardStep], speed: dict[str, dict[str, float]], started: float,
           report: HeldOut | DetectFidelity | EmbedHeldOut | None, size: dict[str, object]) -> ModelEntry:
    import onnx

    src = job.source.manifest
    opset = next((o.version for o in onnx.load(str(model), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), None)
    notes: dict[str, object] = {
        "quantization": {**replace(job.settings, nodes_to_exclude=tuple(excluded)).as_notes(),
                         "format": "QDQ", "pre_process": "quant_pre_process",
                         **({"engine": "nncf", "bias_correction": job.bias_correction}
                            if job.settings.method == "nncf" else {"engine": "onnxruntime"})},
        "calibration": {"source": job.calibration.source, "images": n_cal},
        "held_out": (report.as_dict() | ({"coco": str(job.detect_held_out[0])} if job.detect_held_out else {})
                     if report is not None else None),
        "size": size,
        "guard": {
            "evaluation": (job.evaluation.source if job.evaluation is not None else
                           f"{job.detect_eval[0]} (images {job.detect_eval[1]})" if job.detect_eval else None),
            "max_drop": job.max_drop, "ranked_by": job.rank_by,
            **({"metric": "cosine", "min_cosine": None if job.max_drop is None else round(1 - job.max_drop, 6),
                "max_oneshot_drop": job.max_oneshot_drop, "ways": job.episodes.ways,
                "episodes": job.episodes.episodes} if guard_metric(src.task) == "cosine" else {}),
            "passed": final is not None and (job.max_drop is None or final.drop <= job.max_drop),
            "fidelity": final.as_dict() if final else None,
            "fidelity_all_quantized": first.as_dict() if first else None,
            "kept_in_float": excluded, "steps": [s.as_dict() for s in steps],
        },
        "speed": speed,
        "quantize_seconds": round(time.perf_counter() - started, 1),
    }
    if isinstance(final, DetectFidelity):
        notes["detection"] = {"fp32": {"mAP@0.5": final.fp32_map50, "mAP@[.5:.95]": final.fp32_map},
                              "int8": {"mAP@0.5": final.int8_map50, "mAP@[.5:.95]": final.int8_map},
                              "mAP@0.5_drop": round(final.drop, 5), "images": final.images}

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
