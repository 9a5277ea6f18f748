"""The task registry: adding a task is one module in this package and its name in ``BUILT_IN``.

A task module defines a ``Task`` subclass and ``TASK = <Name>Task()`` (see ``base.py`` and docs/tasks.md).
The manifest accepts a task's ``task``/``postprocess`` once it is registered here, the app serves its route
(``service.http.tasks``), and the tools find its evaluator, guard metric and load-test kinds by its name.
``register`` adds one at run time (a test, or an embedding application's own task) — before the app is made.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import NoParams, Section, Task

# the built-in tasks, one module each; the order is the order they are listed in
BUILT_IN = ("classify", "detect", "embed")

TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make ``task`` known to the manifest, the app (created after this) and the tools."""
    if task.section.model_fields["kind"].default != task.name:
        raise ValueError(f"task {task.name!r}: its section's kind must default to {task.name!r}")
    TASKS[task.name] = task
    return task


def unregister(name: str) -> None:
    """Forget a task registered with ``register`` (manifests of that task no longer load)."""
    TASKS.pop(name, None)


def get(name: str) -> Task | None:
    """The task called ``name``, or None."""
    return TASKS.get(name)


def section_for(kind: object) -> type[Section] | None:
    """The manifest section of the task ``kind``, or None for a task not registered."""
    task = TASKS.get(kind) if isinstance(kind, str) else None
    return task.section if task is not None else None


def routers() -> tuple[list[Any], list[Any]]:
    """Every task's native route, and the extra routes tasks bring, for ``app.include_router``. The app
    includes the native routes before any other: the router tries routes in order, and these are the hot ones."""
    from ..http.tasks import tasks_router

    return [tasks_router(TASKS.values())], [r for t in TASKS.values() for r in t.routers()]


for _name in BUILT_IN:
    register(importlib.import_module(f"{__name__}.{_name}").TASK)

__all__ = ["BUILT_IN", "TASKS", "NoParams", "Section", "Task", "get", "register", "routers", "section_for",
           "unregister"]
