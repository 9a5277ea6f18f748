"""Which model a tool works on: ``NAME[:VERSION]`` in a repository, or a bare ``.onnx`` file."""

from __future__ import annotations

from pathlib import Path

from visionserve.service.manifest import (
    ClassifyPostprocess,
    InputSpec,
    Manifest,
    Preprocess,
    Provenance,
    TensorSpec,
    sha256_file,
)
from visionserve.service.repository import ModelEntry, RepositoryError, load_entry, versions


def resolve(spec: str, repository: Path | None, labels: list[str] | None = None) -> ModelEntry:
    """A repository entry for ``spec``; an ONNX file gets a manifest with ImageNet-style preprocessing."""
    if spec.endswith(".onnx") or (Path(spec).is_file() and repository is None):
        return from_onnx(Path(spec), labels or [])
    if repository is None:
        raise RepositoryError(f"{spec!r} is not an .onnx file; give --repository to look it up as NAME[:VERSION]")
    name, _, version = spec.partition(":")
    found = versions(repository, name)
    if not found:
        raise RepositoryError(f"model {name!r} not found in {repository}")
    if version and version not in found:
        raise RepositoryError(f"model {name!r} has no version {version} in {repository} (it has {found})")
    return load_entry(Path(repository) / name / (version or found[-1]), verify_checksum=True)


def from_onnx(path: Path, labels: list[str]) -> ModelEntry:
    """A stand-in entry for a bare classifier ONNX file: NCHW float input, first output = logits."""
    import onnx

    if not path.is_file():
        raise RepositoryError(f"ONNX file not found: {path}")
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends
        raise RepositoryError(f"{path} is not an ONNX model: {str(e)[:200]}") from None
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise RepositoryError(f"{path}: expected one image input, found {len(inputs)}")

    def dims(vi) -> list[int]:
        return [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]

    shape = dims(inputs[0])
    if len(shape) != 4 or shape[1] != 3 or shape[2] <= 0 or shape[3] <= 0:
        raise RepositoryError(f"{path}: input {inputs[0].name} has shape {shape}; expected [N, 3, H, W]")
    outs = [TensorSpec(name=o.name, shape=dims(o)) for o in m.graph.output]
    h, w = shape[2], shape[3]
    manifest = Manifest(
        name=path.stem.replace(" ", "_") or "model", version="1", task="classify",
        input=InputSpec(name=inputs[0].name, shape=[-1, 3, h, w]), outputs=outs,
        preprocess=Preprocess(resize=round(min(h, w) * 256 / 224)),
        postprocess=ClassifyPostprocess(output=outs[0].name), labels=labels,
        provenance=Provenance(source=f"onnx:{path.name}", onnx_sha256=sha256_file(path)),
    )
    # the file keeps its own name; model_path = directory / model_file still points at it
    return ModelEntry(manifest.model_copy(update={"model_file": path.name}), path.parent)
