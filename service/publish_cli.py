"""``visionserve publish``: put a model version into a repository so that a polling server never sees half of it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from .cli_util import fail


def publish(
    source: Annotated[Path, typer.Argument(help="a version directory: manifest.json and the model file it names")],
    repository: Annotated[Path, typer.Option("--repository", "-r", help="the model repository to publish into")],
    name: Annotated[str | None, typer.Option(help="model name (default: the manifest's)")] = None,
    version: Annotated[str | None, typer.Option(help="version number (default: the next free one)")] = None,
) -> None:
    """Publish a model version atomically: checked (manifest valid, sha256 of the model matches), copied into a
    staging directory inside the repository, then renamed into place in one step. A server in poll mode picks
    it up, warms it up and makes it the default; the version it replaces drains and unloads."""
    from .manifest import MANIFEST_FILE, Manifest
    from .repository import RepositoryError, load_entry, write_version

    try:
        entry = load_entry(source, verify_checksum=True)
    except RepositoryError as e:
        fail(f"not publishable: {e}")
    target = name or entry.manifest.name

    def build(staging: Path, v: str) -> Manifest:
        for f in source.iterdir():  # the model file and whatever else the version carries (labels, notes)
            if f.is_file() and f.name != MANIFEST_FILE:
                shutil.copy2(f, staging / f.name)
        return entry.manifest.model_copy(update={"name": target, "version": v})

    try:
        published = write_version(repository, target, version, build)
    except RepositoryError as e:
        fail(str(e))
    typer.echo(f"published {target} version {published.manifest.version} at {published.directory}")
