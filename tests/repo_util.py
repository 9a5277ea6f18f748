"""Model repositories for the lifecycle tests: the committed digits classifier published as new versions,
broken versions of every kind, and a big model whose unload must show in the process's memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from visionserve.service.manifest import MANIFEST_FILE, Manifest, sha256_file
from visionserve.service.repository import write_version

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "tests" / "data" / "digits_repo" / "digits" / "1"
DIGIT_PNG = ROOT / "tests" / "data" / "digits" / "test" / "0" / "0078.png"


def digits_manifest(name: str, version: str, model: Path) -> Manifest:
    """The digits manifest, renamed and renumbered, with the sha256 of ``model``."""
    doc = json.loads((DIGITS / MANIFEST_FILE).read_text())
    doc["name"], doc["version"] = name, version
    doc["provenance"]["onnx_sha256"] = sha256_file(model)
    return Manifest.model_validate(doc)


def publish(repo: Path, name: str, version: str, model: Path = DIGITS / "model.onnx") -> Path:
    """Publish ``model`` as ``name``/``version`` the documented way: staged, then renamed into place."""

    def build(staging: Path, v: str) -> Manifest:
        shutil.copyfile(model, staging / "model.onnx")
        return digits_manifest(name, v, staging / "model.onnx")

    return write_version(repo, name, version, build).directory


def publish_broken(repo: Path, name: str, version: str, kind: str) -> Path:
    """A complete-looking version directory (staged and renamed) that must not be served:
    ``checksum`` (the file is not the one the manifest names), ``onnx`` (not an ONNX file, sha256 right),
    ``manifest`` (not valid JSON) or ``shape`` (the manifest's input shape is not the model's: warm-up fails)."""
    staging = repo / f".staging-{name}-{version}"
    staging.mkdir(parents=True)
    model = staging / "model.onnx"
    if kind == "onnx":
        model.write_bytes(b"this is not an ONNX model" * 100)
    else:
        shutil.copyfile(DIGITS / "model.onnx", model)
    manifest = digits_manifest(name, version, model)
    if kind == "checksum":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte: corrupted in transit
        model.write_bytes(bytes(data))
    if kind == "shape":
        doc = manifest.model_dump(mode="json")
        doc["input"]["shape"] = [-1, 3, 32, 33]
        manifest = Manifest.model_validate(doc)
    manifest.write(staging)
    if kind == "manifest":
        (staging / MANIFEST_FILE).write_text('{"name": "truncated')
    final = repo / name / version
    final.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(final)
    return final


def big_model(path: Path, hidden: int = 4096) -> Path:
    """A classifier shaped like digits (3x32x32 in, 10 classes out) carrying ``3072 * hidden`` float weights
    (48 MiB at 4096): big enough that loading and unloading it shows in the server's RSS."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((3 * 32 * 32, hidden)) * 0.01).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.standard_normal((hidden, 10)) * 0.01).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w1"], ["hidden"]),
         helper.make_node("Relu", ["hidden"], ["act"]),
         helper.make_node("MatMul", ["act", "w2"], ["logits"])],
        "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path
