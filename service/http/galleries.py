"""One-shot galleries over HTTP: enrol, list, delete, identify (INTERFACE.md, "Embeddings, one-shot galleries").

The store (``service.galleries``) keeps state on disk; this module embeds images through the gallery model's
batcher, rebuilds a gallery whose model has a newer version (re-embedding its stored reference images), and
shapes the answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from prometheus_client import Gauge, Histogram

from ..dataplane import DataPlane
from ..errors import InvalidParameter
from ..galleries import Conflict, Gallery, GalleryNotFound, GalleryStore, Item, Retry, check_name, image_key
from ..registry import LoadedModel
from ..tasks.embed import embedding_of
from .common import dataplane, deadline
from .native import _BODY, image_from_request
from .tasks import require_task

router = APIRouter(tags=["galleries"])  # the API key: auth.ApiKeyMiddleware, in front of every route

REBUILD_CONCURRENCY = 16  # re-embedding requests in flight at once (the batcher's queue stays far from full)
OFF_LOOP_ITEMS = 16384  # galleries larger than this are searched on a thread (10 000 items: ~1 ms, see search)
RETRIES = 5  # a write prepared against a state that changed meanwhile is prepared again


class Galleries:
    """The app's gallery store and its metrics (made on first use)."""

    def __init__(self, request: Request) -> None:
        settings = request.app.state.settings
        self.root = Path(settings.data_dir or Path(settings.repository) / ".visionserve-data")
        self.store = GalleryStore(self.root)
        registry = request.app.state.metrics.registry
        self.items = Gauge("visionserve_gallery_items", "Reference items in a gallery (as last read).",
                           ["gallery"], registry=registry)
        self.search_seconds = Histogram(
            "visionserve_gallery_search_seconds", "Similarity search over a gallery, per identify request.",
            ["gallery"], buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
            registry=registry)
        self.rebuilds = 0

    def load(self, name: str) -> Gallery:
        """The stored state, its search index built (blocking)."""
        return self.store.load(name).warm()

    async def run(self, fn: Any, *args: Any) -> Any:
        """Blocking store work (file I/O, fsync, flock) on a thread."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def galleries(request: Request) -> Galleries:
    state = request.app.state
    if getattr(state, "galleries", None) is None:
        state.galleries = Galleries(request)
    return state.galleries  # type: ignore[no-any-return]


async def embed(dp: DataPlane, model: LoadedModel, data: bytes, due: float | None) -> np.ndarray:
    outputs, _ = await dp.within(due, dp.run_image(model, data, due))
    return embedding_of(model, dict(zip(model.runners[0].output_names, outputs)))


def embed_model(dp: DataPlane, name: str) -> LoadedModel:
    model = dp.model(name)  # the latest version; 404 if unknown
    require_task(model, "embed")
    return model


async def reembed(g: Galleries, dp: DataPlane, model: LoadedModel, gallery: Gallery) -> np.ndarray:
    """Every reference image of ``gallery`` through ``model``, a bounded number at a time."""
    limit = asyncio.Semaphore(REBUILD_CONCURRENCY)

    async def one(item: Item) -> np.ndarray:
        async with limit:
            data = await g.run(g.store.image, gallery.name, item.image)
            return await embed(dp, model, data, None)

    vectors = await asyncio.gather(*(one(it) for it in gallery.items))
    return np.stack(vectors) if vectors else np.zeros((0, 0), np.float32)


async def current(g: Galleries, dp: DataPlane, name: str) -> Gallery:
    """The gallery, re-embedded first if its model now serves a newer version."""
    for _ in range(RETRIES):
        gallery: Gallery = await g.run(g.load, name)
        model = embed_model(dp, gallery.model)
        if model.version == gallery.version:
            return gallery
        vectors = await reembed(g, dp, model, gallery)

        def rebuilt(fresh: Gallery | None, seen: Gallery = gallery, version: str = model.version,
                    vectors: np.ndarray = vectors) -> Gallery:
            if fresh is None:
                raise GalleryNotFound(f"unknown gallery {name!r}")
            if fresh.version == version:  # another request (or process) rebuilt it meanwhile
                return fresh
            if fresh.items != seen.items or fresh.version != seen.version:
                raise Retry
            return fresh.reembedded(version, vectors)

        try:
            out = await g.run(g.store.update, name, rebuilt)
        except Retry:
            continue
        g.rebuilds += 1
        return await g.run(out.warm)  # type: ignore[no-any-return]
    raise Conflict(f"gallery {name!r} kept changing while it was being rebuilt; try again")


@router.get("/v1/galleries", summary="Every gallery: model, version, item count")
async def list_galleries(request: Request) -> dict[str, Any]:
    g = galleries(request)
    out = []
    for name in await g.run(g.store.names):
        try:
            gallery = await g.run(g.store.load, name)
        except GalleryNotFound:  # deleted meanwhile
            continue
        out.append({"gallery": name, "model": gallery.model, "version": gallery.version,
                    "items": len(gallery.items)})
    return {"galleries": out}


@router.get("/v1/galleries/{gallery}", summary="A gallery's model, version and items")
async def get_gallery(request: Request, gallery: str) -> dict[str, Any]:
    g = galleries(request)
    found: Gallery = await g.run(g.store.load, gallery)
    g.items.labels(gallery).set(len(found.items))
    return found.describe()


@router.put("/v1/galleries/{gallery}/items/{item}", openapi_extra={"requestBody": _BODY},
            summary="Enrol (or replace) one labelled reference image; the first item fixes the gallery's model")
async def put_item(request: Request, gallery: str, item: str,
                   model: str | None = Query(None, description="embedding model (required for a new gallery)"),
                   label: str | None = Query(None, description="what the image shows (default: the item id)")
                   ) -> JSONResponse:
    check_name("gallery", gallery)
    check_name("item", item)
    if label is not None and not 1 <= len(label) <= 256:
        raise InvalidParameter("label must be 1 to 256 characters")
    g = galleries(request)
    dp = dataplane(request)
    try:
        existing: Gallery | None = await current(g, dp, gallery)
    except GalleryNotFound:
        existing = None
    if existing is not None and model is not None and model != existing.model:
        raise Conflict(f"gallery {gallery!r} is made with model {existing.model!r}, not {model!r}")
    name = model or (existing.model if existing else None)
    if name is None:
        raise InvalidParameter(f"gallery {gallery!r} is new: give the embedding model as ?model=NAME")
    m = embed_model(dp, name)
    due = deadline(request)
    async with dp.track(m, "enrol"):
        data = await image_from_request(request)
        vector = await embed(dp, m, data, due)
    key = image_key(data)
    entry = Item(item, label or item, key)
    created = True

    def add(fresh: Gallery | None) -> Gallery:
        nonlocal created
        if fresh is None:
            fresh = Gallery(gallery, m.name, m.version)
        if fresh.model != m.name:
            raise Conflict(f"gallery {gallery!r} is made with model {fresh.model!r}, not {m.name!r}")
        if fresh.version != m.version:
            raise Retry  # rebuilt (or to be rebuilt) for another version meanwhile
        created = fresh.index(item) is None
        return fresh.with_item(entry, vector)

    for _ in range(RETRIES):
        try:
            saved: Gallery = await g.run(g.store.update, gallery, add, {key: data})
            await g.run(saved.warm)  # the next identify finds the new state's index ready
            break
        except Retry:
            await current(g, dp, gallery)
            m = embed_model(dp, name)
            vector = await embed(dp, m, data, due)
    else:
        raise Conflict(f"gallery {gallery!r} kept changing; try again")
    g.items.labels(gallery).set(len(saved.items))
    body = {"gallery": gallery, "item": item, "label": entry.label, "model": saved.model, "version": saved.version}
    return JSONResponse(body, status_code=201 if created else 200)


@router.delete("/v1/galleries/{gallery}/items/{item}", summary="Remove one item")
async def delete_item(request: Request, gallery: str, item: str) -> dict[str, Any]:
    check_name("gallery", gallery)
    check_name("item", item)
    g = galleries(request)

    def remove(fresh: Gallery | None) -> Gallery:
        if fresh is None:
            raise GalleryNotFound(f"unknown gallery {gallery!r}")
        return fresh.without(item)

    saved: Gallery = await g.run(g.store.update, gallery, remove)
    g.items.labels(gallery).set(len(saved.items))
    return {"gallery": gallery, "item": item, "deleted": True}


@router.delete("/v1/galleries/{gallery}", summary="Remove a gallery and its reference images")
async def delete_gallery(request: Request, gallery: str) -> dict[str, Any]:
    check_name("gallery", gallery)
    g = galleries(request)

    def drop(fresh: Gallery | None) -> None:
        if fresh is None:
            raise GalleryNotFound(f"unknown gallery {gallery!r}")
        return None

    await g.run(g.store.update, gallery, drop)
    with contextlib.suppress(KeyError):  # no gauge yet for a gallery made by another process
        g.items.remove(gallery)
    return {"gallery": gallery, "deleted": True}


@router.post("/v1/galleries/{gallery}/identify", openapi_extra={"requestBody": _BODY},
             summary="Which enrolled item is this image? Best label, or null below the threshold")
async def identify(request: Request, gallery: str,
                   top_k: int = Query(3, description="how many matches to return"),
                   threshold: float | None = Query(None, description="cosine similarity below which the "
                                                   "answer is 'unknown' (label null); -1..1")) -> JSONResponse:
    check_name("gallery", gallery)
    dp = dataplane(request)
    if not 1 <= top_k <= dp.settings.max_top_k:
        raise InvalidParameter(f"top_k must be between 1 and {dp.settings.max_top_k}, got {top_k}")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise InvalidParameter(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    g = galleries(request)
    found = await current(g, dp, gallery)
    m = embed_model(dp, found.model)
    due = deadline(request)
    async with dp.track(m, "identify"):
        data = await image_from_request(request)
        query = await embed(dp, m, data, due)
        if found.version != m.version:  # a new version arrived while this image was embedded
            found = await current(g, dp, gallery)
            query = await embed(dp, embed_model(dp, found.model), data, due)
        if len(found.items) and query.shape[0] != found.vectors.shape[1]:
            raise Conflict(f"the model's embedding has {query.shape[0]} dims, the gallery {found.vectors.shape[1]}")
        started = time.perf_counter()
        # the index is built (``current``): 10 000 x 1280 is ~1 ms on the loop; a larger search goes to a thread
        matches = (found.search(query, top_k) if len(found.items) <= OFF_LOOP_ITEMS
                   else await g.run(found.search, query, top_k))
        g.search_seconds.labels(gallery).observe(time.perf_counter() - started)
    best = matches[0] if matches else None
    label = best[0].label if best and (threshold is None or best[1] >= threshold) else None
    return JSONResponse({
        "gallery": gallery, "model": found.model, "version": found.version, "label": label,
        "matches": [{"item": it.item, "label": it.label, "similarity": round(s, 6)} for it, s in matches],
    })
