"""The model repository on disk: ``REPO/<name>/<version>/{model.onnx, manifest.json}``.

Finding models (for the registry) and writing a new version atomically (for the tools) both live here,
so that the layout is defined once.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from .manifest import MANIFEST_FILE, Manifest, sha256_file

log = logging.getLogger("visionserve.repository")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RepositoryError(Exception):
    """A repository entry that cannot be used, with a message for a person."""


class ChecksumMismatch(RepositoryError):
    """The model file does not match the manifest's sha256: changed, corrupted, or still being copied."""


# What a version directory looked like: (file name, size, mtime in ns) of each file. Polling compares these,
# cheaply (stat only); the sha256 in the manifest is what proves a version complete when it is loaded.
Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class ModelEntry:
    manifest: Manifest
    directory: Path

    @property
    def model_path(self) -> Path:
        return self.directory / self.manifest.model_file


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise RepositoryError(
            f"invalid model name {name!r}: use letters, digits, '_', '-', '.', starting with a letter or digit"
        )
    return name


def versions(repo: Path, name: str) -> list[str]:
    """Existing versions of a model, numerically ascending."""
    d = Path(repo) / name
    if not d.is_dir():
        return []
    found = [p.name for p in d.iterdir() if p.is_dir() and p.name.isdigit() and (p / MANIFEST_FILE).exists()]
    return sorted(found, key=int)


def next_version(repo: Path, name: str) -> str:
    existing = versions(repo, name)
    return str(int(existing[-1]) + 1) if existing else "1"


def scan(repo: Path, *, verify_checksum: bool = False) -> list[ModelEntry]:
    """Every model version in the repository. Broken entries raise RepositoryError naming the path."""
    repo = Path(repo)
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist or is not a directory")
    entries: list[ModelEntry] = []
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version in versions(repo, model_dir.name):
            entries.append(load_entry(model_dir / version, verify_checksum=verify_checksum))
    return entries


def load_entry(directory: Path, *, verify_checksum: bool = False) -> ModelEntry:
    try:
        manifest = Manifest.read(directory)
    except (OSError, ValidationError, ValueError) as e:
        raise RepositoryError(f"{directory / MANIFEST_FILE}: invalid manifest: {e}") from None
    entry = ModelEntry(manifest, Path(directory))
    if not entry.model_path.exists():
        raise RepositoryError(f"{directory}: manifest names {manifest.model_file}, which is missing")
    if verify_checksum and sha256_file(entry.model_path) != manifest.provenance.onnx_sha256:
        raise ChecksumMismatch(f"{entry.model_path}: sha256 does not match the manifest (file changed?)")
    return entry


def model_names(repo: Path) -> list[str]:
    """The model directories of a repository (hidden ones, such as staging directories, left out)."""
    return sorted(p.name for p in Path(repo).iterdir() if p.is_dir() and not p.name.startswith("."))


def fingerprint(directory: Path) -> Fingerprint:
    files = []
    for f in os.scandir(directory):
        if f.is_file():
            st = f.stat()
            files.append((f.name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(files))


def snapshot(repo: Path) -> dict[str, dict[str, Fingerprint]]:
    """Every model's version directories (those holding a manifest) and their fingerprints. A directory that
    vanishes while being looked at is left out: the next look sees the repository as it then is."""
    found: dict[str, dict[str, Fingerprint]] = {}
    for name in model_names(repo):
        found[name] = {}
        try:
            for version in versions(repo, name):
                found[name][version] = fingerprint(Path(repo) / name / version)
        except FileNotFoundError:
            continue
    return found


def valid_entries(repo: Path, name: str) -> Iterator[ModelEntry]:
    """The versions of ``name`` that read back and match their checksum, newest first (broken ones are
    logged and skipped)."""
    for version in reversed(versions(repo, name)):
        try:
            yield load_entry(Path(repo) / name / version, verify_checksum=True)
        except RepositoryError as e:
            log.warning("%s", e)


def has_valid_version(repo: Path, name: str) -> bool:
    """Whether some version of ``name`` reads back and matches its checksum."""
    return next(valid_entries(repo, name), None) is not None


def write_version(
    repo: Path,
    name: str,
    version: str | None,
    build: Callable[[Path, str], Manifest],
    *,
    overwrite: bool = False,
) -> ModelEntry:
    """Create ``REPO/name/version`` atomically.

    ``build(staging_dir, version)`` writes the files into a staging directory inside the repository and
    returns the manifest; only when it succeeds is the directory renamed into place. A failure (any
    exception) leaves nothing behind.
    """
    validate_name(name)
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    version = version or next_version(repo, name)
    if not version.isdigit():
        raise RepositoryError(f"version must be a positive integer, got {version!r}")
    final = repo / name / version
    if final.exists() and not overwrite:
        raise RepositoryError(f"{final} already exists (choose another --version or remove it)")
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=repo))
    staging.chmod(0o755)  # mkdtemp makes it 0700: a non-root server (containers) must read it
    try:
        manifest = build(staging, version)
        manifest.write(staging)
        load_entry(staging, verify_checksum=True)  # what we wrote must read back
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".trash-{name}-", dir=repo))
            os.replace(final, trash / version)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_if_empty(repo / name)
        raise
    return load_entry(final)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
