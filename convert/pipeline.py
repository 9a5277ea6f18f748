"""convert = load → export → prove parity → write a repository entry (atomically)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import ValidationError

from visionserve.service.imaging import Preprocessor
from visionserve.service.manifest import (
    ClassifyPostprocess,
    DetectPostprocess,
    InputSpec,
    Manifest,
    Preprocess,
    Provenance,
    TensorSpec,
    sha256_file,
)
from visionserve.service.repository import ModelEntry, RepositoryError, write_version
from visionserve.service.tasks.embed import EmbedPostprocess

from .export import Exporter, ExportError, export_onnx
from .parity import ParityCheck, ParityError, compare
from .samples import sample_images
from .sources import Source, SourceError

log = logging.getLogger("visionserve.convert")

# What a conversion can fail with that is the user's to fix: the commands print these and exit 2.
CONVERSION_ERRORS = (SourceError, ExportError, ParityError, RepositoryError, FileNotFoundError, ValueError,
                     ValidationError)


@dataclass
class ConvertOptions:
    name: str
    repository: Path
    version: str | None = None
    task: Literal["classify", "detect", "embed"] = "classify"
    input_size: tuple[int, int] = (224, 224)
    preprocess: Preprocess = field(default_factory=Preprocess)
    labels: list[str] = field(default_factory=list)
    output_names: list[str] | None = None
    classify_activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    detect: DetectPostprocess | None = None
    exporter: Exporter = "auto"
    opset: int = 18
    atol: float = 1e-3
    rtol: float = 1e-3
    real_images: bool = True
    max_batch_size: int = 32
    overwrite: bool = False
    derived_from: str | None = None
    notes: dict[str, object] = field(default_factory=dict)


def read_labels(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def parity_batches(spec: InputSpec, pre: Preprocess, real_images: bool, seed: int = 0
                   ) -> list[tuple[str, np.ndarray]]:
    """Random inputs at batch 1 and 4, and real photographs one by one and all together."""
    rng = np.random.default_rng(seed)
    shape = (3, spec.height, spec.width)
    batches = [
        ("random batch 1", rng.standard_normal((1, *shape), dtype=np.float32)),
        ("random batch 4", rng.standard_normal((4, *shape), dtype=np.float32)),
    ]
    if real_images:
        prep = Preprocessor(spec, pre, draft=False)
        tensors = [(n, prep.from_image(img)[0]) for n, img in sample_images()]
        batches.append((f"images {tensors[0][0]} (batch 1)", tensors[0][1][None]))
        batches.append((f"images x{len(tensors)}", np.stack([t for _, t in tensors])))
    return batches


def convert_model(source: Source, opts: ConvertOptions) -> ModelEntry:
    """Export ``source`` into ``opts.repository`` and prove it; raise on any failure, leaving nothing."""
    h, w = opts.input_size
    spec = InputSpec(name="input", shape=[-1, 3, h, w])
    started = time.perf_counter()
    model = source.model.eval()
    example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    if opts.task == "classify":
        out_names = opts.output_names or ["logits"]
    elif opts.task == "embed":
        out_names = opts.output_names or ["embedding"]
    else:
        if opts.detect is None:
            raise ValueError("task 'detect' needs a DetectPostprocess")
        out_names = opts.output_names or list(opts.detect.outputs)

    def build(staging: Path, version: str) -> Manifest:
        onnx_path = staging / "model.onnx"
        log.info("exporting %s to ONNX", source.description)
        exported = export_onnx(
            model, example, onnx_path, exporter=opts.exporter, opset=opts.opset,
            input_name=spec.name, output_names=out_names, torchscript=source.torchscript,
        )
        log.info("checking parity against PyTorch")
        check = ParityCheck(
            atol=opts.atol, rtol=opts.rtol, classify=opts.task == "classify",
            batches=parity_batches(spec, opts.preprocess, opts.real_images),
        )
        parity = compare(model, str(onnx_path), check)
        outputs = _output_specs(str(onnx_path))
        post = (
            ClassifyPostprocess(output=exported.output_names[0], activation=opts.classify_activation)
            if opts.task == "classify"
            else EmbedPostprocess(output=exported.output_names[0]) if opts.task == "embed"  # normalised in-graph
            else opts.detect
        )
        if opts.task == "classify" and opts.labels:
            n_classes = outputs[0].shape[-1]
            if n_classes > 0 and len(opts.labels) != n_classes:
                raise ValueError(f"{len(opts.labels)} labels given but the model has {n_classes} classes")
        notes = dict(opts.notes)
        notes["convert_seconds"] = round(time.perf_counter() - started, 2)
        return Manifest(
            name=opts.name, version=version, task=opts.task, input=spec, outputs=outputs,
            preprocess=opts.preprocess, postprocess=post, labels=opts.labels,  # type: ignore[arg-type]
            max_batch_size=opts.max_batch_size,
            provenance=Provenance(
                source=source.description, weights=source.weights.name if source.weights else None,
                weights_sha256=source.weights_sha256, exporter=exported.exporter, opset=exported.opset,
                torch_version=torch.__version__, onnx_sha256=sha256_file(onnx_path), parity=parity,
                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                derived_from=opts.derived_from, notes=notes,
            ),
        )

    return write_version(opts.repository, opts.name, opts.version, build, overwrite=opts.overwrite)


def _output_specs(onnx_path: str) -> list[TensorSpec]:
    import onnx

    m = onnx.load(onnx_path, load_external_data=False)
    specs = []
    for o in m.graph.output:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in o.type.tensor_type.shape.dim]
        elem = o.type.tensor_type.elem_type
        dtype = {1: "FP32", 10: "FP16", 7: "INT64", 6: "INT32", 2: "UINT8"}.get(elem, "FP32")
        specs.append(TensorSpec(name=o.name, datatype=dtype, shape=dims))  # type: ignore[arg-type]
    return specs
