"""``mobilenet_v2_int8`` for the default repository (``make models``): guarded int8 from ``mobilenet_v2``.

Calibrated on crops of the built-in calibration photos, guarded on crops of *other* photos
(``quantize.natural``). Idempotent: a readable existing entry is kept. About a minute on 2 cores.
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.repository import has_valid_version

log = logging.getLogger("visionserve.quantize")

SOURCE = "mobilenet_v2"
NAME = "mobilenet_v2_int8"
MAX_DROP = 0.015  # top-1 disagreement with fp32 on confident natural images


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
