"""Detection conversion: the three output layouts a user may bring, each declared in the manifest.

- ``visionserve`` (ours) and ``yolo`` (YOLOv5/v8 head ``[N, 4+C(+1), A]``, cx, cy, w, h): batched
  graphs with a dynamic batch axis, converted by the generic pipeline; NMS runs in the server.
- ``torchvision`` detectors (ssdlite320_mobilenet_v3_large, retinanet, fasterrcnn …): exported *with*
  their own transform and post-processing (NMS in the graph) by the legacy exporter, for one image at a
  time (``max_batch_size`` 1); outputs ``boxes`` [K, 4], ``labels`` [K], ``scores`` [K] in input pixels.
- an ONNX file exported elsewhere (e.g. ``yolo export format=onnx``): ``import_onnx_detector`` writes a
  repository entry for it, with no PyTorch to prove parity against (the manifest says so).
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visionserve.service.imaging import Preprocessor
from visionserve.service.manifest import (
    DetectPostprocess,
    InputSpec,
    Manifest,
    Parity,
    Preprocess,
    Provenance,
    sha256_file,
)
from visionserve.service.repository import ModelEntry, write_version

from .parity import ParityError
from .pipeline import ConvertOptions, _output_specs, convert_model
from .samples import sample_images
from .sources import Source

log = logging.getLogger("visionserve.convert")

TORCHVISION_OUTPUTS = ["boxes", "labels", "scores"]


def default_preprocess(fmt: str) -> Preprocess:
    """What each layout's models usually expect: ImageNet statistics for ours, 0-1 pixels for YOLO and
    torchvision detectors (which normalise inside their own graph)."""
    if fmt == "visionserve":
        return Preprocess(resize_policy="letterbox")
    if fmt == "yolo":
        return Preprocess(resize_policy="letterbox", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), pad_value=114)
    return Preprocess(resize_policy="stretch", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def default_outputs(fmt: str) -> list[str]:
    return {"visionserve": ["boxes", "scores"], "yolo": ["output"], "torchvision": TORCHVISION_OUTPUTS}[fmt]


def torchvision_labels(arch: str) -> list[str]:
    """COCO category names (index 0 is ``__background__``) from torchvision's weight metadata, offline."""
    import torchvision

    try:
        return list(torchvision.models.get_model_weights(arch).DEFAULT.meta["categories"])
    except (ValueError, KeyError, AttributeError):
        return []


def convert_detector(source: Source, opts: ConvertOptions) -> ModelEntry:
    """Convert any detector: batched layouts through the generic pipeline, torchvision ones batch-1."""
    if opts.detect is None:
        raise ValueError("task 'detect' needs a DetectPostprocess")
    if opts.detect.format == "torchvision":
        return convert_torchvision(source, opts)
    n_out = len(opts.output_names or opts.detect.outputs)
    expected = 2 if opts.detect.format == "visionserve" else 1
    if n_out != expected:
        raise ValueError(f"format {opts.detect.format!r} has {expected} output(s); got names "
                         f"{opts.output_names or opts.detect.outputs}")
    return convert_model(source, opts)


class SingleImage(nn.Module):
    """A torchvision detector as a tensor → tensors function: [1, 3, H, W] (0-1) → boxes, labels, scores."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.detector([x[0]])[0]
        return out["boxes"], out["labels"], out["scores"]


def convert_torchvision(source: Source, opts: ConvertOptions) -> ModelEntry:
    """Export a torchvision detector with its post-processing (legacy exporter, one image per call)."""
    assert opts.detect is not None
    h, w = opts.input_size
    spec = InputSpec(name="input", shape=[1, 3, h, w])
    started = time.perf_counter()
    model = SingleImage(source.model.eval()).eval()
    names = opts.output_names or TORCHVISION_OUTPUTS
    post = opts.detect.model_copy(update={"outputs": names, "nms": "in_graph"})

    def build(staging: Path, version: str) -> Manifest:
        onnx_path = staging / "model.onnx"
        example = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
        log.info("exporting %s with its post-processing (legacy exporter)", source.description)
        opset = min(opts.opset, 17)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(onnx_path), dynamo=False, opset_version=opset,
                              input_names=[spec.name], output_names=names,
                              dynamic_axes={n: {0: "detections"} for n in names}, do_constant_folding=True)
        log.info("checking parity against PyTorch, image by image")
        parity, compared = detection_parity(
            model, str(onnx_path), single_image_batches(spec, opts.preprocess, opts.real_images),
            atol=opts.atol, rtol=opts.rtol)
        if compared == 0:
            log.warning("parity compared no detections: every score sat at the cut-off (untrained model?)")
        notes = {**opts.notes, "convert_seconds": round(time.perf_counter() - started, 2),
                 "parity_detections_compared": compared}
        return Manifest(
            name=opts.name, version=version, task="detect", input=spec, outputs=_output_specs(str(onnx_path)),
            preprocess=opts.preprocess, postprocess=post, labels=opts.labels, max_batch_size=1,
            provenance=Provenance(
                source=source.description, weights=source.weights.name if source.weights else None,
                weights_sha256=source.weights_sha256, exporter="legacy", opset=opset,
                torch_version=torch.__version__, onnx_sha256=sha256_file(onnx_path), parity=parity,
                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), notes=notes,
            ),
        )

    return write_version(opts.repository, opts.name, opts.version, build, overwrite=opts.overwrite)


def single_image_batches(spec: InputSpec, pre: Preprocess, real_images: bool, seed: int = 0
                         ) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    batches = [("random image", rng.uniform(0, 1, (1, 3, spec.height, spec.width)).astype(np.float32))]
    if real_images:
        prep = Preprocessor(spec, pre, draft=False)
        batches += [(f"image {n}", prep.from_image(img)[0][None]) for n, img in sample_images()[:3]]
    return batches


def detection_parity(model: nn.Module, onnx_path: str, batches: list[tuple[str, np.ndarray]], *,
                     atol: float, rtol: float, max_unmatched: float = 0.01) -> tuple[Parity, int]:
    """Post-processed detections agree when PyTorch's detections have ONNX ones of the same label, score
    (within atol + rtol) and box (within 0.5 px + rtol).

    Returns the parity figures and how many detections were matched. Order is not compared: near-equal
    scores may sort differently, and that changes no answer. Detections at the score cut-off (within
    tolerance of the lowest one kept) are not required to match, and at most ``max_unmatched`` of the rest
    (and of the counts) may differ: an NMS decision taken at exactly the IoU threshold, or a top-k tie,
    flips with the last bit of a float (seen with randomly initialised retinanet: 2 of 300).
    """
    from .ort_cpu import cpu_session

    sess = cpu_session(onnx_path)
    worst_abs = worst_rel = 0.0
    failures = []
    real = compared = 0
    for label, batch in batches:
        with torch.no_grad():
            rb, rl, rs = (t.numpy() for t in model(torch.from_numpy(batch)))
        gb, gl, gs = sess.run(None, {sess.get_inputs()[0].name: batch})
        real += label.startswith("image")
        if abs(len(rb) - len(gb)) > max_unmatched * max(len(rb), len(gb)):
            failures.append(f"{label}: {len(rb)} detections in PyTorch, {len(gb)} in ONNX Runtime")
            continue
        floor = (rs.min() if len(rs) else 0.0) + atol + rtol
        unmatched = considered = 0
        for b, lab, s in zip(rb, rl, rs):
            if s <= floor:
                continue
            considered += 1
            same = (gl == lab) & (np.abs(gs - s) <= atol + rtol * abs(s))
            err = np.abs(gb - b).max(axis=1) if len(gb) else np.zeros(0)
            ok = same & (err <= 0.5 + rtol * np.abs(b).max())
            if not ok.any():
                unmatched += 1
                continue
            compared += 1
            j = int(np.argmin(np.where(ok, err, np.inf)))
            worst_abs = max(worst_abs, float(err[j]), float(abs(gs[j] - s)))
            worst_rel = max(worst_rel, float(err[j]) / max(float(np.abs(b).max()), 1e-12))
        if unmatched > max_unmatched * considered:
            failures.append(f"{label}: {unmatched} of {considered} detections have no ONNX counterpart "
                            f"(allowed {max_unmatched:.0%})")
        elif unmatched:
            log.info("%s: %d of %d detections differ (within the %.0f%% allowed)", label, unmatched, considered,
                     max_unmatched * 100)
    if failures:
        raise ParityError("ONNX Runtime and PyTorch disagree: " + "; ".join(failures[:4]))
    return Parity(max_abs_error=worst_abs, max_rel_error=worst_rel, batch_sizes=[1], samples=len(batches),
                  real_images=real, atol=atol, rtol=rtol), compared


def import_onnx_detector(onnx_file: Path, repository: Path, name: str, post: DetectPostprocess,
                         preprocess: Preprocess, labels: list[str], *, version: str | None = None,
                         max_batch_size: int = 32, overwrite: bool = False) -> ModelEntry:
    """Add an ONNX detector exported elsewhere; input shape and output names are read from the file."""
    import onnx

    onnx_file = Path(onnx_file)
    if not onnx_file.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_file}")
    m = onnx.load(str(onnx_file))
    onnx.checker.check_model(m)
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ValueError(f"{onnx_file} has {len(inputs)} inputs; a detector takes one image tensor")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or min(dims[1:]) <= 0:
        raise ValueError(f"{onnx_file}: input shape {dims} is not [N, 3, H, W] with fixed H and W")
    spec = InputSpec(name=inputs[0].name, shape=dims)
    batch = max_batch_size if dims[0] == -1 else 1

    def build(staging: Path, version: str) -> Manifest:
        target = staging / "model.onnx"
        shutil.copyfile(onnx_file, target)
        return Manifest(
            name=name, version=version, task="detect", input=spec, outputs=_output_specs(str(target)),
            preprocess=preprocess, postprocess=post, labels=labels, max_batch_size=batch,
            provenance=Provenance(
                source=f"onnx:{onnx_file.name}", exporter="external", opset=next(
                    (o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None),
                onnx_sha256=sha256_file(target), parity=None,
                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                notes={"parity": "not proven: imported ONNX, no PyTorch model to compare with"},
            ),
        )

    return write_version(repository, name, version, build, overwrite=overwrite)
