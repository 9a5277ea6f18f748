"""The data plane: what every transport calls. Knows models, batching and metrics; knows nothing of HTTP,
of any task (``service.tasks`` answers for those) or of the protocols' formats (``service.oip_codec``).

The life of a request: admission and metrics (``track``) → decode + preprocess (on the inference worker, or a
thread pool) → batcher → the task's postprocessing (``Task.answer``) or the output tensors (``infer``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import numpy as np

from .errors import BadTensor, DeadlineExceeded, Unavailable, VisionServeError
from .imaging import Geometry
from .metrics import Metrics
from .oip_codec import IMAGE_INPUT, Tensor
from .registry import LoadedModel, Registry
from .settings import Settings

T = TypeVar("T")

class DataPlane:
    def __init__(self, registry: Registry, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads or settings.usable_cpus(),
                                               thread_name_prefix="decode")

    def close(self) -> None:
        self._decode_pool.shutdown(wait=True)

    # -- helpers -------------------------------------------------------------------------------------
    def model(self, name: str, version: str | None = None) -> LoadedModel:
        return self.registry.get(name, version)

    @staticmethod
    def max_inflight(model: LoadedModel) -> int:
        """Admission bound (see ``ModelSettings.max_inflight``): by default the queue plus what the workers hold."""
        return model.config.max_inflight or model.config.max_queue + len(model.runners) * model.plan.batch

    @asynccontextmanager
    async def track(self, model: LoadedModel, endpoint: str) -> AsyncIterator[None]:
        """Admit one request at the door, then count, time and label it by outcome.

        Routes enter this before reading the body: a request over the model's ``max_inflight`` costs no body
        read and no decode, and its 503 leaves at once."""
        labels = (model.name, model.version)
        if model.users >= self.max_inflight(model):
            self.metrics.requests.labels(*labels, endpoint, "unavailable").inc()
            raise Unavailable(f"model {model.name} is overloaded: {model.users} requests in flight; retry shortly")
        # admitted: counted until answered, and an unload of this version waits for it (no await since the
        # lookup: no race)
        model.users += 1
        inflight = self.metrics.inflight.labels(*labels)
        inflight.inc()
        started = time.perf_counter()
        outcome = "success"
        try:
            yield
        except VisionServeError as e:
            outcome = _outcome(e)
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            model.users -= 1
            inflight.dec()
            self.metrics.request_duration.labels(*labels, endpoint).observe(time.perf_counter() - started)
            self.metrics.requests.labels(*labels, endpoint, outcome).inc()

    async def within(self, deadline: float | None, work: Awaitable[T]) -> T:
        """Await ``work`` but no later than ``deadline`` (monotonic); unstarted batch work is dropped."""
        if deadline is None:
            return await work
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if asyncio.iscoroutine(work):
                work.close()
            raise DeadlineExceeded("request deadline passed before the work started")
        try:
            return await asyncio.wait_for(work, remaining)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"request deadline of {remaining * 1000:.0f} ms passed") from None

    async def preprocess(self, model: LoadedModel, data: bytes) -> tuple[np.ndarray, Geometry]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        result = await loop.run_in_executor(self._decode_pool, model.preprocessor, data)
        self.metrics.preprocess.labels(model.name, model.version).observe(time.perf_counter() - started)
        return result

    async def run_image(self, model: LoadedModel, data: bytes, deadline: float | None
                        ) -> tuple[list[np.ndarray], Geometry]:
        if model.plan.decode_in_worker:  # the inference worker decodes it: one pipeline per core
            return await model.batcher.submit(data, deadline, prepare=model.preprocessor)  # type: ignore[no-any-return]
        tensor, geometry = await self.preprocess(model, data)
        outputs = await model.batcher.submit(tensor, deadline)
        return outputs, geometry

    async def infer(self, model: LoadedModel, inputs: list[Tensor], deadline: float | None
                    ) -> tuple[list[str], list[np.ndarray]]:
        """Run a batch given as Open Inference Protocol tensors (the model's own input, or encoded images);
        returns output names and batched outputs."""
        if len(inputs) != 1:
            raise BadTensor(f"expected exactly one input ({model.manifest.input.name!r} FP32 or {IMAGE_INPUT!r} "
                            f"BYTES), got {len(inputs)}")
        t = inputs[0]
        spec = model.manifest.input
        if t.name == IMAGE_INPUT or t.datatype == "BYTES":
            if t.datatype != "BYTES":
                raise BadTensor(f"input {IMAGE_INPUT!r} must have datatype BYTES, got {t.datatype}")
            images = t.data
            assert isinstance(images, list)
            if not images:
                raise BadTensor("input 'image' holds no images")
            self._check_batch(model, len(images))
            coros = [self.run_image(model, img, deadline) for img in images]
            results = await self.within(deadline, asyncio.gather(*coros))
            per_item = [r[0] for r in results]
        else:
            if t.name != spec.name:
                raise BadTensor(f"unknown input {t.name!r}; this model takes {spec.name!r} (FP32 {spec.shape}) "
                                f"or {IMAGE_INPUT!r} (BYTES)")
            if t.datatype != spec.datatype:
                raise BadTensor(f"input {t.name!r} must be {spec.datatype}, got {t.datatype}")
            arr = t.data
            assert isinstance(arr, np.ndarray)
            want = spec.shape[1:]
            if arr.ndim != len(spec.shape) or list(arr.shape[1:]) != want or arr.shape[0] < 1:
                raise BadTensor(f"input {t.name!r} must have shape [N, {', '.join(map(str, want))}], got "
                                f"{list(arr.shape)}")
            if not np.isfinite(arr).all():
                raise BadTensor(f"input {t.name!r} holds NaN or infinite values")
            self._check_batch(model, arr.shape[0])
            coros = [model.batcher.submit(row, deadline) for row in arr.astype(np.float32, copy=False)]
            per_item = await self.within(deadline, asyncio.gather(*coros))
        names = model.runners[0].output_names
        if not model.batcher.split_outputs:
            return names, per_item[0]
        return names, [np.stack([item[i] for item in per_item]) for i in range(len(names))]

    def _check_batch(self, model: LoadedModel, n: int) -> None:
        if n > model.max_batch_size:
            raise BadTensor(f"batch of {n} exceeds the model's max_batch_size {model.max_batch_size}")

    def list_models(self) -> list[dict[str, Any]]:
        """Every model the registry knows, READY or not, with each version's state (and reason)."""
        out = []
        for name in self.registry.known():
            entry: dict[str, Any] = {"name": name, "versions": self.registry.versions(name),
                                     **self.registry.describe(name)}
            try:
                model = self.registry.get(name)
            except VisionServeError:  # no READY version: the state and reasons say why
                m = self.registry.manifest(name)
                if m is not None:
                    entry.update(task=m.task, input={"name": m.input.name, "shape": m.input.shape,
                                                     "datatype": m.input.datatype}, execution_provider=None)
                out.append(entry)
                continue
            m = model.manifest  # the default (latest READY) version describes the model
            out.append({
                **entry, "latest_version": m.version, "task": m.task,
                "input": {"name": m.input.name, "shape": m.input.shape, "datatype": m.input.datatype},
                "execution_provider": model.provider, "max_batch_size": model.max_batch_size,
                "instances": len(model.runners), "labels": len(m.labels),
            })
        return out


def _outcome(e: VisionServeError) -> str:
    name = type(e).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
