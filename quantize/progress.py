"""A rich progress bar on stderr (silent when stderr is not a terminal, e.g. in CI and tests)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@contextmanager
def bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """``with bar("calibrating", n) as advance: ... advance(k)``."""
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not sys.stderr.isatty()) as p:
        task = p.add_task(description, total=total)
        yield lambda k=1: p.advance(task, k)
