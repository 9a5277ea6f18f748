"""Small helpers shared by every ``visionserve`` subcommand (no heavy imports)."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a clear error and exit non-zero."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def parse_size(text: str, option: str) -> tuple[int, int]:
    """'224' → (224, 224); '480x640' → (480, 640) as height x width."""
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
        fail(f"{option} must be 'S' or 'HxW' (integers), got {text!r}")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 8:
        fail(f"{option} must be 'S' or 'HxW' with sides of at least 8, got {text!r}")
    return parts[0], parts[1]


def parse_triple(text: str, option: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        fail(f"{option} must be three comma-separated numbers, got {text!r}")
    if len(vals) != 3:
        fail(f"{option} must be three comma-separated numbers, got {text!r}")
    return vals  # type: ignore[return-value]
