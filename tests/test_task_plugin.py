"""Adding a task is one module and one registration line: a toy task, registered in-process, is accepted by the
manifest, served by the one generic route (with the service's parameter checks, errors, metrics and the Open
Inference Protocol), and found by the load generator — without a line of its own anywhere else."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from pydantic import BaseModel, Field, ValidationError

from visionserve.loadtest.payloads import build_payload
from visionserve.service import tasks
from visionserve.service.errors import InvalidParameter
from visionserve.service.imaging import Preprocessor
from visionserve.service.manifest import InputSpec, Manifest, Preprocess, Provenance, TensorSpec, sha256_file
from visionserve.service.repository import write_version
from visionserve.service.settings import Settings
from visionserve.service.tasks.base import Section, Task

from .conftest import CAT, COFFEE
from .onnx_builders import conv_stack, write_conv_stack

SIZE, WIDTH = 16, 4


# -- the whole toy task: what `service/tasks/mean.py` would hold --------------------------------------------
class MeanPostprocess(Section):
    """The toy task's manifest section: which output to average."""

    kind: Literal["mean"] = "mean"
    output: str


class MeanParams(BaseModel):
    scale: float = Field(1.0, description="multiplies the mean")


class MeanResponse(BaseModel):
    model: str
    version: str
    mean: float


class MeanTask(Task):
    name = "mean"
    section = MeanPostprocess
    route = "mean"
    summary = "The mean of one output (a toy task)"
    params = MeanParams
    response = MeanResponse
    guard_metric = "mean"
    loadtest_kinds = ("mean",)

    def check(self, params: MeanParams, settings: Any) -> None:
        if not (math.isfinite(params.scale) and params.scale > 0):
            raise InvalidParameter(f"scale must be a positive number, got {params.scale}")

    def answer(self, model: Any, outputs: dict[str, np.ndarray], geometry: Any, params: MeanParams
               ) -> dict[str, Any]:
        post = model.manifest.postprocess
        return {"model": model.name, "version": model.version,
                "mean": float(outputs[post.output].mean()) * params.scale}


MEAN = MeanTask()
# ------------------------------------------------------------------------------------------------------------


def toy_manifest(onnx_file: Path, name: str = "toy", version: str = "1") -> dict[str, Any]:
    return Manifest.model_construct(
        name=name, version=version, task="mean", input=InputSpec(name="input", shape=[-1, 3, SIZE, SIZE]),
        outputs=[TensorSpec(name="logits", shape=[-1, WIDTH])], preprocess=Preprocess(resize_policy="stretch"),
        postprocess=MeanPostprocess(output="logits"), labels=[],
        provenance=Provenance(source="tests/onnx_builders.py", onnx_sha256=sha256_file(onnx_file)),
    ).model_dump(mode="json")


@pytest.fixture
def mean_task() -> Iterator[MeanTask]:
    tasks.register(MEAN)  # the one line
    try:
        yield MEAN
    finally:
        tasks.unregister(MEAN.name)


def test_the_manifest_knows_a_task_once_it_is_registered(tmp_path: Path) -> None:
    conv_stack(tmp_path / "model.onnx", size=SIZE, width=WIDTH, depth=1)
    doc = toy_manifest(tmp_path / "model.onnx")
    with pytest.raises(ValidationError, match="unknown task 'mean'"):
        Manifest.model_validate(doc)
    tasks.register(MEAN)
    try:
        m = Manifest.model_validate(doc)
        assert isinstance(m.postprocess, MeanPostprocess) and m.task == "mean"
        assert m.model_dump(mode="json") == doc  # written back as read
        with pytest.raises(ValidationError, match="unknown outputs"):
            Manifest.model_validate({**doc, "postprocess": {"kind": "mean", "output": "nope"}})
        with pytest.raises(ValidationError, match="does not match"):
            Manifest.model_validate({**doc, "task": "classify"})
    finally:
        tasks.unregister(MEAN.name)
    with pytest.raises(ValidationError, match="must name a task"):
        Manifest.model_validate({**doc, "task": "classify"})


def test_register_refuses_a_section_of_another_kind() -> None:
    class Wrong(MeanTask):
        name = "median"

    with pytest.raises(ValueError, match="kind must default to 'median'"):
        tasks.register(Wrong())
    assert "median" not in tasks.TASKS


def test_a_registered_task_is_served_by_the_generic_route(mean_task: MeanTask, tmp_path: Path) -> None:
    from visionserve.service.http.app import create_app

    repo = tmp_path / "repo"

    def build(staging: Path, version: str) -> Manifest:
        conv_stack(staging / "model.onnx", size=SIZE, width=WIDTH, depth=1)
        return Manifest.model_validate(toy_manifest(staging / "model.onnx", version=version))

    entry = write_version(repo, "toy", "1", build)
    write_conv_stack(repo, "clf", size=SIZE, width=WIDTH, depth=1)
    # what the answer must be: ONNX Runtime on the same preprocessed tensors
    prep = Preprocessor(entry.manifest.input, entry.manifest.preprocess)
    sess = ort.InferenceSession(str(entry.model_path), providers=["CPUExecutionProvider"])
    images = [CAT.read_bytes(), COFFEE.read_bytes()]
    expected = [float(sess.run(None, {"input": prep(img)[0][None]})[0].mean()) for img in images]
    assert abs(expected[0] - expected[1]) > 1e-4  # the two images are told apart

    app = create_app(Settings(repository=repo, data_dir=tmp_path / "data"))
    jpeg = {"Content-Type": "image/jpeg"}

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://toy", timeout=60) as c:
                for _ in range(300):  # bounded: models load in the background
                    if (await c.get("/v2/health/ready")).status_code == 200 and \
                            len((await c.get("/v1/models")).json()["models"]) == 2:
                        break
                    await asyncio.sleep(0.1)
                out["answers"] = await asyncio.gather(*(c.post("/v1/models/toy/mean", content=img, headers=jpeg)
                                                        for img in images))
                out["scaled"] = await c.post("/v1/models/toy/versions/1/mean?scale=2", content=images[0],
                                             headers=jpeg)
                out["bad_scale"] = await c.post("/v1/models/toy/mean?scale=-1", content=images[0], headers=jpeg)
                out["nan_scale"] = await c.post("/v1/models/toy/mean?scale=abc", content=images[0], headers=jpeg)
                out["wrong_task"] = await c.post("/v1/models/clf/mean", content=images[0], headers=jpeg)
                out["classify_toy"] = await c.post("/v1/models/toy/classify", content=images[0], headers=jpeg)
                out["bad_image"] = await c.post("/v1/models/toy/mean", content=b"not an image", headers=jpeg)
                tensor = {"name": "input", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE],
                          "data": prep(images[0])[0].reshape(-1).tolist()}
                out["oip"] = await c.post("/v2/models/toy/infer", json={"inputs": [tensor]})
                out["oip_classification"] = await c.post("/v2/models/toy/infer", json={
                    "inputs": [tensor], "outputs": [{"name": "logits", "parameters": {"classification": 2}}]})
                out["list"] = (await c.get("/v1/models")).json()
                out["openapi"] = (await c.get("/openapi.json")).json()
                out["metrics"] = (await c.get("/metrics")).text
        return out

    out = asyncio.run(scenario())
    for r, want in zip(out["answers"], expected):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "toy" and body["version"] == "1"
        assert body["mean"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert out["scaled"].json()["mean"] == pytest.approx(2 * expected[0], rel=1e-4, abs=1e-6)
    # the service's errors, for the task's own parameter check and FastAPI's type check alike
    assert out["bad_scale"].status_code == 422 and "scale must be a positive number" in out["bad_scale"].json()["error"]
    assert out["nan_scale"].status_code == 422 and "scale" in out["nan_scale"].json()["error"]
    assert out["wrong_task"].status_code == 422 and "use /classify" in out["wrong_task"].json()["error"]
    assert out["classify_toy"].status_code == 422 and "use /mean" in out["classify_toy"].json()["error"]
    assert out["bad_image"].status_code == 400 and "error" in out["bad_image"].json()
    # the Open Inference Protocol: the task's default output is the tensor itself; classification is refused
    oip = out["oip"].json()["outputs"][0]
    assert oip["name"] == "logits" and oip["shape"] == [1, WIDTH]
    assert float(np.mean(oip["data"])) == pytest.approx(expected[0], rel=1e-4, abs=1e-6)
    assert out["oip_classification"].status_code == 400
    # listed, documented and counted like any task
    assert {m["name"]: m["task"] for m in out["list"]["models"]} == {"toy": "mean", "clf": "classify"}
    assert "/v1/models/{model}/mean" in out["openapi"]["paths"]
    params = [p["name"] for p in out["openapi"]["paths"]["/v1/models/{model}/mean"]["post"]["parameters"]]
    assert "scale" in params
    assert 'visionserve_requests_total{endpoint="mean",model="toy",outcome="success",version="1"} 3.0' in \
        out["metrics"]
    assert 'endpoint="mean",model="toy",outcome="invalid_parameter"' in out["metrics"]
    assert 'endpoint="mean",model="toy",outcome="bad_image"' in out["metrics"]
    # the load generator sends the task's kind to its route
    p = build_payload("mean", "toy", CAT.read_bytes())
    assert (p.method, p.path) == ("POST", "/v1/models/toy/mean")
