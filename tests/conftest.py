"""Shared fixtures: a real model repository and real servers on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from visionserve.loadtest.server_process import ServerProcess as Server
from visionserve.loadtest.server_process import free_port, start  # noqa: F401 (free_port: for the tests)
from visionserve.loadtest.server_process import stop as stop_server

ROOT = Path(__file__).resolve().parent.parent
CAT = ROOT / "examples" / "images" / "cat.jpg"
COFFEE = ROOT / "examples" / "images" / "coffee.jpg"
CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="session")
def mobilenet_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the real ImageNet MobileNetV2, built by the converter (≈ 20 s, once)."""
    from visionserve.convert.default import build_default

    repo = tmp_path_factory.mktemp("repo")
    build_default(repo, with_embed=False)  # fp32 only: mobilenet_v2 and shapes_detector
    return repo


def start_server(repo: Path, tmp: Path, env: dict[str, str] | None = None, timeout: float = 90) -> Server:
    """``visionserve serve`` over ``repo`` from this checkout, its log in ``tmp``; returns once ready."""
    return start(repo, tmp, env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="session")
def server(mobilenet_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``visionserve serve`` over the MobileNetV2 repository, small limits to exercise the errors."""
    s = start_server(mobilenet_repo, tmp_path_factory.mktemp("server"), env={
        "VISIONSERVE_MAX_BODY_BYTES": str(8 * 1024 * 1024),
        "VISIONSERVE_MAX_PIXELS": str(20_000_000),
    })
    yield s
    stop_server(s)
