"""The ``visionserve`` console script. Each subcommand lives in the package that owns it.

Subcommand modules import their heavy dependencies (torch, onnxruntime) only when they run, so
``visionserve serve`` works in an image that has only the ``serve`` extra.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="visionserve",
    help="Put a trained image CNN into production: convert, optimize, serve, load-test.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Put a trained image CNN into production: convert, optimize, serve, load-test."""


# subcommand → (module, function); a tool package missing from an install just hides its commands.
COMMANDS = {
    "convert": ("visionserve.convert.cli", "convert"),
    "serve": ("visionserve.service.serve_cli", "serve"),
    "publish": ("visionserve.service.publish_cli", "publish"),
    "explain": ("visionserve.service.explain_cli", "explain"),
    "quantize": ("visionserve.quantize.cli", "quantize"),
    "prune": ("visionserve.quantize.cli", "prune"),
    "evaluate": ("visionserve.quantize.cli", "evaluate"),
    "optimize": ("visionserve.quantize.cli", "optimize"),
    "loadtest": ("visionserve.loadtest.cli", "loadtest"),
    "tune": ("visionserve.loadtest.cli", "tune"),
}

for _name, (_module, _func) in COMMANDS.items():
    try:
        _obj = getattr(importlib.import_module(_module), _func)
    except (ImportError, AttributeError):
        continue
    if isinstance(_obj, typer.Typer):
        app.add_typer(_obj, name=_name)
    else:
        app.command(_name)(_obj)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
