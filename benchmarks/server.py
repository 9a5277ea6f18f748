"""Start and stop ``visionserve serve`` for benchmarks (they never import tests/): the product's
``visionserve.loadtest.server_process``, with this checkout as the working directory."""

from __future__ import annotations

from pathlib import Path

from visionserve.loadtest.server_process import ServerProcess as Server
from visionserve.loadtest.server_process import free_port
from visionserve.loadtest.server_process import stop as stop_server

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "examples" / "images" / "cat.jpg"

__all__ = ["CAT", "ROOT", "Server", "free_port", "start_server", "stop_server"]


def start_server(repo: Path, tmp: Path, env: dict[str, str] | None = None, timeout: float = 90,
                 module: str = "visionserve.service", cwd: Path = ROOT) -> Server:
    """The server over ``repo``, its log in ``tmp``; returns once ``/v2/health/ready`` answers 200.
    ``module``/``cwd``: run another source tree's code (``trees.importable``)."""
    from visionserve.loadtest.server_process import start

    return start(repo, tmp, env=env, module=module, cwd=cwd, timeout=timeout)
