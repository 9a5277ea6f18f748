"""The import rules of the product, read from the source with ``ast`` (no import runs).

- the serving runtime (service/) never imports torch, the tools (convert/, quantize/), examples/, tests/
  or benchmarks/: the serve extra has none of them;
- convert/ never imports quantize/ (quantize uses convert; the default build that needs both is
  quantize/default.py);
- no product package imports examples/, tests/ or benchmarks/ — neither with an import statement nor through a
  ``"package.module:factory"`` string handed to importlib (how the default detector once came from examples/).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("service", "convert", "quantize", "loadtest")
NOT_PRODUCT = {"examples", "tests", "benchmarks"}
FORBIDDEN = {
    "service": {"torch", "torchvision", "convert", "quantize", *NOT_PRODUCT},
    "convert": {"quantize", *NOT_PRODUCT},
    "quantize": NOT_PRODUCT,
    "loadtest": NOT_PRODUCT,
}
MODULE_SPEC = re.compile(r"^([A-Za-z_]\w*)(\.\w+)*(:\w+)?$")


def root_of(name: str) -> str:
    """The package a dotted name belongs to; ``visionserve.quantize.x`` (the installed name) is ``quantize``."""
    parts = name.split(".")
    return parts[1] if parts[0] == "visionserve" and len(parts) > 1 else parts[0]


def imported_roots(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in the file, and of every string constant that
    names a module the way importlib specs do (``pkg.mod`` or ``pkg.mod:attr``) with a forbidden root."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, root_of(a.name)) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, root_of(node.module)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.lineno, root_of(str(node.args[0].value))))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_SPEC.match(node.value):
            root = root_of(node.value.split(":")[0])
            if root in NOT_PRODUCT and ("." in node.value or ":" in node.value):
                found.append((node.lineno, root))
    return found


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, root in imported_roots(path):
            if root in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {root}")
    return bad


@pytest.mark.parametrize("package", PRODUCT)
def test_package_respects_the_import_rules(package: str) -> None:
    assert (ROOT / package / "__init__.py").is_file()
    assert violations(package) == []


def test_the_checker_sees_each_kind_of_import(tmp_path: Path) -> None:
    # the rule is only as good as the parser: every way the old code broke it must be caught
    f = tmp_path / "m.py"
    f.write_text(
        "import torch.nn\n"
        "from visionserve.quantize.default import x\n"
        "import visionserve.convert.pipeline as p\n"
        "def f():\n"
        "    from examples.shapes_data import split\n"
        "    load_source(module='examples.shapes_detector:build')\n"
        "    importlib.import_module('benchmarks.serving')\n"
        "from .sibling import y\n"
        "s = 'tests are run by make test'\n"
    )
    roots = [r for _, r in imported_roots(f)]
    assert roots.count("examples") == 2 and {"torch", "quantize", "convert", "benchmarks"} <= set(roots)
    assert "tests" not in roots and "sibling" not in roots  # prose and relative imports are not imports
