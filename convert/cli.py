"""``visionserve convert``. Imports torch only when the command runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from visionserve.service.cli_util import fail, parse_size, parse_triple

Opt = typer.Option


def convert(
    repository: Annotated[Path, Opt("--repository", "-r", help="model repository to write into")],
    name: Annotated[str, Opt("--name", "-n", help="model name in the repository")],
    arch: Annotated[str | None, Opt(help="torchvision architecture, e.g. mobilenet_v2, resnet18")] = None,
    module: Annotated[str | None, Opt(help="any nn.Module: 'package.module:factory'")] = None,
    torchscript: Annotated[Path | None, Opt(help="a TorchScript file (torch.jit.save)")] = None,
    weights: Annotated[Path | None, Opt(help="state_dict or checkpoint for --arch/--module")] = None,
    task: Annotated[str, Opt(help="classify, detect or embed")] = "classify",
    embed_layer: Annotated[str | None, Opt(help="embed: cut the network after this module (e.g. 'features'); "
                                                "pooled and L2-normalised in the graph (default: its output)")] = None,
    labels: Annotated[Path | None, Opt(help="class names, one per line")] = None,
    num_classes: Annotated[int | None, Opt(help="classes of a torchvision --arch (default 1000)")] = None,
    version: Annotated[str | None, Opt(help="version to write (default: next)")] = None,
    input_size: Annotated[str, Opt(help="model input, 'S' or 'HxW'")] = "224",
    resize: Annotated[int | None, Opt(help="shorter side before the center crop (default input*256/224)")] = None,
    resize_policy: Annotated[str | None, Opt(help="shorter_side_center_crop, stretch or letterbox (default: "
                                                   "center crop to classify, per --detect-format to detect)")] = None,
    mean: Annotated[str | None, Opt(help="per-channel mean, after scale (default ImageNet's; 0 for "
                                           "yolo/torchvision detectors)")] = None,
    std: Annotated[str | None, Opt(help="per-channel std, after scale (default ImageNet's; 1 for "
                                          "yolo/torchvision detectors)")] = None,
    scale: Annotated[float, Opt(help="multiplies 0-255 pixels before mean/std")] = 1 / 255,
    channel_order: Annotated[str, Opt(help="RGB or BGR")] = "RGB",
    activation: Annotated[str, Opt(help="classifier output → probabilities: softmax, sigmoid, none")] = "softmax",
    exporter: Annotated[str, Opt(help="auto (dynamo, then legacy), dynamo or legacy")] = "auto",
    opset: Annotated[int, Opt(help="ONNX opset for the dynamo exporter (legacy uses ≤ 17)")] = 18,
    atol: Annotated[float, Opt(help="parity: absolute tolerance")] = 1e-3,
    rtol: Annotated[float, Opt(help="parity: relative tolerance")] = 1e-3,
    max_batch_size: Annotated[int, Opt(help="largest batch the server will form")] = 32,
    overwrite: Annotated[bool, Opt(help="replace an existing version")] = False,
    detect_format: Annotated[str, Opt(help="detect: visionserve, yolo or torchvision (see docs/detection.md)")] = (
        "visionserve"),
    output_names: Annotated[str | None, Opt(help="detect: comma-separated output names (default per format)")] = None,
    score_activation: Annotated[str, Opt(help="detect: none (scores are probabilities), sigmoid or softmax")] = "none",
    objectness: Annotated[bool, Opt(help="detect, yolo: the head has an objectness channel (YOLOv5)")] = False,
    label_offset: Annotated[int, Opt(help="detect: added to class indices before the label lookup")] = 0,
    onnx_file: Annotated[Path | None, Opt("--onnx", help="detect: add an ONNX file exported elsewhere "
                                                             "(no parity proof)")] = None,
) -> None:
    """Export a PyTorch model to ONNX, prove parity with PyTorch, and add it to a model repository."""
    from visionserve.service.manifest import Preprocess

    from .pipeline import CONVERSION_ERRORS, ConvertOptions, convert_model, read_labels
    from .sources import load_source

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if task not in ("classify", "detect", "embed"):
        fail(f"--task must be classify, detect or embed, got {task!r}")
    if embed_layer is not None and task != "embed":
        fail("--embed-layer applies to --task embed only")
    h, w = parse_size(input_size, "--input-size")
    if task == "detect":
        from .detect_cli import convert_detect

        convert_detect(
            repository=repository, name=name, arch=arch, module=module, torchscript=torchscript, weights=weights,
            onnx_file=onnx_file, labels=labels, num_classes=num_classes, version=version, size=(h, w),
            resize_policy=resize_policy, mean=mean, std=std, scale=scale, channel_order=channel_order,
            detect_format=detect_format, output_names=output_names, score_activation=score_activation,
            objectness=objectness, label_offset=label_offset, exporter=exporter, opset=opset, atol=atol,
            rtol=rtol, max_batch_size=max_batch_size, overwrite=overwrite,
        )
        return
    try:
        pre = Preprocess(
            resize_policy=resize_policy or "shorter_side_center_crop",  # type: ignore[arg-type]
            resize=resize if resize is not None else round(min(h, w) * 256 / 224),
            mean=parse_triple(mean or "0.485,0.456,0.406", "--mean"),
            std=parse_triple(std or "0.229,0.224,0.225", "--std"), scale=scale,
            channel_order=channel_order,  # type: ignore[arg-type]
        )
        label_list = read_labels(labels) if labels else []
        source = load_source(arch=arch, module=module, torchscript=torchscript, weights=weights,
                             num_classes=num_classes)
        if task == "embed":
            from .embed import embedder

            source.model = embedder(source.model, embed_layer)
            source.description += f" (embedding at {embed_layer or 'its output'})"
        opts = ConvertOptions(
            name=name, repository=repository, version=version, task=task, input_size=(h, w),  # type: ignore[arg-type]
            preprocess=pre, labels=label_list, classify_activation=activation,  # type: ignore[arg-type]
            exporter=exporter, opset=opset, atol=atol, rtol=rtol,  # type: ignore[arg-type]
            max_batch_size=max_batch_size, overwrite=overwrite,
        )
        entry = convert_model(source, opts)
    except CONVERSION_ERRORS as e:
        fail(str(e))
    m = entry.manifest
    p = m.provenance.parity
    assert p is not None
    typer.echo(
        f"wrote {entry.directory} ({m.provenance.exporter} exporter, opset {m.provenance.opset}); parity over "
        f"{p.samples} samples (batches {p.batch_sizes}, {p.real_images} real images): max abs error "
        f"{p.max_abs_error:.2e}, max rel error {p.max_rel_error:.2e}, top-1 agreement "
        f"{'n/a' if p.top1_agreement is None else f'{p.top1_agreement:.1%}'}; "
        f"{m.provenance.notes.get('convert_seconds')} s"
    )
