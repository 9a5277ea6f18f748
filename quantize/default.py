"""The int8 entries of the default repository (``make models``).

- ``mobilenet_v2_int8``: guarded int8 from ``mobilenet_v2``, calibrated on crops of the built-in
  calibration photos, guarded on crops of *other* photos (``quantize.natural``). About a minute on 2 cores.
- ``shapes_detector_int8``: guarded int8 from the latest ``shapes_detector``, calibrated on 64 images of
  the shapes *val* split, guarded on mAP@0.5 over 200 images of the *test* split (drop ≤ 1 point).
  About 15 s.

Idempotent: a readable existing entry is kept (the detector's only while it derives from the latest
``shapes_detector`` version, so new weights give a new int8 version).
"""

from __future__ import annotations

from pathlib import Path

from service.repository import has_valid_version, valid_entries

SOURCE = "mobilenet_v2"
NAME = "mobilenet_v2_int8"
MAX_DROP = 0.015  # top-1 disagreement with fp32 on confident natural images
DETECTOR = "shapes_detector"
DETECTOR_INT8 = "shapes_detector_int8"
DETECTOR_MAX_DROP = 0.01  # absolute mAP@0.5 (1 point)
DETECTOR_CALIBRATION = 64  # images of the shapes val split
DETECTOR_GUARD = 200  # images of the shapes test split


def build_default_int8(repo: Path) -> None:
    import typer

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
        calibration=open_set("natural", role="calibration", count=256),
        evaluation=open_set("natural", role="evaluation", count=600),
        settings=settings_for(detect_target(), "minmax"), max_drop=MAX_DROP,
        derived_from=f"{entry.manifest.name}:{entry.manifest.version}",
    )
    result = run_quantize(job)
    f = result.fidelity
    assert f is not None
    typer.echo(f"built {result.entry.directory}: {f.summary()}; kept in float: {len(result.excluded)} nodes; "
               f"batch-8 throughput × {result.speed['ratio']['int8_vs_fp32_b8']:.2f} ({result.seconds:.0f} s)")


def _derives_from(repo: Path, name: str, parent: str) -> bool:
    """Whether the newest readable version of ``name`` was made from ``parent`` (name:version)."""
    latest = next(valid_entries(repo, name), None)
    return latest is not None and latest.manifest.provenance.derived_from == parent


def build_default_detector_int8(repo: Path) -> None:
    import tempfile

    import typer

    from convert.detect_default import examples_importable

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
    examples_importable()
    from examples.shapes_data import split, write_coco

    with tempfile.TemporaryDirectory(prefix="vs-shapes-") as tmp:
        val, test = Path(tmp) / "val", Path(tmp) / "test"
        write_coco(split("val", DETECTOR_CALIBRATION), val / "images", val / "annotations.json")
        write_coco(split("test", DETECTOR_GUARD), test / "images", test / "annotations.json")
        job = QuantizeJob(
            source=entry, repository=repo, name=DETECTOR_INT8,
            calibration=scan_folder(val / "images", what="calibration images"), evaluation=None,
            settings=settings_for(detect_target(), "minmax"), max_drop=DETECTOR_MAX_DROP,
            derived_from=parent, detect_eval=(test / "annotations.json", test / "images"),
        )
        result = run_quantize(job)
    f = result.fidelity
    assert f is not None
    typer.echo(f"built {result.entry.directory}: {f.summary()}; batch-8 throughput "
               f"× {result.speed['ratio']['int8_vs_fp32_b8']:.2f} ({result.seconds:.0f} s)")
