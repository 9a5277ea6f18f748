"""``POST /v1/models/{model}/explain``: which parts of the image drove a score (JSON grid or PNG heat map)."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from ..explainer import ExplainRequest, check, explain, parse_box
from .common import admitted
from .native import _BODY, image_from_request

router = APIRouter(tags=["native"])


@router.post("/v1/models/{model}/explain", openapi_extra={"requestBody": _BODY},
             summary="Explain a classifier's score (or a detector's box) with occlusion or RISE saliency")
@router.post("/v1/models/{model}/versions/{version}/explain", openapi_extra={"requestBody": _BODY},
             include_in_schema=False)
async def explain_route(
    request: Request, model: str, version: str | None = None,
    target: int | None = Query(None, description="class index to explain (default: the top-1 class, or the "
                                                 "class of the detection that overlaps box)"),
    method: Literal["occlusion", "rise"] = Query("occlusion"),
    format: Literal["json", "png"] = Query("json", description="saliency grid (json) or heat map over the image"),
    box: str | None = Query(None, description="detectors: x1,y1,x2,y2 in original pixels (default: the best "
                                              "detection)"),
    masks: int | None = Query(None, description="RISE: number of random masks (default 128, at most max_masks)"),
    patch: int | None = Query(None, description="occlusion: patch side in input-tensor pixels (default 1/6)"),
    stride: int | None = Query(None, description="occlusion: patch step in input-tensor pixels (default patch/2)"),
    seed: int = Query(0, description="RISE: random seed (the same seed gives the same map)"),
    grid: int = Query(56, description="cells along the saliency grid's longer side"),
) -> Response:
    async with admitted(request, model, version, "explain") as (dp, m, due):
        req = ExplainRequest(method=method, target=target, masks=masks, patch=patch, stride=stride, seed=seed,
                             grid=grid, box=parse_box(box))
        check(req, m, dp.settings.max_masks)  # before reading the body: a bad parameter costs nothing
        data = await image_from_request(request)
        result = await explain(dp, m, data, req, due)
    if format == "json":
        return JSONResponse(result.body)
    from ..heatmap import overlay

    png = await asyncio.get_running_loop().run_in_executor(None, overlay, data, result.saliency,
                                                           result.body.get("box"))
    t = result.body["target"]
    return Response(png, media_type="image/png", headers={
        "X-Explain-Target-Index": str(t["index"]), "X-Explain-Target-Label": _header_safe(str(t["label"])),
        "X-Explain-Target-Score": f"{t['score']:.5f}", "X-Explain-Masks": str(result.body["masks"])})


def _header_safe(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")
