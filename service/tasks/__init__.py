"""The task registry: adding a task is one module in this package and one line in ``TASKS``.

``classify`` and ``detect`` still live in ``service.dataplane`` / ``service.http.native`` (their move onto
``Task`` is planned: see docs/tasks.md); ``embed`` is the first task written as a plug-in.
"""

from __future__ import annotations

from typing import Any

from .base import NoParams, Section, Task
from .embed import TASK as EMBED

TASKS: dict[str, Task] = {t.name: t for t in (EMBED,)}


def get(name: str) -> Task | None:
    """The plug-in task called ``name``, or None for a task not (yet) written as one."""
    return TASKS.get(name)


def routers() -> list[Any]:
    """Every plug-in task's native route and extra routes, for ``app.include_router``."""
    from ..http.tasks import task_router

    out: list[Any] = []
    for task in TASKS.values():
        out.append(task_router(task))
        out.extend(task.routers())
    return out


__all__ = ["TASKS", "NoParams", "Section", "Task", "get", "routers"]
