"""The native route of a plug-in task, written once: ``POST /v1/models/{model}[/versions/{v}]/<route>``.

Every task route does the same steps — model lookup, task check, parameter check, deadline, metrics, body,
batched inference (the API key is checked in front of every route: ``auth.ApiKeyMiddleware``) — and differs
only in ``Task.params`` (its query parameters, validated by FastAPI: 422 on a bad one) and ``Task.answer``.
(No ``from __future__ import annotations`` here: the handler's annotations name the task's own classes,
which FastAPI must see as objects.)
"""

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from ..dataplane import DataPlane
from ..errors import InvalidParameter
from ..registry import LoadedModel
from ..tasks.base import Task
from .common import dataplane, deadline
from .native import _BODY, image_from_request


def require_task(model: LoadedModel, task: str) -> None:
    if model.manifest.task != task:
        raise InvalidParameter(f"model {model.name} is a {model.manifest.task} model, not {task}; "
                               f"use /{model.manifest.task}")


async def run_task(dp: DataPlane, task: Task, m: LoadedModel, data: bytes, params: Any,
                   due: float | None) -> dict[str, Any]:
    """decode → batched inference → the task's answer (for routes that hold the image bytes already)."""
    outputs, geometry = await dp.within(due, dp.run_image(m, data, due))
    named = dict(zip(m.runners[0].output_names, outputs))
    return task.answer(m, named, geometry, params)


def task_router(task: Task) -> APIRouter:
    """The native route of ``task``."""
    router = APIRouter(tags=[task.name])

    async def handle(request: Request, model: str, params: Annotated[task.params, Query()],  # type: ignore[name-defined]
                     version: str | None = None) -> JSONResponse:
        dp = dataplane(request)
        m = dp.model(model, version)
        require_task(m, task.name)
        task.check(params, dp.settings)
        due = deadline(request)
        async with dp.track(m, task.route):
            data = await image_from_request(request)
            return JSONResponse(await run_task(dp, task, m, data, params, due))  # plain JSON, no re-encoding

    extra = {"openapi_extra": {"requestBody": _BODY}, "response_model": task.response}
    router.add_api_route(f"/v1/models/{{model}}/{task.route}", handle, methods=["POST"], summary=task.summary,
                         **extra)
    router.add_api_route(f"/v1/models/{{model}}/versions/{{version}}/{task.route}", handle, methods=["POST"],
                         include_in_schema=False, **extra)
    return router
