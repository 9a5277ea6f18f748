"""The registry's lifecycle rules, in process: version policies, every way a version can fail (and that the
others keep serving), reloads of changed files, removed versions, draining, provider requirements."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from visionserve.service.errors import Conflict, ModelNotFound, Unavailable
from visionserve.service.metrics import Metrics
from visionserve.service.registry import Registry
from visionserve.service.settings import Settings

from .repo_util import DIGITS, publish, publish_broken


def registry(repo: Path, **settings: Any) -> Registry:
    return Registry(Settings(repository=repo, cpus=1, **settings), Metrics(process=False))


def run(repo: Path, body: Callable[[Registry], Awaitable[None]], **settings: Any) -> None:
    """Start a registry over ``repo``, run ``body`` on it, close it."""

    async def main() -> None:
        reg = registry(repo, **settings)
        await reg.load_all()
        try:
            await body(reg)
        finally:
            await reg.close()

    asyncio.run(main())


def states(reg: Registry, name: str) -> dict[str, tuple[str, str]]:
    return {r.version: (r.state, r.reason) for r in reg.records(name)}


def metric(reg: Registry, name: str, **labels: str) -> float | None:
    return reg.metrics.registry.get_sample_value(name, labels)


def test_a_broken_newest_version_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    publish(tmp_path, "digits", "1")
    publish_broken(tmp_path, "digits", "2", "checksum")

    async def body(reg: Registry) -> None:
        assert reg.get("digits").version == "1" and reg.ready
        s = states(reg, "digits")
        assert s["1"] == ("READY", "")
        assert s["2"][0] == "UNAVAILABLE" and "sha256 does not match" in s["2"][1]
        with pytest.raises(Unavailable, match="sha256"):
            reg.get("digits", "2")
        index = await reg.index()
        assert [(e["version"], e["state"]) for e in index] == [("1", "READY"), ("2", "UNAVAILABLE")]
        assert await reg.index(ready_only=True) == [index[0]]
        assert metric(reg, "visionserve_model_load_failures_total", model="digits", version="2",
                      cause="checksum") == 1
        assert metric(reg, "visionserve_model_unavailable", model="digits", version="2", cause="checksum") == 1

    run(tmp_path, body)


def test_every_kind_of_broken_model_is_unavailable_with_its_cause_and_the_good_one_serves(tmp_path: Path) -> None:
    publish(tmp_path, "good", "1")
    for kind in ("onnx", "manifest", "shape"):
        publish_broken(tmp_path, kind, "1", kind)
    mislabelled = publish(tmp_path, "elsewhere", "1")  # a directory copied under another name, manifest untouched
    shutil.copytree(mislabelled, tmp_path / "mislabelled" / "1")
    publish(tmp_path, "needs_cuda", "1")
    models = {"needs_cuda": {"require_provider": "CUDAExecutionProvider"}}

    async def body(reg: Registry) -> None:
        assert reg.get("good").version == "1"
        causes = {n: reg.records(n)[0].reason.split(":")[0] for n in reg.known()}
        assert causes == {"good": "", "elsewhere": "", "onnx": "onnx", "manifest": "manifest", "shape": "warmup",
                          "mislabelled": "manifest", "needs_cuda": "provider"}
        assert "the manifest says elsewhere version 1" in reg.records("mislabelled")[0].reason
        with pytest.raises(Unavailable, match="CUDAExecutionProvider is required") as e:
            reg.get("needs_cuda")
        assert e.value.status_code == 503
        assert metric(reg, "visionserve_model_unavailable", model="needs_cuda", version="1", cause="provider") == 1
        assert reg.ready  # lenient readiness: some model serves
        reg.settings.strict_readiness = True
        reason = reg.not_ready_reason()
        assert reason and "needs_cuda" in reason and "shape" in reason and "good" not in reason
        with pytest.raises(ModelNotFound):
            reg.get("nope")

    run(tmp_path, body, models=models)


@pytest.mark.parametrize(("policy", "served"), [
    ({"latest": {"num_versions": 2}}, ["2", "3"]),
    ({"specific": {"versions": [1, 3]}}, ["1", "3"]),
    ({"all": {}}, ["1", "2", "3"]),
    ({}, ["3"]),  # Triton's default: the latest version
])
def test_version_policy(tmp_path: Path, policy: dict[str, Any], served: list[str]) -> None:
    for v in ("1", "2", "3"):
        publish(tmp_path, "digits", v)

    async def body(reg: Registry) -> None:
        assert reg.versions("digits") == served
        assert reg.get("digits").version == served[-1]
        for v, (state, reason) in states(reg, "digits").items():
            assert (state == "READY") == (v in served)
            if v not in served:
                assert reason.startswith("not among")
                with pytest.raises(ModelNotFound, match="not loaded"):
                    reg.get("digits", v)

    run(tmp_path, body, models={"digits": {"version_policy": policy}})


@pytest.mark.parametrize(("control", "served"), [("none", ["1", "2", "3"]), ("poll", ["3"])])
def test_default_version_policy_follows_model_control(tmp_path: Path, control: str, served: list[str]) -> None:
    """``none`` serves every version, as the server always did; poll (and explicit) Triton's latest 1."""
    for v in ("1", "2", "3"):
        publish(tmp_path, "digits", v)

    async def body(reg: Registry) -> None:
        assert reg.versions("digits") == served
        assert reg.get("digits").version == "3"

    run(tmp_path, body, model_control=control)


def test_poll_swaps_after_warm_up_drains_the_old_version_and_follows_removals(tmp_path: Path) -> None:
    publish(tmp_path, "digits", "1")
    x = np.zeros((3, 32, 32), dtype=np.float32)

    async def body(reg: Registry) -> None:
        v1 = reg.get("digits")
        v1.users += 1  # a request that looked version 1 up and has not finished
        publish(tmp_path, "digits", "2")
        await reg.poll_once()
        assert reg.get("digits").version == "2"
        assert states(reg, "digits")["1"] == ("UNAVAILABLE", "replaced by version 2")
        await asyncio.sleep(0.2)
        out = await v1.batcher.submit(x)  # version 1 still answers the request that holds it
        assert out[0].shape == (10,)
        assert metric(reg, "visionserve_model_unloads_total", model="digits", version="1") is None
        v1.users -= 1
        gone = weakref.ref(v1)
        del v1
        for _ in range(100):
            if metric(reg, "visionserve_model_unloads_total", model="digits", version="1") == 1:
                break
            await asyncio.sleep(0.05)
        assert metric(reg, "visionserve_model_unloads_total", model="digits", version="1") == 1
        gc.collect()
        assert gone() is None, "something still holds the unloaded version (and its sessions)"

        shutil.rmtree(tmp_path / "digits" / "2")  # version 2 withdrawn: version 1 is the latest again
        await reg.poll_once()
        assert reg.get("digits").version == "1" and set(states(reg, "digits")) == {"1"}

    run(tmp_path, body, model_control="poll", poll_interval_s=3600)


def test_changed_files_that_fail_keep_the_loaded_ones_serving(tmp_path: Path) -> None:
    d = publish(tmp_path, "digits", "1")

    async def body(reg: Registry) -> None:
        before = reg.get("digits")
        (d / "model.onnx").write_bytes(b"overwritten in place, not published")
        os.utime(d / "model.onnx", ns=(1, 1))
        await reg.poll_once()
        assert reg.get("digits") is before
        state, reason = states(reg, "digits")["1"]
        assert state == "READY" and "failed to load" in reason and "still serving" in reason
        shutil.copyfile(DIGITS / "model.onnx", d / "model.onnx")  # the right file again: reloaded
        await reg.poll_once()
        assert reg.get("digits") is not before and states(reg, "digits")["1"] == ("READY", "")

    run(tmp_path, body, model_control="poll", poll_interval_s=3600)


def test_explicit_mode_loads_what_it_is_told(tmp_path: Path) -> None:
    publish(tmp_path, "a", "1")
    publish(tmp_path, "b", "1")

    async def body(reg: Registry) -> None:
        assert reg.versions("a") == ["1"] and reg.versions("b") == []
        with pytest.raises(ModelNotFound, match="not loaded"):
            reg.get("b")
        await reg.load("b")
        assert reg.get("b").version == "1"
        await reg.unload("a")
        with pytest.raises(ModelNotFound, match="not loaded"):
            reg.get("a")
        assert states(reg, "a")["1"] == ("UNAVAILABLE", "unloaded")
        with pytest.raises(ModelNotFound):
            await reg.load("nope")
        publish_broken(tmp_path, "c", "1", "onnx")
        with pytest.raises(Unavailable, match="onnxruntime cannot load it"):
            await reg.load("c")

    run(tmp_path, body, model_control="explicit", load_models=["a"])


def test_load_and_unload_need_explicit_mode(tmp_path: Path) -> None:
    publish(tmp_path, "a", "1")

    async def body(reg: Registry) -> None:
        with pytest.raises(Conflict, match="explicit"):
            await reg.load("a")
        with pytest.raises(Conflict, match="explicit"):
            await reg.unload("a")

    run(tmp_path, body)


def test_a_provider_that_silently_falls_back_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A CUDA build without a usable GPU: onnxruntime creates the session on CPU without raising."""
    publish(tmp_path, "strict", "1")
    publish(tmp_path, "lenient", "1")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    models = {"strict": {"providers": ["CUDAExecutionProvider"], "require_provider": "CUDAExecutionProvider"},
              "lenient": {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}}

    async def body(reg: Registry) -> None:
        state, reason = states(reg, "strict")["1"]
        assert state == "UNAVAILABLE"
        assert "failed to initialise; the session would run on CPUExecutionProvider" in reason
        assert reg.get("lenient").provider == "CPUExecutionProvider"  # the default: fall back...
        assert reg.describe("lenient")["version_states"][0]["execution_provider"] == "CPUExecutionProvider"

    with caplog.at_level(logging.WARNING, logger="visionserve.runtime"):
        run(tmp_path, body, models=models)
    assert "preferred execution provider CUDAExecutionProvider is not in use" in caplog.text  # ...with a warning
