"""Run another source tree's code (an A/B baseline) in a child process: which package name, which environment.

Since the wheel's one top-level name became ``visionserve`` (``visionserve.service`` = the ``service/`` folder),
``python -m visionserve.service`` would find this checkout's editable install whatever the working directory.
For a tree with that layout a throw-away directory holds ``visionserve/{service,convert,quantize,loadtest}`` as
links into the tree and goes first on ``PYTHONPATH`` (a namespace portion found before the editable finder is
asked); a tree from before the rename runs as ``service`` from its own root, as it always did.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PACKAGES = ("service", "convert", "quantize", "loadtest")


def importable(tree: Path) -> tuple[dict[str, str], str]:
    """(environment, package of ``service``) under which a child process runs ``tree``'s code."""
    tree = tree.resolve()
    if '"visionserve.service"' not in (tree / "pyproject.toml").read_text():
        return {**os.environ, "PYTHONPATH": str(tree)}, "service"
    links = Path(tempfile.mkdtemp(prefix="visionserve-tree-")) / "visionserve"
    links.mkdir()
    for name in PACKAGES:
        (links / name).symlink_to(tree / name, target_is_directory=True)
    return {**os.environ, "PYTHONPATH": f"{links.parent}{os.pathsep}{tree}"}, "visionserve.service"
