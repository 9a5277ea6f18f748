"""``visionserve serve`` as a child process: a free 127.0.0.1 port, ready when ``/v2/health/ready`` answers
200, stopped with a drain (SIGTERM, SIGKILL after 30 s). What ``visionserve tune`` does for every candidate,
and what the tests and the benchmarks do for every server they start: one piece of code for all three."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(repository: Path, workdir: Path, *, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
          clean_env: bool = False, module: str = "visionserve.service", cwd: Path | None = None,
          timeout: float = 180) -> ServerProcess:
    """Serve ``repository`` (extra ``serve`` options in ``args``), the log in ``workdir``; return once ready.
    ``clean_env`` drops the caller's ``VISIONSERVE_*`` settings; ``module``/``cwd`` run another tree's code.
    A server that exits or is not ready in ``timeout`` s is killed, and RuntimeError carries its log."""
    port = free_port()
    log = workdir / f"server-{port}.log"
    base = {k: v for k, v in os.environ.items() if not (clean_env and k.startswith("VISIONSERVE_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "serve", "--repository", str(repository), "--port", str(port), *args],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=cwd, env={**base, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {_last_line(server)}\n{server.output()}")
        try:
            with urllib.request.urlopen(server.url + "/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return server
        except OSError:  # refused, 503 (HTTPError) or timed out: not ready yet
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"server not ready in {timeout:.0f} s: {_last_line(server)}\n{server.output()}")


def stop(server: ServerProcess) -> int:
    """SIGTERM (a graceful drain), SIGKILL after 30 s; the exit code."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


def _last_line(server: ServerProcess) -> str:
    lines = [line for line in server.output().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"
