"""The ``--task detect`` branch of ``visionserve convert``."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from visionserve.service.cli_util import fail, parse_triple

log = logging.getLogger("visionserve.convert")


def convert_detect(*, repository: Path, name: str, arch: str | None, module: str | None, torchscript: Path | None,
                   weights: Path | None, onnx_file: Path | None, labels: Path | None, num_classes: int | None,
                   version: str | None, size: tuple[int, int], resize_policy: str | None, mean: str | None,
                   std: str | None, scale: float, channel_order: str, detect_format: str, output_names: str | None,
                   score_activation: str, objectness: bool, label_offset: int, exporter: str, opset: int,
                   atol: float, rtol: float, max_batch_size: int, overwrite: bool) -> None:
    from visionserve.service.manifest import DetectPostprocess

    from .detect import default_outputs, default_preprocess, import_onnx_detector, torchvision_labels
    from .pipeline import CONVERSION_ERRORS, read_labels

    if detect_format not in ("visionserve", "yolo", "torchvision"):
        fail(f"--detect-format must be visionserve, yolo or torchvision, got {detect_format!r}")
    if detect_format == "torchvision" and torchscript:
        fail("--detect-format torchvision takes a torchvision detector: --arch NAME "
             "(e.g. ssdlite320_mobilenet_v3_large) or --module returning one")
    names = [n.strip() for n in output_names.split(",")] if output_names else default_outputs(detect_format)
    h, w = size
    try:
        base = default_preprocess(detect_format)
        pre = base.model_copy(update={
            "resize_policy": resize_policy or base.resize_policy,
            "mean": parse_triple(mean, "--mean") if mean else base.mean,
            "std": parse_triple(std, "--std") if std else base.std,
            "scale": scale, "channel_order": channel_order, "resize": None,
        })
        pre = type(pre).model_validate(pre.model_dump())  # re-validate the literals given on the command line
        post = DetectPostprocess(format=detect_format, outputs=names,  # type: ignore[arg-type]
                                 score_activation=score_activation,  # type: ignore[arg-type]
                                 objectness=objectness, label_offset=label_offset)
        label_list = read_labels(labels) if labels else (torchvision_labels(arch) if arch and detect_format ==
                                                         "torchvision" else [])
        if onnx_file:
            if arch or module or torchscript or weights:
                fail("--onnx takes an ONNX file as it is; "
                     "do not combine it with --arch/--module/--torchscript/--weights")
            entry = import_onnx_detector(onnx_file, repository, name, post, pre, label_list, version=version,
                                         max_batch_size=max_batch_size, overwrite=overwrite)
        else:
            from .detect import convert_detector
            from .pipeline import ConvertOptions
            from .sources import load_source

            if detect_format == "torchvision" and arch:
                source = _torchvision_detector(arch, weights, num_classes)
            else:
                source = load_source(arch=arch, module=module, torchscript=torchscript, weights=weights,
                                     num_classes=num_classes)
            opts = ConvertOptions(
                name=name, repository=repository, version=version, task="detect", input_size=(h, w),
                preprocess=pre, labels=label_list, output_names=names, detect=post,
                exporter=exporter, opset=opset, atol=atol, rtol=rtol,  # type: ignore[arg-type]
                max_batch_size=1 if detect_format == "torchvision" else max_batch_size, overwrite=overwrite,
            )
            entry = convert_detector(source, opts)
    except CONVERSION_ERRORS as e:
        fail(str(e))
    m = entry.manifest
    p = m.provenance.parity
    proof = ("no parity proof (imported ONNX)" if p is None else
             f"parity over {p.samples} samples (batches {p.batch_sizes}, {p.real_images} real images): max abs "
             f"error {p.max_abs_error:.2e}, max rel error {p.max_rel_error:.2e}")
    typer.echo(f"wrote {entry.directory} ({m.provenance.exporter} exporter, opset {m.provenance.opset}, "
               f"format {detect_format}, max batch {m.max_batch_size}); {proof}; "
               f"{m.provenance.notes.get('convert_seconds', '-')} s")


def _torchvision_detector(arch: str, weights: Path | None, num_classes: int | None):  # type: ignore[no-untyped-def]
    """A torchvision detection architecture, randomly initialised unless --weights (no downloads)."""
    import torchvision

    from .sources import Source, SourceError, load_weights

    if arch not in torchvision.models.list_models(module=torchvision.models.detection):
        raise SourceError(f"{arch!r} is not a torchvision detection model; try one of "
                          f"{sorted(torchvision.models.list_models(module=torchvision.models.detection))[:6]}")
    kwargs = {"num_classes": num_classes} if num_classes else {}
    model = torchvision.models.get_model(arch, weights=None, weights_backbone=None, **kwargs)
    if weights:
        load_weights(model, Path(weights))
    return Source(model.eval(), f"torchvision:{arch}", Path(weights) if weights else None)
