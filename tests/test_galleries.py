"""Gallery storage: crashes mid-write, concurrent writer processes, a SIGKILLed server, a new model version."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT, start_server, stop_server
from tests.test_embed import MODEL, enrol_unseen, make_repo, post, put, unseen
from visionserve.service.galleries import GalleryStore

WRITER = """
import os, sys
from pathlib import Path
import numpy as np
from visionserve.service.galleries import Gallery, GalleryStore, Item

root, who, count, crash_at = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
store = GalleryStore(root)

def add(n):
    key = f"{who}{n}".encode().hex().ljust(64, "0")
    change = lambda g: (g or Gallery("g", "m", "1")).with_item(Item(f"{who}{n}", who, key), np.full(4, n, np.float32))
    return change, {key: f"image {who} {n}".encode()}

for n in range(count):
    store.update("g", *add(n))
if crash_at:  # die at the crash_at-th fsync of the next write, as a power cut or SIGKILL would
    calls = [0]
    real = os.fsync
    def fsync(fd):
        calls[0] += 1
        if calls[0] == crash_at:
            os._exit(9)
        real(fd)
    os.fsync = fsync
    store.update("g", *add(count))
    print("no crash")
"""


def run_writer(root: Path, who: str, count: int, crash_at: int = 0) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(root), who, str(count), str(crash_at)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize(("crash_at", "items"), [(1, 3), (2, 3), (3, 3), (4, 4)])
def test_a_crash_mid_write_leaves_the_previous_or_the_new_state(tmp_path: Path, crash_at: int, items: int) -> None:
    """The fsyncs of one update: image file, image directory, state temp file, state directory. Before the
    rename (3rd) the previous state survives whole; after it (4th), the new one."""
    proc = run_writer(tmp_path, "a", 3, crash_at)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 9, out.decode()
    store = GalleryStore(tmp_path)
    g = store.load("g")
    assert [it.item for it in g.items] == [f"a{i}" for i in range(items)]
    assert g.vectors.shape == (items, 4) and g.vectors[:, 0].tolist() == list(range(items))
    assert all(store.image("g", it.image) == f"image a {i}".encode() for i, it in enumerate(g.items))
    # the next write works and sweeps what the crash left behind
    proc = run_writer(tmp_path, "b", 1)
    assert proc.wait(60) == 0
    assert len(store.load("g").items) == items + 1
    assert not [p for p in (tmp_path / "galleries" / "g").rglob(".*.tmp")]


def test_concurrent_writer_processes_lose_nothing(tmp_path: Path) -> None:
    procs = [run_writer(tmp_path, who, 25) for who in ("p", "q", "r")]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()
    g = GalleryStore(tmp_path).load("g")
    assert sorted(it.item for it in g.items) == sorted(f"{w}{n}" for w in "pqr" for n in range(25))
    assert len(list((tmp_path / "galleries" / "g" / "images").iterdir())) == 75


def test_a_killed_server_keeps_every_acknowledged_enrolment(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    env = {"VISIONSERVE_DATA_DIR": str(tmp_path / "data")}
    s = start_server(repo, tmp_path, env=env)
    images = [img for d in range(5, 10) for img in unseen(d)[:40]]
    acknowledged: set[str] = set()
    stop = threading.Event()

    def enrol(worker: int) -> None:
        with httpx.Client(timeout=10) as client:
            for i in range(worker, len(images), 4):
                if stop.is_set():
                    return
                try:
                    r = client.put(f"{s.url}/v1/galleries/k/items/i{i}", content=images[i],
                                   params={"model": MODEL}, headers={"Content-Type": "image/png"})
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code in (200, 201):
                    acknowledged.add(f"i{i}")

    threads = [threading.Thread(target=enrol, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    s.process.send_signal(signal.SIGKILL)  # mid-stream: some enrolments are being written right now
    s.process.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acknowledged) >= 20
    s = start_server(repo, tmp_path, env=env)
    try:
        r = httpx.get(f"{s.url}/v1/galleries/k")
        assert r.status_code == 200
        present = {it["item"] for it in r.json()["items"]}
        assert acknowledged <= present
        assert put(s, "k", "after", unseen(5)[0]).status_code == 201  # and it is still writable
    finally:
        stop_server(s)


def _version_2(repo: Path) -> None:
    """A new version of the model with 128-D embeddings (v1's, twice, / sqrt 2): a gallery that was not
    re-embedded could not even be compared with it."""
    import onnx
    from onnx import helper, numpy_helper

    from visionserve.service.manifest import Manifest, sha256_file

    v1, v2 = repo / MODEL / "1", repo / MODEL / "2"
    v2.mkdir()
    m = onnx.load(str(v1 / "model.onnx"))
    out = m.graph.output[0]
    for node in m.graph.node:
        node.output[:] = [f"{o}_v1" if o == out.name else o for o in node.output]
    m.graph.initializer.append(numpy_helper.from_array(np.array([2 ** -0.5], np.float32), "inv_sqrt2"))
    m.graph.node.extend([helper.make_node("Concat", [f"{out.name}_v1"] * 2, ["twice"], axis=1),
                         helper.make_node("Mul", ["twice", "inv_sqrt2"], [out.name])])
    out.type.tensor_type.shape.dim[1].dim_value = 128
    onnx.save(m, str(v2 / "model.onnx"))
    doc = json.loads((v1 / "manifest.json").read_text())
    doc["version"] = "2"
    doc["outputs"][0]["shape"] = [-1, 128]
    doc["provenance"]["onnx_sha256"] = sha256_file(v2 / "model.onnx")
    Manifest.model_validate(doc).write(v2)


def test_a_new_model_version_rebuilds_the_gallery(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    env = {"VISIONSERVE_DATA_DIR": str(tmp_path / "data")}
    s = start_server(repo, tmp_path, env=env)
    try:
        enrol_unseen(s, "g")
    finally:
        stop_server(s)
    _version_2(repo)
    s = start_server(repo, tmp_path, env=env)
    try:
        assert httpx.get(f"{s.url}/v1/galleries/g").json()["version"] == "1"  # as stored, until used
        r = post(f"{s.url}/v1/galleries/g/identify", unseen(8)[0])  # the enrolled 8 itself
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == "2" and body["label"] == "8"
        assert body["matches"][0]["similarity"] > 0.999
        assert httpx.get(f"{s.url}/v1/galleries/g").json()["version"] == "2"
        assert GalleryStore(tmp_path / "data").load("g").vectors.shape == (5, 128)
        assert put(s, "g", "more", unseen(9)[1], label="9").json()["version"] == "2"
    finally:
        stop_server(s)
