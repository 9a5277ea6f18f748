"""The default model repository (``make models``): the fp32 entries (convert/default.py) and their int8.

    python -m visionserve.quantize.default --repository model_repository

This module is the one place that builds with both tools: quantize uses convert, convert never imports
quantize (tests/test_import_rules.py).

- ``mobilenet_v2_int8``: int8 from ``mobilenet_v2`` by NNCF (MinMax ranges + bias correction), calibrated
  on crops of the built-in calibration photos, guarded on crops of *other* photos, and reported (manifest
  ``notes.held_out``) on crops of a third set of photos that nothing decided on (``quantize.natural``).
  About a minute on 2 cores.
- ``shapes_detector_int8``: guarded int8 from the latest ``shapes_detector``, calibrated on 64 images of
  the shapes *val* split, guarded on mAP@0.5 over 200 images of the *test* split (drop ≤ 1 point), reported
  on the next 200 images of the test split. About 30 s.

Both are built with the speed guard *measured and recorded* but not enforced (``allow_slow``): the demo must
build on any CPU; ``visionserve quantize`` enforces it (``--min-speedup``).

Idempotent: a readable existing entry is kept (the detector's only while it derives from the latest
``shapes_detector`` version, so new weights give a new int8 version).
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from visionserve.service.repository import has_valid_version, valid_entries

SOURCE = "mobilenet_v2"
NAME = "mobilenet_v2_int8"
MAX_DROP = 0.015  # top-1 disagreement with fp32 on confident natural images (of the selection photos)
MIN_SPEEDUP = 1.2
DETECTOR = "shapes_detector"
DETECTOR_INT8 = "shapes_detector_int8"
DETECTOR_MAX_DROP = 0.01  # absolute mAP@0.5 (1 point)
DETECTOR_CALIBRATION = 64  # images of the shapes val split
DETECTOR_GUARD = 200  # images of the shapes test split
DETECTOR_HELD_OUT = 200  # the next images of the test split: reported, never used to decide


def build_repository(repo: Path, int8: bool = True, embed: bool = True) -> None:
    """Everything ``make models`` builds into ``repo`` (idempotent: readable, current entries are kept)."""
    from visionserve.convert.default import build_default

    build_default(repo, with_embed=embed)
    if int8:
        build_default_int8(repo)
        build_default_detector_int8(repo)


def build_default_int8(repo: Path) -> None:
    from .data import open_set
    from .int8 import detect_target, settings_for
    from .models import resolve
    from .pipeline import QuantizeJob, run_quantize

    repo = Path(repo)
    if has_valid_version(repo, NAME):
        typer.echo(f"{repo}/{NAME} is up to date")
        return
    entry = resolve(SOURCE, repo)
    job = QuantizeJob(
        source=entry, repository=repo, name=NAME,
        calibration=open_set("natural", role="calibration"), evaluation=open_set("natural", role="selection"),
        held_out=open_set("natural", role="held-out"), settings=settings_for(detect_target()),
        max_drop=MAX_DROP, derived_from=f"{entry.manifest.name}:{entry.manifest.version}",
        min_speedup=MIN_SPEEDUP, allow_slow=True,
    )
    _report(run_quantize(job))


def _report(result) -> None:
    from .speed import speedup

    assert result.held_out is not None
    r = speedup(result.speed)
    typer.echo(f"built {result.entry.directory}: {result.held_out.summary()}; kept in float: "
               f"{len(result.excluded)} nodes; {float(result.size['ratio']):.2f} of the fp32 size; batch-8 "
               f"throughput × {r:.2f} ({result.seconds:.0f} s)")
    if r < MIN_SPEEDUP:
        typer.echo(f"warning: int8 is only × {r:.2f} fp32 on this machine (under {MIN_SPEEDUP}); "
                   "`visionserve quantize` would refuse it; the demo keeps it")


def _derives_from(repo: Path, name: str, parent: str) -> bool:
    """Whether the newest readable version of ``name`` was made from ``parent`` (name:version)."""
    latest = next(valid_entries(repo, name), None)
    return latest is not None and latest.manifest.provenance.derived_from == parent


def build_default_detector_int8(repo: Path) -> None:
    import tempfile

    from visionserve.convert.shapes.data import split, write_coco

    from .data import scan_folder
    from .int8 import detect_target, settings_for
    from .models import resolve
    from .pipeline import QuantizeJob, run_quantize

    repo = Path(repo)
    entry = resolve(DETECTOR, repo)
    parent = f"{entry.manifest.name}:{entry.manifest.version}"
    if _derives_from(repo, DETECTOR_INT8, parent):
        typer.echo(f"{repo}/{DETECTOR_INT8} is up to date")
        return
    with tempfile.TemporaryDirectory(prefix="vs-shapes-") as tmp:
        val, test, held = Path(tmp) / "val", Path(tmp) / "test", Path(tmp) / "held"
        write_coco(split("val", DETECTOR_CALIBRATION), val / "images", val / "annotations.json")
        write_coco(split("test", DETECTOR_GUARD), test / "images", test / "annotations.json")
        write_coco(split("test", DETECTOR_HELD_OUT, start=DETECTOR_GUARD), held / "images",
                   held / "annotations.json")
        job = QuantizeJob(
            source=entry, repository=repo, name=DETECTOR_INT8,
            calibration=scan_folder(val / "images", what="calibration images"), evaluation=None,
            settings=settings_for(detect_target(), "minmax"), max_drop=DETECTOR_MAX_DROP,
            derived_from=parent, detect_eval=(test / "annotations.json", test / "images"),
            detect_held_out=(held / "annotations.json", held / "images"), min_speedup=MIN_SPEEDUP, allow_slow=True,
        )
        _report(run_quantize(job))


def main(
    repository: Path = typer.Option(Path("model_repository"), "--repository", "-r"),
    int8: bool = typer.Option(True, help="also build mobilenet_v2_int8 and shapes_detector_int8 (guarded int8)"),
    embed: bool = typer.Option(True, help="also build mobilenet_v2_embed (ImageNet MobileNetV2 embeddings)"),
) -> None:
    """Build the default model repository."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_repository(repository, int8=int8, embed=embed)


if __name__ == "__main__":
    typer.run(main)
