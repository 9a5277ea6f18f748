"""``visionserve publish``: a version goes into the repository checked and whole, or not at all."""

from __future__ import annotations

import shutil
from pathlib import Path

from typer.testing import CliRunner

from visionserve.service.cli import app
from visionserve.service.manifest import Manifest
from visionserve.service.repository import versions

from .repo_util import DIGITS


def test_publish_renames_renumbers_and_refuses_a_corrupt_source(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    runner = CliRunner()
    for expected in ("1", "2"):
        r = runner.invoke(app, ["publish", str(DIGITS), "--repository", str(repo), "--name", "handwriting"])
        assert r.exit_code == 0, r.output
        assert f"published handwriting version {expected}" in r.output
    m = Manifest.read(repo / "handwriting" / "2")
    assert (m.name, m.version) == ("handwriting", "2")
    assert (repo / "handwriting" / "2" / "model.onnx").read_bytes() == (DIGITS / "model.onnx").read_bytes()

    corrupt = tmp_path / "corrupt"
    shutil.copytree(DIGITS, corrupt)
    with (corrupt / "model.onnx").open("ab") as f:
        f.write(b"\0")  # one byte more than the manifest's sha256 covers
    r = runner.invoke(app, ["publish", str(corrupt), "--repository", str(repo), "--name", "handwriting"])
    assert r.exit_code != 0 and "sha256 does not match" in r.output
    r = runner.invoke(app, ["publish", str(DIGITS), "--repository", str(repo), "--name", "handwriting",
                            "--version", "2"])
    assert r.exit_code != 0 and "already exists" in r.output
    assert versions(repo, "handwriting") == ["1", "2"]
    assert [p.name for p in repo.iterdir()] == ["handwriting"]  # no staging directory left behind
