"""Start and stop ``visionserve serve`` on a free 127.0.0.1 port, for benchmarks (they never import tests/)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "examples" / "images" / "cat.jpg"


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(repo: Path, tmp: Path, env: dict[str, str] | None = None, timeout: float = 90,
                 module: str = "visionserve.service", cwd: Path = ROOT) -> Server:
    """The server over ``repo``, its log in ``tmp``; returns once ``/v2/health/ready`` answers 200.
    ``module``/``cwd``: run another source tree's code (``trees.importable``)."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "serve", "--repository", str(repo), "--port", str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
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
    proc.wait()
    raise RuntimeError(f"server not ready in {timeout} s:\n{log.read_text()}")


def stop_server(server: Server) -> int:
    """SIGTERM (a graceful drain), SIGKILL after 30 s; the exit code."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode
