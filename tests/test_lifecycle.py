"""Model lifecycle over real HTTP, on a real server process: versions published and broken under load (poll
mode), unload / load through tritonclient (explicit mode), broken models at start beside good ones."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from .conftest import ROOT, Server, free_port, start_server, stop_server
from .repo_util import DIGIT_PNG, big_model, publish, publish_broken

PNG = {"Content-Type": "image/png"}


@dataclass
class Answer:
    sent: float  # time.monotonic() when the request was sent
    received: float
    status: int
    version: str | None


class ClosedLoop:
    """``clients`` threads, each sending one classify request after another until stopped (bounded in time)."""

    def __init__(self, url: str, model: str, clients: int = 4, limit_s: float = 90,
                 headers: dict[str, str] | None = None) -> None:
        self.url = f"{url}/v1/models/{model}/classify?top_k=1"
        self.headers = {**PNG, **(headers or {})}
        self.answers: list[list[Answer]] = [[] for _ in range(clients)]
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._until = time.monotonic() + limit_s
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        body = DIGIT_PNG.read_bytes()
        with httpx.Client(timeout=30) as c:
            while not self._stop.is_set() and time.monotonic() < self._until:
                sent = time.monotonic()
                try:
                    r = c.post(self.url, content=body, headers=self.headers)
                except httpx.HTTPError as e:  # a lost request: the test fails on it
                    self.errors.append(e)
                    continue
                version = r.json().get("version") if r.status_code == 200 else None
                self.answers[i].append(Answer(sent, time.monotonic(), r.status_code, version))

    def __enter__(self) -> ClosedLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def all(self) -> list[Answer]:
        return sorted((a for client in self.answers for a in client), key=lambda a: a.sent)

    def wait_for(self, version: str, since: float, timeout: float) -> float:
        """Seconds from ``since`` until the first answer from ``version`` arrived."""
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            first = [a.received for a in self.all() if a.version == version]
            if first:
                return min(first) - since
            time.sleep(0.05)
        raise AssertionError(f"no answer from version {version} within {timeout} s")


class SlowUpload(threading.Thread):
    """A classify request whose body arrives in two halves, the second once ``release`` is set: the server
    has looked the model up (at the headers) long before the request can be run."""

    def __init__(self, url: str, model: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url = f"{url}/v1/models/{model}/classify?top_k=1"
        self.headers = {**PNG, **(headers or {})}
        self.release = threading.Event()
        self.started_upload = threading.Event()
        self.response: httpx.Response | None = None

    def run(self) -> None:
        body = DIGIT_PNG.read_bytes()

        def chunks():  # type: ignore[no-untyped-def]
            yield body[: len(body) // 2]
            self.started_upload.set()
            self.release.wait(60)
            yield body[len(body) // 2:]

        self.response = httpx.post(self.url, content=chunks(), headers=self.headers, timeout=90)


def index(url: str, **kw: object) -> dict[tuple[str, str], dict[str, str]]:
    r = httpx.post(f"{url}/v2/repository/index", timeout=30, **kw)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    return {(e["name"], e["version"]): e for e in r.json()}


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def rss(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    m = re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M)
    assert m, "the process collector is missing"
    return float(m.group(1))


def test_publishing_versions_under_load_loses_nothing(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish(repo, "digits", "1")
    server = start_server(repo, tmp_path, env={"VISIONSERVE_MODEL_CONTROL": "poll"})  # default poll interval
    try:
        slow = SlowUpload(server.url, "digits")
        with ClosedLoop(server.url, "digits") as load:
            slow.start()
            assert slow.started_upload.wait(10)
            time.sleep(1.0)
            published = time.monotonic()
            publish(repo, "digits", "2")
            switch_s = load.wait_for("2", published, timeout=15)
            first_v2 = min(a.received for a in load.all() if a.version == "2")
            time.sleep(0.5)
            slow.release.set()  # version 2 serves by now; the slow request looked version 1 up before that
            slow.join(30)
            assert slow.response is not None and slow.response.status_code == 200, slow.response
            assert slow.response.json()["version"] == "1"

            broken_at = time.monotonic()
            publish_broken(repo, "digits", "3", "checksum")
            until = time.monotonic() + 15
            while not index(server.url).get(("digits", "3"), {}).get("reason", "").startswith("checksum: "):
                assert time.monotonic() < until, "version 3 never showed up in the index"
                time.sleep(0.2)
            refused_at = time.monotonic()
            time.sleep(1.0)  # keep the load on a little after version 3 was refused
        answers = load.all()
        assert not load.errors, load.errors[:3]
        assert answers and all(a.status == 200 for a in answers), {a.status for a in answers}
        assert switch_s <= 15
        # A request sent after the first version-2 answer arrived found version 2 already the default.
        assert {a.version for a in answers if a.sent > first_v2} == {"2"}
        assert any(a.sent > refused_at for a in answers)  # (and those were answered by version 2, as above)
        assert broken_at < refused_at
        assert len([a for a in answers if a.sent < published]) > 4  # the load was really on before

        print(f"version 2 answered {switch_s:.2f} s after its directory appeared; {len(answers)} requests from 4 "
              f"clients, all 200 ({sum(a.version == '1' for a in answers)} from v1, "
              f"{sum(a.version == '2' for a in answers)} from v2)")
        idx = index(server.url)
        assert idx[("digits", "2")]["state"] == "READY"
        assert idx[("digits", "1")] == {"name": "digits", "version": "1", "state": "UNAVAILABLE",
                                        "reason": "replaced by version 2"}
        assert "sha256 does not match" in idx[("digits", "3")]["reason"]
        assert metric(server.url, "visionserve_model_load_failures_total", version="3", cause="checksum") == 1
        # every accepted request was answered by the server as a success, on one version or the other
        served = metric(server.url, "visionserve_requests_total", model="digits", outcome="success")
        assert served == len(answers) + 1  # and the slow upload
        assert metric(server.url, "visionserve_model_unloads_total", version="1") == 1  # drained, then unloaded

        # poll mode owns the repository: the API may not load or unload
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        with pytest.raises(InferenceServerException, match="explicit"):
            client.unload_model("digits")
    finally:
        stop_server(server)


def test_unload_frees_memory_and_load_brings_it_back(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish(repo, "digits", "1")
    weights = big_model(tmp_path / "big.onnx")
    publish(repo, "big", "1", weights)
    key = "s3cret"
    server = start_server(repo, tmp_path, env={"VISIONSERVE_MODEL_CONTROL": "explicit",
                                                "VISIONSERVE_LOAD_MODELS": '["*"]', "VISIONSERVE_API_KEY": key})
    auth = {"X-API-Key": key}
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        assert httpx.post(f"{server.url}/v2/repository/index").status_code == 401
        with pytest.raises(InferenceServerException, match="API key"):
            client.unload_model("big")
        bad = httpx.post(f"{server.url}/v2/repository/models/big/load", content=b"[1", headers=auth)
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
        with pytest.raises(InferenceServerException, match="not supported"):  # Triton's config override
            client.load_model("big", headers=auth, config='{"max_batch_size": 8}')
        with pytest.raises(InferenceServerException, match="no model 'nope'"):
            client.load_model("nope", headers=auth)
        entries = client.get_model_repository_index(headers=auth)
        assert {(e["name"], e["state"]) for e in entries} == {("big", "READY"), ("digits", "READY")}

        loaded = rss(server.url)
        slow = SlowUpload(server.url, "big", headers=auth)
        slow.start()
        assert slow.started_upload.wait(10)
        released_at: list[float] = []

        def release() -> None:
            released_at.append(time.monotonic())
            slow.release.set()

        threading.Timer(1.0, release).start()
        with ClosedLoop(server.url, "big", clients=4, headers=auth) as load:
            time.sleep(0.5)
            unloaded_at = time.monotonic()
            client.unload_model("big", headers=auth)  # returns once drained and released
            unload_returned = time.monotonic()
            time.sleep(0.5)
        slow.join(30)
        # the request that had looked "big" up before the unload was answered, and the unload waited for it
        assert slow.response is not None and slow.response.status_code == 200, slow.response
        assert released_at and unload_returned > released_at[0]  # it waited for the rest of that upload
        answers = load.all()
        assert not load.errors
        assert {a.status for a in answers} <= {200, 404}, {a.status for a in answers}
        late = [a.status for a in answers if a.sent > unload_returned]
        assert late and set(late) == {404}
        assert any(a.status == 200 for a in answers if a.sent < unloaded_at)
        for client_answers in load.answers:  # each client: answers until the unload, then 404s, never back
            statuses = [a.status for a in client_answers]
            assert statuses == sorted(statuses, key=lambda s: s == 404)
        r = httpx.post(f"{server.url}/v1/models/big/classify", content=DIGIT_PNG.read_bytes(), headers={**PNG, **auth})
        assert r.status_code == 404 and "not loaded" in r.json()["error"]
        assert client.get_model_repository_index(headers=auth)[0] == {
            "name": "big", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
        assert not client.is_model_ready("big", headers=auth)
        after = rss(server.url)
        size = weights.stat().st_size
        print(f"unload: RSS {loaded / 2**20:.0f} -> {after / 2**20:.0f} MiB ({size / 2**20:.0f} MiB model); "
              f"{len(answers)} requests around it: {sum(a.status == 200 for a in answers)} x 200, "
              f"{sum(a.status == 404 for a in answers)} x 404")
        assert loaded - after > 0.8 * size, "the unload did not give the model's memory back"

        client.load_model("big", headers=auth)
        assert client.is_model_ready("big", headers=auth)
        r = httpx.post(f"{server.url}/v1/models/big/classify", content=DIGIT_PNG.read_bytes(), headers={**PNG, **auth})
        assert r.status_code == 200 and r.json()["version"] == "1"
        reloaded = rss(server.url)
        print(f"load: RSS {after / 2**20:.0f} -> {reloaded / 2**20:.0f} MiB")
        assert reloaded - after > 0.8 * size
        r = httpx.post(f"{server.url}/v1/models/digits/classify", content=DIGIT_PNG.read_bytes(),
                       headers={**PNG, **auth})
        assert r.status_code == 200  # the other model never noticed
    finally:
        stop_server(server)


def test_broken_models_at_start_leave_the_good_ones_serving(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish(repo, "digits", "1")
    publish_broken(repo, "garbage", "1", "onnx")
    publish_broken(repo, "truncated", "1", "manifest")
    publish(repo, "needs_gpu", "1")
    server = start_server(repo, tmp_path, env={
        "VISIONSERVE_MODELS__NEEDS_GPU__REQUIRE_PROVIDER": "CUDAExecutionProvider"})
    try:
        r = httpx.post(f"{server.url}/v1/models/digits/classify", content=DIGIT_PNG.read_bytes(), headers=PNG)
        assert r.status_code == 200 and r.json()["version"] == "1"
        idx = index(server.url)
        assert idx[("digits", "1")]["state"] == "READY"
        assert idx[("garbage", "1")]["state"] == "UNAVAILABLE"
        assert idx[("garbage", "1")]["reason"].startswith("onnx: ")
        assert idx[("truncated", "1")]["reason"].startswith("manifest: ")
        assert idx[("needs_gpu", "1")]["reason"].startswith("provider: CUDAExecutionProvider is required")

        r = httpx.post(f"{server.url}/v1/models/needs_gpu/classify", content=DIGIT_PNG.read_bytes(), headers=PNG)
        assert r.status_code == 503 and "CUDAExecutionProvider is required" in r.json()["error"]
        assert r.headers["retry-after"]
        assert metric(server.url, "visionserve_model_unavailable", model="needs_gpu", cause="provider") == 1
        models = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
        assert models["digits"]["state"] == "READY" and models["digits"]["execution_provider"] == "CPUExecutionProvider"
        assert models["garbage"]["state"] == "UNAVAILABLE" and models["garbage"]["versions"] == []
        assert models["garbage"]["version_states"][0]["reason"].startswith("onnx: ")
        gpu = models["needs_gpu"]  # described from its manifest; the provider it needs is not there
        assert gpu["state"] == "UNAVAILABLE" and gpu["task"] == "classify" and gpu["execution_provider"] is None
        assert gpu["input"]["shape"] == [-1, 3, 32, 32]
        meta = httpx.get(f"{server.url}/v2/models/digits").json()
        assert meta["version_states"] == [{"version": "1", "state": "READY", "reason": "",
                                           "execution_provider": "CPUExecutionProvider"}]
        r = httpx.get(f"{server.url}/v2/models/truncated")  # nothing readable to describe it: the error says why
        assert r.status_code == 503 and "invalid manifest" in r.json()["error"]
        meta = httpx.get(f"{server.url}/v2/models/garbage").json()
        assert "onnxruntime cannot load it" in meta["version_states"][0]["reason"]
        meta = httpx.get(f"{server.url}/v2/models/needs_gpu").json()  # described from its manifest, with why
        assert meta["state"] == "UNAVAILABLE" and meta["versions"] == []
        assert meta["parameters"]["execution_provider"] is None
        assert "CUDAExecutionProvider is required" in meta["version_states"][0]["reason"]
        r = httpx.get(f"{server.url}/v2/models/needs_gpu/ready")
        assert r.status_code == 503 and "CUDAExecutionProvider is required" in r.json()["error"]
    finally:
        stop_server(server)


def start_live(repo: Path, tmp: Path, *args: str, timeout: float = 60) -> Server:
    """``visionserve serve`` with command-line options, returned once it is live (ready or not)."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "visionserve.service",
                             "serve", "--repository", str(repo), "--port", str(port),
                             *args], stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        assert proc.poll() is None, server.output()
        try:
            if httpx.get(f"{server.url}/v2/health/live", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise AssertionError(f"server not live in {timeout} s:\n{server.output()}")


def wait_until(check: object, timeout: float, what: str) -> None:
    until = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < until, what
        time.sleep(0.2)


def test_strict_readiness_until_a_good_version_fixes_the_broken_model(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish(repo, "digits", "1")
    publish_broken(repo, "garbage", "1", "onnx")
    server = start_live(repo, tmp_path, "--model-control", "poll", "--poll-interval", "0.5", "--strict-readiness")
    ready = f"{server.url}/v2/health/ready"
    try:
        wait_until(lambda: "onnx: " in str(index(server.url).get(("garbage", "1"))), 30, "garbage never refused")
        r = httpx.get(ready)
        assert r.status_code == 503 and "garbage" in r.json()["error"] and "digits" not in r.json()["error"]
        r = httpx.post(f"{server.url}/v1/models/digits/classify", content=DIGIT_PNG.read_bytes(), headers=PNG)
        assert r.status_code == 200  # not ready as a whole, yet the good model serves

        publish(repo, "garbage", "2")  # a good version of the broken model
        wait_until(lambda: httpx.get(ready).status_code == 200, 15, "a good version 2 did not make it ready")
        r = httpx.post(f"{server.url}/v1/models/garbage/classify", content=DIGIT_PNG.read_bytes(), headers=PNG)
        assert r.status_code == 200 and r.json()["version"] == "2"
    finally:
        code = stop_server(server)
    assert code == 0, server.output()[-2000:]  # SIGTERM with the poller running: a clean exit
