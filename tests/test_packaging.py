"""The wheel installs one top-level name, ``visionserve``, whose subpackages are the repository's folders."""

from __future__ import annotations

import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tests.conftest import ROOT

FOLDERS = ("service", "convert", "quantize", "loadtest")


def test_every_package_folder_is_in_the_wheel_under_visionserve() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {f"visionserve.{f}": f for f in FOLDERS}
    on_disk = {"visionserve." + ".".join(p.parent.relative_to(ROOT).parts)
               for f in FOLDERS for p in (ROOT / f).rglob("__init__.py")}
    assert set(config["packages"]) == on_disk  # a new subpackage left out would be missing from the wheel
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"visionserve": "visionserve.service.cli:main"}


def test_installed_names_do_not_claim_the_generic_ones(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # outside the repository (cwd elsewhere), only visionserve.* is importable: no top-level ``service``,
    # ``convert``, ``quantize`` or ``loadtest`` to shadow, or be shadowed by, another distribution's
    code = ("import importlib.util, json, visionserve.service.cli, visionserve.convert, visionserve.quantize, "
            "visionserve.loadtest; print(json.dumps([importlib.util.find_spec(n) is None for n in "
            f"{list(FOLDERS)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[true, true, true, true]"
