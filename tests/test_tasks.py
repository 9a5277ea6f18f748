"""The task plug-in interface: what every registered task declares is really there; convert --task embed."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import ROOT
from visionserve.loadtest.payloads import KINDS, build_payload
from visionserve.service import tasks
from visionserve.service.manifest import Manifest
from visionserve.service.tasks.embed import EmbedPostprocess

WEIGHTS = ROOT / "tests" / "data" / "digits_oneshot" / "oneshot_cnn.pt"


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_a_task_declares_what_the_tools_look_up(task: str) -> None:
    t = tasks.TASKS[task]
    assert t.name == task and t.section.model_fields["kind"].default == task
    assert set(t.loadtest_kinds) <= set(KINDS)
    if t.evaluator:
        module, func = t.evaluator.split(":")
        assert callable(getattr(importlib.import_module(module), func))
    assert t.route and t.response.model_fields


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_every_task_is_routed_loadtested_and_guarded(task: str) -> None:
    from visionserve.quantize.guard import GUARD_METRICS
    from visionserve.service.http.app import create_app
    from visionserve.service.http.tasks import task_router
    from visionserve.service.settings import Settings

    t = tasks.TASKS[task]
    t.params()  # every query parameter has a default: the bare route works
    doc = create_app(Settings()).openapi()["paths"][f"/v1/models/{{model}}/{t.route}"]["post"]
    assert {p["name"] for p in doc["parameters"]} == {"model", "version", *t.params.model_fields}
    assert {r.path for r in task_router(t).routes} == {f"/v1/models/{{model}}/{t.route}",
                                                       f"/v1/models/{{model}}/versions/{{version}}/{t.route}"}
    for kind in t.loadtest_kinds:  # each kind the task declares builds a request
        assert build_payload(kind, "m", b"\xff\xd8\xff...").method == "POST"
    assert t.guard_metric in GUARD_METRICS  # quantize's guard measures what the task declares


def test_the_builtin_sections_are_the_manifests_and_load_the_committed_repositories() -> None:
    from visionserve.service.manifest import ClassifyPostprocess, DetectPostprocess

    assert tasks.TASKS["classify"].section is ClassifyPostprocess
    assert tasks.TASKS["detect"].section is DetectPostprocess
    assert list(tasks.TASKS) == list(tasks.BUILT_IN)
    for path in sorted((ROOT / "tests" / "data").glob("*_repo/*/*/manifest.json")):
        m = Manifest.read(path.parent)
        assert isinstance(m.postprocess, tasks.TASKS[m.task].section)
        assert (json.dumps(m.model_dump(mode="json"), indent=2) + "\n") == path.read_text()  # byte for byte


def test_the_manifest_takes_an_embed_section_and_checks_its_output() -> None:
    doc = Manifest.read(ROOT / "tests" / "data" / "digits_oneshot_repo" / "digits_oneshot" / "1").model_dump()
    assert isinstance(Manifest.model_validate(doc).postprocess, EmbedPostprocess)
    doc["postprocess"]["output"] = "nope"
    with pytest.raises(ValueError, match="unknown outputs"):
        Manifest.model_validate(doc)
    doc["postprocess"] = {"kind": "classify", "output": "embedding"}
    with pytest.raises(ValueError, match="does not match"):
        Manifest.model_validate(doc)


def test_loadtest_payloads_for_embed_and_identify() -> None:
    p = build_payload("embed", "m", b"\xff\xd8\xff...")
    assert (p.method, p.path, p.headers["Content-Type"]) == ("POST", "/v1/models/m/embed", "image/jpeg")
    p = build_payload("identify", "faces", b"\x89PNG\r\n\x1a\n", query="top_k=1")
    assert p.path == "/v1/galleries/faces/identify?top_k=1" and p.body.startswith(b"\x89PNG")


def convert(repo: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "visionserve.service", "convert", "--task", "embed", "--module",
         "examples.train_digits_oneshot:oneshot_net", "--weights", str(WEIGHTS), "--input-size", "32",
         "--resize", "32", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--repository", str(repo), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_convert_embed_cuts_pools_and_normalises_in_the_graph(tmp_path: Path) -> None:
    r = convert(tmp_path, "--name", "cut", "--embed-layer", "features.6", "--exporter", "legacy")
    assert r.returncode == 0, r.stdout + r.stderr
    m = Manifest.read(tmp_path / "cut" / "1")
    assert m.task == "embed" and isinstance(m.postprocess, EmbedPostprocess) and m.postprocess.normalized
    assert m.provenance.parity is not None and m.provenance.parity.max_abs_error < 1e-3
    sess = ort.InferenceSession(str(tmp_path / "cut" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)})[0]
    assert out.shape == (3, 64)  # the 2nd block's 64 channels, average-pooled
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_convert_embed_refuses_an_unknown_layer(tmp_path: Path) -> None:
    r = convert(tmp_path, "--name", "bad", "--embed-layer", "nope")
    assert r.returncode == 2
    assert "--embed-layer 'nope' is not a module" in r.stdout + r.stderr
    assert not (tmp_path / "bad").exists()


def test_evaluate_reports_n_way_one_shot_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    r = subprocess.run(
        [sys.executable, "-m", "visionserve.service", "evaluate", "digits_oneshot", "-r",
         str(ROOT / "tests" / "data" / "digits_oneshot_repo"), "-d",
         str(ROOT / "tests" / "data" / "digits_oneshot" / "unseen"), "--episodes", "200", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    import json

    result = json.loads(out.read_text())
    assert (result["task"], result["ways"], result["shots"], result["episodes"]) == ("embed", 5, 1, 200)
    # digits 5-9, never trained on: far above chance (0.2) and raw pixels (0.74), short of the 0.9
    # (0.84 over 500 episodes, docs/embeddings.md)
    assert 0.75 <= result["accuracy"] <= 1.0 and 0 < result["std"] < 0.2
    assert result["min"] <= result["accuracy"] <= result["max"]
    assert f"accuracy: {result['accuracy']}" in r.stdout
