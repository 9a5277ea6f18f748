"""Helpers for the load-generator tests: the known-behaviour test server in a subprocess."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JPEG = b"\xff\xd8\xff\xe0" + b"not really a jpeg, the test server only checks the type" * 4


@contextlib.contextmanager
def test_server(**behaviour: object) -> Iterator[str]:
    """Run ``python -m visionserve.loadtest.testserver`` with ``--key value`` options; yield its base URL."""
    args = [sys.executable, "-m", "visionserve.loadtest.testserver", "--port", "0", "--max-seconds", "120"]
    for key, value in behaviour.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if line.startswith("listening on ") or proc.poll() is not None:
                break
        if not line.startswith("listening on "):
            raise RuntimeError(f"test server did not start: {line!r}")
        yield line.split()[-1]
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


test_server.__test__ = False  # type: ignore[attr-defined]  # not a test, despite the name
