"""The default detector: ``shapes_detector`` from the committed weights (``make models``).

Idempotent: an entry that reads back, matches its checksum and was built from the same weights is kept.

    python -m visionserve.convert.detect_default --repository model_repository
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from visionserve.service.manifest import DetectPostprocess, sha256_file
from visionserve.service.repository import ModelEntry, valid_entries

from .shapes import LABELS, WEIGHTS

NAME = "shapes_detector"


def _current(repo: Path, weights_sha: str) -> ModelEntry | None:
    return next((e for e in valid_entries(repo, NAME) if e.manifest.provenance.weights_sha256 == weights_sha), None)


def build_default_detector(repo: Path, name: str = NAME) -> ModelEntry:
    """Convert the committed shapes weights into ``repo/name`` unless an up-to-date entry is there."""
    from .detect import convert_detector, default_preprocess
    from .pipeline import ConvertOptions, read_labels
    from .sources import load_source

    repo = Path(repo)
    if not WEIGHTS.is_file():
        raise RuntimeError(f"{WEIGHTS} is missing (train it with examples/train_shapes_detector.py)")
    if name == NAME and (entry := _current(repo, sha256_file(WEIGHTS))) is not None:
        typer.echo(f"{entry.directory.parent} is up to date")
        return entry
    from .shapes.model import INPUT_SIZE

    source = load_source(module="visionserve.convert.shapes.model:build", weights=WEIGHTS)
    opts = ConvertOptions(
        name=name, repository=repo, task="detect", input_size=(INPUT_SIZE, INPUT_SIZE),
        preprocess=default_preprocess("visionserve"), labels=read_labels(LABELS),
        detect=DetectPostprocess(format="visionserve", outputs=["boxes", "scores"]),
        notes={"recipe": "examples/train_shapes_detector.py"},
    )
    entry = convert_detector(source, opts)
    p = entry.manifest.provenance.parity
    typer.echo(f"built {entry.directory}: max abs error {p.max_abs_error:.2e}" if p else f"built {entry.directory}")
    return entry


def main(repository: Path = typer.Option(Path("model_repository"), "--repository", "-r")) -> None:
    """Build the default detector into a model repository."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        build_default_detector(repository)
    except RuntimeError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    typer.run(main)
