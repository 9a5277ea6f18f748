"""Shared fixtures: a real model repository and real servers on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "examples" / "images" / "cat.jpg"
COFFEE = ROOT / "examples" / "images" / "coffee.jpg"
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def mobilenet_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the real ImageNet MobileNetV2, built by the converter (≈ 20 s, once)."""
    from visionserve.convert.default import build_default

    repo = tmp_path_factory.mktemp("repo")
    build_default(repo, with_embed=False)  # fp32 only: mobilenet_v2 and shapes_detector
    return repo


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(repo: Path, tmp: Path, env: dict[str, str] | None = None, timeout: float = 90) -> Server:
    port = free_port()
    log = tmp / f"server-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "visionserve.service", "serve", "--repository", str(repo), "--port", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=full_env, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return Server(url, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout} s:\n{log.read_text()}")


def stop_server(server: Server) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


@pytest.fixture(scope="session")
def server(mobilenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``visionserve serve`` over the MobileNetV2 repository, small limits to exercise the errors."""
    s = start_server(mobilenet_repo, tmp_path_factory.mktemp("server"), env={
        "VISIONSERVE_MAX_BODY_BYTES": str(8 * 1024 * 1024),
        "VISIONSERVE_MAX_PIXELS": str(20_000_000),
    })
    yield s
    stop_server(s)
