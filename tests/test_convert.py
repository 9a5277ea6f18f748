"""convert: the three kinds of input, parity figures, and clear failures that leave nothing behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from typer.testing import CliRunner

from visionserve.service.cli import app
from visionserve.service.imaging import Preprocessor
from visionserve.service.manifest import Manifest, sha256_file
from visionserve.service.postprocess import top_k

from .conftest import CAT, CAT_CLASSES

runner = CliRunner()


def convert(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["convert", *args])
    return result.exit_code, result.output


def entries(repo: Path) -> list[Path]:
    return sorted(p for p in repo.rglob("manifest.json"))


def test_mobilenet_v2_real_weights_parity_and_cat(mobilenet_repo: Path) -> None:
    d = mobilenet_repo / "mobilenet_v2" / "1"
    m = Manifest.read(d)
    p = m.provenance.parity
    assert p is not None
    assert p.top1_agreement == 1.0 and p.max_abs_error < 1e-3
    assert 1 in p.batch_sizes and max(p.batch_sizes) > 1 and p.real_images >= 8
    assert m.provenance.onnx_sha256 == sha256_file(d / "model.onnx")
    assert m.input.shape[0] == -1 and len(m.labels) == 1000 and m.labels[285] == "Egyptian cat"
    # the exported model, run with the server's own preprocessing, sees the cat
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    x, _ = Preprocessor(m.input, m.preprocess)(CAT.read_bytes())
    out = sess.run(None, {"input": np.stack([x, x, x])})[0]
    assert out.shape == (3, 1000)
    best = top_k(m, out[0], 1)[0]
    assert best["index"] in CAT_CLASSES and best["score"] > 0.5


def test_resnet18_random_weights_via_cli(tmp_path: Path) -> None:
    torch.manual_seed(1)
    weights = tmp_path / "resnet18.pth"
    torch.save({"state_dict": torchvision.models.resnet18(num_classes=7).state_dict()}, weights)
    code, out = convert("--arch", "resnet18", "--num-classes", "7", "--weights", str(weights),
                        "--repository", str(tmp_path / "repo"), "--name", "rn18", "--input-size", "160")
    assert code == 0, out
    m = Manifest.read(tmp_path / "repo" / "rn18" / "1")
    assert m.input.shape == [-1, 3, 160, 160] and m.outputs[0].shape == [-1, 7]
    assert m.preprocess.resize == round(160 * 256 / 224)
    assert m.provenance.parity and m.provenance.parity.top1_agreement == 1.0
    assert "max abs error" in out and "top-1 agreement 100.0%" in out


def test_module_factory_then_next_version(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    args = ["--module", "tests.tiny_models:tiny_net", "--repository", str(repo), "--name", "tiny",
            "--input-size", "64", "--exporter", "legacy"]
    assert convert(*args)[0] == 0
    assert convert(*args)[0] == 0
    assert [p.parent.name for p in entries(repo)] == ["1", "2"]
    m = Manifest.read(repo / "tiny" / "2")
    assert m.provenance.exporter == "legacy" and m.provenance.source == "module:tests.tiny_models:tiny_net"
    sess = ort.InferenceSession(str(repo / "tiny" / "2" / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):  # the batch axis is dynamic
        assert sess.run(None, {"input": np.zeros((n, 3, 64, 64), np.float32)})[0].shape == (n, 10)


def test_torchscript_file(tmp_path: Path) -> None:
    from tests.tiny_models import tiny_net

    ts = tmp_path / "tiny.pt"
    torch.jit.script(tiny_net().eval()).save(str(ts))
    code, out = convert("--torchscript", str(ts), "--repository", str(tmp_path / "repo"), "--name", "ts",
                        "--input-size", "64")
    assert code == 0, out
    m = Manifest.read(tmp_path / "repo" / "ts" / "1")
    assert m.provenance.exporter == "legacy" and m.provenance.source == "torchscript:tiny.pt"


@pytest.mark.parametrize("args, message", [
    (["--arch", "mobilenet_v2", "--weights", "/nonexistent/w.pth"], "weights file not found"),
    (["--arch", "resnet_9000"], "unknown torchvision architecture"),
    (["--torchscript", "/nonexistent/m.pt"], "TorchScript file not found"),
    (["--module", "tests.tiny_models"], "package.module:factory"),
    (["--module", "tests.no_such_module:f"], "cannot import module"),
    (["--module", "tests.tiny_models:not_a_module"], "not a torch.nn.Module"),
    (["--arch", "resnet18", "--module", "tests.tiny_models:tiny_net"], "exactly one of"),
    (["--module", "tests.tiny_models:tiny_net", "--input-size", "abc"], "--input-size"),
])
def test_bad_input_is_refused_clearly(tmp_path: Path, args: list[str], message: str) -> None:
    repo = tmp_path / "repo"
    code, out = convert(*args, "--repository", str(repo), "--name", "bad")
    assert code != 0
    assert message in out
    assert not entries(repo) if repo.exists() else True


def test_state_dict_that_does_not_match(tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    repo = tmp_path / "repo"
    code, out = convert("--arch", "mobilenet_v2", "--weights", str(weights), "--repository", str(repo),
                        "--name", "mismatch")
    assert code != 0 and "do not match the model" in out and "missing" in out
    assert not entries(repo)


def test_not_a_weights_file(tmp_path: Path) -> None:
    weights = tmp_path / "garbage.pth"
    weights.write_bytes(b"this is not a checkpoint")
    code, out = convert("--arch", "resnet18", "--weights", str(weights), "--repository", str(tmp_path / "r"),
                        "--name", "x")
    assert code != 0 and "cannot read weights" in out


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_divergent_export_fails_and_leaves_nothing(tmp_path: Path, exporter: str) -> None:
    repo = tmp_path / "repo"
    code, out = convert("--module", "tests.tiny_models:divergent", "--repository", str(repo), "--name", "div",
                        "--input-size", "64", "--exporter", exporter)
    assert code != 0
    assert "disagree" in out and "max abs error" in out
    assert not entries(repo)
    assert not [p for p in repo.iterdir()] if repo.exists() else True  # no staging left behind


def test_labels_must_match_classes(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    code, out = convert("--module", "tests.tiny_models:tiny_net", "--labels", str(labels), "--input-size", "64",
                        "--exporter", "legacy", "--repository", str(tmp_path / "repo"), "--name", "lab")
    assert code != 0 and "3 labels given but the model has 10 classes" in out
