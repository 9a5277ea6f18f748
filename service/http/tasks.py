"""The native route of every task, written once: ``POST /v1/models/{model}[/versions/{v}]/<route>``.

Every task route does the same steps — the preamble (model lookup, deadline, admission, metrics:
``common.admitted``; the API key is checked in front of every route: ``auth.ApiKeyMiddleware``), the task
check, the parameter check, the body, batched inference — and differs only in ``Task.params`` (its query
parameters, validated by FastAPI: 422 on a bad one), ``Task.check``, ``Task.answer`` and, for an answer that
is not JSON, ``Task.render``.
(No ``from __future__ import annotations`` here: the handler's annotations name the task's own classes,
which FastAPI must see as objects.)
"""

import asyncio
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from ..dataplane import DataPlane
from ..errors import InvalidParameter
from ..registry import LoadedModel
from ..tasks import TASKS
from ..tasks.base import Task
from .common import admitted
from .native import _BODY, image_from_request


def require_task(model: LoadedModel, task: str) -> None:
    """Refuse (422) a model of another task, naming the route that serves it."""
    its = model.manifest.task
    if its != task:
        route = TASKS[its].route if its in TASKS else its
        raise InvalidParameter(f"model {model.name} is a {its} model, not {task}; use /{route}")


async def run_task(dp: DataPlane, task: Task, m: LoadedModel, data: bytes, params: Any,
                   due: float | None) -> dict[str, Any]:
    """decode → batched inference → the task's answer (for routes that hold the image bytes already)."""
    outputs, geometry = await dp.within(due, dp.run_image(m, data, due))
    named = dict(zip(m.runners[0].output_names, outputs))
    return task.answer(m, named, geometry, params)


def task_router(task: Task) -> APIRouter:
    """The native route of ``task`` (and its versioned path), on a router of its own."""
    router = APIRouter()
    add_task_routes(router, task)
    return router


def tasks_router(tasks: Iterable[Task]) -> APIRouter:
    """One router holding every task's native routes: one router for the app to try, not one per task
    (each included router costs the app's routing a scope set-up per request that passes it)."""
    router = APIRouter()
    for task in tasks:
        add_task_routes(router, task)
    return router


def add_task_routes(router: APIRouter, task: Task) -> None:
    """Add ``POST /v1/models/{model}[/versions/{version}]/<task.route>`` to ``router``."""

    async def handle(request: Request, model: str, params: Annotated[task.params, Query()],  # type: ignore[name-defined]
                     version: str | None = None) -> Response:
        async with admitted(request, model, version, task.route) as (dp, m, due):
            # counted (outcome invalid_parameter) but refused before the body is read
            require_task(m, task.name)
            task.check(params, dp.settings)
            data = await image_from_request(request)
            result = await run_task(dp, task, m, data, params, due)
            media_type = task.render_type(params)
            if media_type is None:
                return JSONResponse(result)  # plain JSON: skips FastAPI's re-encoding through response_model
        body = await asyncio.get_running_loop().run_in_executor(None, task.render, data, result, params)
        return Response(body, media_type=media_type)

    extra = {"openapi_extra": {"requestBody": _BODY}, "response_model": task.response, "tags": [task.name]}
    router.add_api_route(f"/v1/models/{{model}}/{task.route}", handle, methods=["POST"], summary=task.summary,
                         **extra)
    router.add_api_route(f"/v1/models/{{model}}/versions/{{version}}/{task.route}", handle, methods=["POST"],
                         include_in_schema=False, **extra)
