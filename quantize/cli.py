"""``visionserve quantize | prune | evaluate | optimize``. Imports torch / onnxruntime only when a command runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from visionserve.service.cli_util import fail

Opt = typer.Option
Arg = typer.Argument


def _setup_logging() -> None:
    # our progress at INFO; onnxruntime.quantization logs a lot at INFO/WARNING through the root logger
    logging.basicConfig(level=logging.ERROR, format="%(message)s", force=True)
    for ours in ("visionserve.quantize", "visionserve.convert"):
        logging.getLogger(ours).setLevel(logging.INFO)


def quantize(
    model: Annotated[str, Arg(help="repository model NAME[:VERSION], or an .onnx file")],
    repository: Annotated[Path, Opt("--repository", "-r", help="model repository (read and written)")],
    calibration: Annotated[str, Opt(help="folder of calibration images, 'natural' (built-in photo crops) or "
                                         "'synthetic' (distilled from the model's BatchNorm statistics; needs "
                                         "--weights)")],
    eval: Annotated[Optional[str], Opt("--eval", help="the guard's selection images (ImageFolder for accuracy), "
                                                      "or 'natural'; detectors: a COCO annotations .json")] = None,
    eval_images: Annotated[Optional[Path], Opt("--eval-images", help="detectors: the images of the --eval COCO "
                                                                     "json (default: images/ beside it)")] = None,
    held_out: Annotated[Optional[str], Opt("--held-out", help="images only measured, never used to decide: the "
                                                              "figure reported (default: half of --eval; "
                                                              "detectors: a COCO .json)")] = None,
    held_out_images: Annotated[Optional[Path], Opt(help="detectors: the images of the --held-out json")] = None,
    max_drop: Annotated[float, Opt(help="largest allowed drop (fraction): accuracy with labels, else "
                                        "top-1 disagreement on confident images; detectors: absolute "
                                        "mAP@0.5 (0.01 = 1 point); embed models: see --min-cosine")] = 0.01,
    target: Annotated[str, Opt(help="auto, x86-novnni, x86-vnni, arm or tensorrt")] = "auto",
    method: Annotated[str, Opt(help="auto (nncf where the target takes it), nncf (MinMax + bias correction), "
                                    "or ONNX Runtime's minmax, entropy, percentile")] = "auto",
    bias_correction: Annotated[str, Opt(help="nncf: fast (default), full or none")] = "fast",
    min_speedup: Annotated[float, Opt(help="refuse int8 slower than this × fp32 throughput at --serving-batch")
                           ] = 1.2,
    allow_slow: Annotated[bool, Opt("--allow-slow", help="write the int8 model even under --min-speedup")] = False,
    serving_batch: Annotated[int, Opt(help="the batch size the speed guard times")] = 8,
    weights: Annotated[Optional[Path], Opt(help="--calibration synthetic: the PyTorch weights of the model")] = None,
    arch: Annotated[Optional[str], Opt(help="--calibration synthetic: torchvision architecture (default: from "
                                            "the entry's provenance)")] = None,
    module: Annotated[Optional[str], Opt(help="--calibration synthetic: 'package.module:factory'")] = None,
    name: Annotated[Optional[str], Opt(help="name of the new entry (default <model>_int8)")] = None,
    version: Annotated[Optional[str], Opt(help="version to write (default: next)")] = None,
    limit: Annotated[int, Opt(help="use at most this many calibration images")] = 256,
    eval_limit: Annotated[int, Opt(help="use at most this many selection (and held-out) images")] = 600,
    max_excluded: Annotated[float, Opt(help="share of weighted nodes the guard may keep in float")] = 0.25,
    exclude: Annotated[Optional[str], Opt(help="nodes to keep in float from the start, comma-separated")] = None,
    reduce_range: Annotated[Optional[bool], Opt("--reduce-range/--no-reduce-range",
                                                help="7-bit weights (default: as the target says)")] = None,
    per_channel: Annotated[bool, Opt("--per-channel/--per-tensor")] = True,
    labels: Annotated[Optional[Path], Opt(help="class names for an .onnx input, one per line")] = None,
    no_guard: Annotated[bool, Opt("--no-guard", help="skip the accuracy guard (not recommended)")] = False,
    threads: Annotated[int, Opt(help="ONNX Runtime threads for evaluation and timing")] = 2,
    overwrite: Annotated[bool, Opt(help="replace an existing version")] = False,
    min_cosine: Annotated[float, Opt(help="embed models: smallest mean cosine similarity of int8 to fp32 "
                                          "embeddings (selection set, then held-out set)")] = 0.97,
    max_oneshot_drop: Annotated[float, Opt(help="embed models: largest drop of held-out N-way 1-shot accuracy "
                                                "(fraction: 0.02 = 2 points)")] = 0.02,
    ways: Annotated[int, Opt(help="embed models: classes per one-shot episode")] = 5,
    episodes: Annotated[int, Opt(help="embed models: one-shot episodes (the same ones for fp32 and int8)")] = 500,
) -> None:
    """Static int8 (QDQ) quantization with an accuracy guard and a speed guard; writes a new repository entry.

    Embedding models are guarded on the cosine similarity of their int8 embeddings to the fp32 ones and on
    N-way 1-shot accuracy (classes: the ImageFolder's, or the photo each ``natural`` crop came from)."""
    _setup_logging()
    from pydantic import ValidationError

    from visionserve.service.repository import RepositoryError

    from .data import DatasetError, hold_out, open_set
    from .evaluate_embed import Episodes
    from .int8 import QuantizeError, detect_target, settings_for
    from .models import resolve
    from .pipeline import QuantizeJob, run_quantize

    try:
        label_list = [s.strip() for s in labels.read_text().splitlines() if s.strip()] if labels else None
        entry = resolve(model, repository, label_list)
        from .guard import GUARD_METRICS, guard_metric

        metric = guard_metric(entry.manifest.task)
        detect = entry.manifest.task == "detect"
        embed = metric == "cosine"
        if metric not in GUARD_METRICS:
            fail(f"quantize has no accuracy guard for {entry.manifest.task} models ({entry.manifest.name}); it "
                 f"handles classifiers, detectors and embedding models")
        if embed and not (0.0 < min_cosine <= 1.0):
            fail(f"--min-cosine is a cosine similarity in (0, 1], not {min_cosine:g}")
        if embed and (ways < 2 or episodes < 1):
            fail("--ways must be at least 2 and --episodes at least 1")
        if detect:
            from .detect import check_quantizable

            check_quantizable(entry)
        tgt = detect_target() if target == "auto" else target
        overrides: dict[str, object] = {"per_channel": per_channel}
        if reduce_range is not None:
            overrides["reduce_range"] = reduce_range
        if exclude:
            overrides["nodes_to_exclude"] = tuple(n.strip() for n in exclude.split(",") if n.strip())
        if detect and method == "auto":
            method = "minmax"  # measured for detectors (docs/detection.md)
        settings = settings_for(tgt, method, **overrides)
        if bias_correction not in ("full", "fast", "none"):
            fail(f"--bias-correction is full, fast or none, not {bias_correction!r}")
        synthetic = None
        if calibration == "synthetic":
            from .synthetic import synthetic_for

            synthetic = synthetic_for(entry, weights, arch, module, count=min(limit, 32))
            cal = _described(f"synthetic ({len(synthetic)} inputs distilled from BatchNorm statistics)")
        else:
            cal = _limit(open_set(calibration, role="calibration", count=limit), limit)
        detect_eval = detect_held = None
        ev = ho = None
        if detect:
            if eval:
                detect_eval = _coco(eval, eval_images, "--eval")
            elif not no_guard:
                fail("a detector's guard needs --eval ANNOTATIONS.json (COCO, with --eval-images or images/ "
                     "beside it); or --no-guard")
            if held_out:
                detect_held = _coco(held_out, held_out_images, "--held-out")
        else:
            ev = _limit(open_set(eval, role="selection", count=eval_limit), eval_limit) if eval else None
            if held_out:
                ho = _limit(open_set(held_out, role="held-out", count=eval_limit), eval_limit)
            elif ev is not None and eval == "natural":
                ho = open_set("natural", role="held-out", count=eval_limit)
            elif ev is not None:
                ev, ho = hold_out(ev, every=2, names=("selection", "held out"))
                typer.echo(f"no --held-out: {len(ho)} of the --eval images are held out for the report")
        if ev is None and not no_guard and not detect:
            if synthetic is not None:
                fail("--calibration synthetic has no images to hold out: give --eval (and --held-out)")
            cal, ev, ho = hold_out(cal, three=True)
            typer.echo(f"no --eval: {len(ev)} of the calibration images select, {len(ho)} are held out")
        job = QuantizeJob(
            source=entry, repository=repository, name=name or f"{entry.manifest.name}_int8",
            calibration=cal, evaluation=ev, settings=settings,
            max_drop=None if no_guard else (round(1.0 - min_cosine, 9) if embed else max_drop),
            max_excluded=max_excluded, version=version, overwrite=overwrite, threads=threads,
            derived_from=None if model.endswith(".onnx") else
            f"{entry.manifest.name}:{entry.manifest.version}", detect_eval=detect_eval, held_out=ho,
            detect_held_out=detect_held, min_speedup=min_speedup, allow_slow=allow_slow,
            serving_batch=serving_batch, calibration_tensors=synthetic, bias_correction=bias_correction,
            max_oneshot_drop=None if no_guard or not embed else max_oneshot_drop,
            episodes=Episodes(ways=ways, episodes=episodes),
        )
        result = run_quantize(job)
    except (QuantizeError, DatasetError, RepositoryError, ValidationError, ValueError, OSError) as e:
        fail(str(e))
    typer.echo(_quantize_summary(result))


def _coco(spec: str, images: Optional[Path], flag: str) -> tuple[Path, Path]:
    coco = Path(spec)
    if coco.suffix.lower() != ".json" or not coco.is_file():
        fail(f"{flag} for a detector is a COCO annotations .json; {spec} is not one")
    pair = (coco, images or coco.parent / "images")
    if not pair[1].is_dir():
        fail(f"the images of {coco} are not in {pair[1]}; give {flag}-images DIR")
    return pair


def _described(source: str):
    from .data import ImageSet

    return ImageSet([], source)


def _limit(images, n: int):
    if len(images) > n:
        import numpy as np

        keep = np.linspace(0, len(images) - 1, n).round().astype(int)
        images.items = [images.items[i] for i in keep]
        if images.targets is not None:
            images.targets = [images.targets[i] for i in keep]
        if images.groups is not None:
            images.groups = [images.groups[i] for i in keep]
    return images


def _quantize_summary(result) -> str:
    m = result.entry.manifest
    lines = [f"wrote {result.entry.directory} ({result.seconds:.0f} s)"]
    if result.first_fidelity is not None:
        first = "before fallback" if m.task == "detect" else "all quantized"  # detectors: tail in float
        lines.append(f"  selection, {first + ':':<15}{result.first_fidelity.summary()}")
    if result.fidelity is not None:
        f = result.fidelity
        from .pipeline import show_drop

        lines.append(f"  selection, final:         {f.summary()}; {f.drop_kind} {show_drop(f.drop, f.drop_kind)}")
    if result.held_out is not None:
        lines.append(f"  {result.held_out.summary()}")
    q = m.provenance.notes.get("quantization", {})
    lines.append(f"  settings: target {q.get('target')}, {q.get('activation_type')} activations × "  # type: ignore[union-attr]
                 f"{q.get('weight_type')} weights, reduce_range {q.get('reduce_range')}, "  # type: ignore[union-attr]
                 f"method {q.get('method')}")  # type: ignore[union-attr]
    lines.append(f"  kept in float: {', '.join(result.excluded) if result.excluded else 'nothing'}")
    if result.size:
        lines.append(f"  size: {int(result.size['int8_bytes']) / 1e6:.2f} MB, {float(result.size['ratio']):.2f} "
                     f"of fp32 ({int(result.size['fp32_bytes']) / 1e6:.2f} MB)")
    sp = result.speed
    if sp:
        from .speed import speedup

        b = int(sp["ratio"]["serving_batch"])
        lines.append(f"  batch {b}: fp32 {sp['fp32'][f'b{b}_ms']:.1f} ms, int8 {sp['int8'][f'b{b}_ms']:.1f} ms "
                     f"(× {speedup(sp):.2f} throughput)")
        if speedup(sp) < 1.0:
            lines.append("  warning: int8 is not faster than fp32 on this machine (written because of "
                         "--allow-slow)")
        if "int8_all_quantized" in sp:
            lines.append(f"  keeping those in float costs × {sp['ratio'][f'float_nodes_cost_b{b}']:.2f} latency "
                         f"vs all quantized ({sp['int8_all_quantized'][f'b{b}_ms']:.1f} ms)")
    return "\n".join(lines)


def evaluate(
    model: Annotated[str, Arg(help="repository model NAME[:VERSION], or an .onnx file")],
    dataset: Annotated[Path, Opt("--dataset", "-d", help="ImageFolder (classify) or COCO .json (detect)")],
    repository: Annotated[Optional[Path], Opt("--repository", "-r", help="model repository")] = None,
    labels: Annotated[Optional[Path], Opt(help="class names for an .onnx input")] = None,
    limit: Annotated[Optional[int], Opt(help="evaluate at most this many images")] = None,
    json_out: Annotated[Optional[Path], Opt("--json", help="also write the full result as JSON")] = None,
    threads: Annotated[int, Opt(help="ONNX Runtime threads")] = 2,
    ways: Annotated[int, Opt(help="embed models: classes per N-way 1-shot episode")] = 5,
    episodes: Annotated[int, Opt(help="embed models: one-shot episodes to average over")] = 500,
) -> None:
    """Accuracy of a model on a labelled dataset (top-1/top-5, per class, confusions; N-way 1-shot for embed)."""
    from visionserve.service.repository import RepositoryError

    from .data import DatasetError
    from .evaluate import EvalOptions, render
    from .evaluate import evaluate as run

    try:
        label_list = [s.strip() for s in labels.read_text().splitlines() if s.strip()] if labels else None
        from .models import resolve

        entry = resolve(model, repository, label_list)
        result = run(entry, dataset, EvalOptions(threads=threads, limit=limit, ways=ways, episodes=episodes))
    except (DatasetError, RepositoryError, OSError, ValueError) as e:
        fail(str(e))
    typer.echo(render(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


def prune(
    output: Annotated[Path, Opt("--output", "-o", help="where to save the pruned model (.pt, whole module)")],
    arch: Annotated[Optional[str], Opt(help="torchvision architecture")] = None,
    module: Annotated[Optional[str], Opt(help="any nn.Module: 'package.module:factory'")] = None,
    weights: Annotated[Optional[Path], Opt(help="state_dict or checkpoint")] = None,
    num_classes: Annotated[Optional[int], Opt(help="classes of a torchvision --arch")] = None,
    target_macs: Annotated[Optional[float], Opt(help="keep this fraction of the MACs, e.g. 0.5")] = None,
    ratio: Annotated[Optional[float], Opt(help="channel pruning ratio per layer, e.g. 0.3")] = None,
    input_size: Annotated[int, Opt(help="square input side for tracing")] = 224,
    round_to: Annotated[int, Opt(help="round channel counts to a multiple of this")] = 8,
    finetune: Annotated[Optional[Path], Opt(help="ImageFolder to fine-tune on after pruning")] = None,
    epochs: Annotated[int, Opt(help="fine-tuning epochs")] = 1,
    lr: Annotated[float, Opt(help="fine-tuning learning rate")] = 1e-3,
    distill: Annotated[bool, Opt("--distill/--no-distill", help="distil from the unpruned model")] = True,
    torchscript: Annotated[Optional[Path], Opt(help="also write a TorchScript file (for convert)")] = None,
    resize: Annotated[Optional[int], Opt(help="fine-tuning preprocessing: shorter side before the crop")] = None,
    mean: Annotated[str, Opt(help="fine-tuning preprocessing: per-channel mean")] = "0.485,0.456,0.406",
    std: Annotated[str, Opt(help="fine-tuning preprocessing: per-channel std")] = "0.229,0.224,0.225",
) -> None:
    """Structural channel pruning (Torch-Pruning, DepGraph); the classifier head is left alone."""
    _setup_logging()
    from visionserve.service.cli_util import parse_triple
    from visionserve.service.manifest import Preprocess

    from .data import DatasetError
    from .prune import PruneError, PruneOptions, run_prune

    try:
        pre = Preprocess(resize=resize or round(input_size * 256 / 224), mean=parse_triple(mean, "--mean"),
                         std=parse_triple(std, "--std"))
        result = run_prune(PruneOptions(preprocess=pre,
            arch=arch, module=module, weights=weights, num_classes=num_classes, target_macs=target_macs,
            ratio=ratio, input_size=input_size, round_to=round_to, finetune=finetune, epochs=epochs, lr=lr,
            distill=distill, output=output, torchscript=torchscript,
        ))
    except (PruneError, DatasetError, OSError, ValueError) as e:
        fail(str(e))
    typer.echo(result.summary())
    typer.echo(f"saved {output}" + (f" and {torchscript}" if torchscript else ""))


def optimize(
    repository: Annotated[Path, Opt("--repository", "-r", help="model repository to write into")],
    name: Annotated[str, Opt("--name", "-n", help="name of the optimized entry")],
    calibration: Annotated[str, Opt(help="calibration images folder, or 'natural'")],
    arch: Annotated[Optional[str], Opt(help="torchvision architecture")] = None,
    module: Annotated[Optional[str], Opt(help="any nn.Module: 'package.module:factory'")] = None,
    weights: Annotated[Optional[Path], Opt(help="state_dict or checkpoint")] = None,
    num_classes: Annotated[Optional[int], Opt(help="classes of a torchvision --arch")] = None,
    labels: Annotated[Optional[Path], Opt(help="class names, one per line")] = None,
    input_size: Annotated[int, Opt(help="square model input side")] = 224,
    resize: Annotated[Optional[int], Opt(help="shorter side before the center crop")] = None,
    mean: Annotated[str, Opt(help="per-channel mean")] = "0.485,0.456,0.406",
    std: Annotated[str, Opt(help="per-channel std")] = "0.229,0.224,0.225",
    eval: Annotated[Optional[str], Opt("--eval", help="held-out images (ImageFolder for accuracy)")] = None,
    target_macs: Annotated[Optional[float], Opt(help="prune to this fraction of the MACs")] = None,
    ratio: Annotated[Optional[float], Opt(help="prune with this channel ratio")] = None,
    finetune: Annotated[Optional[Path], Opt(help="ImageFolder to fine-tune the pruned model on")] = None,
    epochs: Annotated[int, Opt(help="fine-tuning epochs")] = 1,
    max_drop: Annotated[float, Opt(help="accuracy guard budget for int8")] = 0.01,
    target: Annotated[str, Opt(help="int8 target (auto, x86-novnni, x86-vnni, arm, tensorrt)")] = "auto",
    method: Annotated[str, Opt(help="int8 method: auto, nncf, minmax, entropy, percentile")] = "auto",
    report: Annotated[Path, Opt(help="directory for report.md and report.json")] = Path("optimize-report"),
) -> None:
    """prune? → convert → quantize → evaluate, with a report of size, MACs, latency and accuracy per stage."""
    _setup_logging()
    from visionserve.convert.export import ExportError
    from visionserve.convert.parity import ParityError
    from visionserve.convert.sources import SourceError
    from visionserve.service.cli_util import parse_triple
    from visionserve.service.repository import RepositoryError

    from .data import DatasetError
    from .int8 import QuantizeError
    from .optimize import OptimizeOptions, run_optimize
    from .prune import PruneError

    try:
        opts = OptimizeOptions(
            repository=repository, name=name, calibration=calibration, evaluation=eval, arch=arch,
            module=module, weights=weights, num_classes=num_classes, labels=labels, input_size=input_size,
            resize=resize, mean=parse_triple(mean, "--mean"), std=parse_triple(std, "--std"),
            target_macs=target_macs, ratio=ratio, finetune=finetune, epochs=epochs, max_drop=max_drop,
            target=target, method=method, report=report,
        )
        out = run_optimize(opts)
    except (PruneError, QuantizeError, DatasetError, RepositoryError, SourceError, ExportError, ParityError,
            OSError, ValueError) as e:
        fail(str(e))
    typer.echo(out)
