"""The registry owns model lifecycles: load, warm up, look up, unload. Nothing else opens a model file."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from .batcher import Batcher, BatchStats
from .errors import ModelNotFound, Unavailable
from .imaging import Preprocessor
from .manifest import Manifest
from .metrics import Metrics
from .repository import ModelEntry, scan
from .runtime import Plan, Runner, plan, release_arena_after, terminable_run_options
from .settings import ModelSettings, Settings

log = logging.getLogger("visionserve.registry")
T = TypeVar("T")


class LoadCancelled(Exception):
    """The server is stopping: model loading gave up between two steps."""


@dataclass
class LoadedModel:
    manifest: Manifest
    directory: Path
    config: ModelSettings
    runners: list[Runner]
    batcher: Batcher
    preprocessor: Preprocessor
    plan: Plan
    max_batch_size: int  # the largest batch a client may send (the batcher forms plan.batch at most)
    load_seconds: float = 0.0
    ready: bool = False

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def provider(self) -> str:
        return self.runners[0].provider


class Registry:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self.ready = False
        self.error: str | None = None
        # Stopping while models load: checked between load steps; an in-flight warm-up run is terminated.
        self._stopping = threading.Event()
        self._warmup_runs: set[object] = set()
        self._loader: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load and warm up every model in the repository; readiness turns true only after all of them."""
        entries = await self._off_loop(lambda: scan(self.settings.repository, verify_checksum=True))
        if not entries:
            raise FileNotFoundError(f"no models in repository {self.settings.repository}")
        for entry in entries:
            model = await self._off_loop(lambda entry=entry: self._load(entry))
            model.batcher.start()
            self._models[(model.name, model.version)] = model
            model.ready = True
            self.metrics.ready.labels(model.name, model.version).set(1)
            log.info("model %s version %s ready on %s in %.2f s (%d instance(s) x %d thread(s), batches of up "
                     "to %d, solo session %s, max client batch %d)", model.name, model.version, model.provider,
                     model.load_seconds, len(model.runners), model.plan.intra_threads, model.plan.batch,
                     f"{model.plan.solo_threads} threads" if model.plan.solo_threads else "off",
                     model.max_batch_size)
        self.ready = True

    async def _off_loop(self, fn: Callable[[], T]) -> T:
        """Run a load step on a daemon thread: a stopping server never waits at exit for a native call
        (an ONNX Runtime session being created) that cannot be interrupted."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def settle(value: T | None, error: BaseException | None) -> None:
            if done.cancelled():
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(value)  # type: ignore[arg-type]

        def target() -> None:
            try:
                value = fn()
            except BaseException as e:
                loop.call_soon_threadsafe(settle, None, e)
            else:
                loop.call_soon_threadsafe(settle, value, None)

        self._loader = threading.Thread(target=target, name="load-models", daemon=True)
        self._loader.start()
        return await done

    def cancel_loading(self) -> None:
        """Stop loading models as soon as possible: between steps, and mid-run for a warm-up inference."""
        self._stopping.set()
        for options in list(self._warmup_runs):
            options.terminate = True  # type: ignore[attr-defined]

    def loading_thread_alive(self) -> bool:
        return self._loader is not None and self._loader.is_alive()

    def _check_stopping(self) -> None:
        if self._stopping.is_set():
            raise LoadCancelled("the server is stopping")

    def _warm_up(self, runner: Runner, batch: np.ndarray, *, release: bool = False) -> None:
        options = terminable_run_options()
        if release:
            release_arena_after(options)
        self._warmup_runs.add(options)
        try:
            self._check_stopping()
            runner.run(batch, options)
        except Exception:
            self._check_stopping()  # a terminated run is a cancellation, not a failure
            raise
        finally:
            self._warmup_runs.discard(options)

    def _load(self, entry: ModelEntry) -> LoadedModel:
        started = time.perf_counter()
        m = entry.manifest
        cfg = self.settings.for_model(m.name)
        # torchvision's post-processed detectors answer for one image, without a batch axis
        split = not (m.task == "detect" and getattr(m.postprocess, "format", "") == "torchvision")
        max_batch = (cfg.max_batch_size or m.max_batch_size) if split else 1
        layout = plan(cfg, max_batch, cpus=self.settings.usable_cpus())
        sessions = []
        for _ in range(1 if layout.shared_session else layout.instances):
            self._check_stopping()
            sessions.append(Runner(entry.model_path, cfg, threads=layout.intra_threads))
        runners = sessions * layout.instances if layout.shared_session else sessions
        solo = None
        if layout.solo_threads:
            self._check_stopping()
            solo = Runner(entry.model_path, cfg, threads=layout.solo_threads, spinning=True)
        labels = (m.name, m.version)
        metrics = self.metrics

        def on_batch(stats: BatchStats) -> None:
            metrics.batch_size.labels(*labels).observe(stats.size)
            metrics.inference.labels(*labels).observe(stats.inference_s)
            for w in stats.queue_waits:
                metrics.queue_wait.labels(*labels).observe(w)
            for t in stats.prepare_s:
                metrics.preprocess.labels(*labels).observe(t)

        batcher = Batcher(
            [r.run for r in runners], max_batch_size=layout.batch, max_queue=cfg.max_queue,
            max_delay_s=cfg.max_batch_delay_ms / 1000.0, split_outputs=split,
            on_batch=on_batch, name=m.name, solo=solo.run if solo else None,
        )
        pre = Preprocessor(m.input, m.preprocess, max_pixels=self.settings.max_pixels,
                           draft=self.settings.jpeg_draft)
        if self.settings.warmup:  # the batch sizes the batcher forms; the largest run's arena handed back
            shape = [d if d > 0 else 1 for d in m.input.shape[1:]]
            for r in sessions:
                for n in sorted({1, layout.batch}):
                    self._warm_up(r, np.zeros((n, *shape), dtype=np.float32), release=n == layout.batch)
            if solo is not None:
                self._warm_up(solo, np.zeros((1, *shape), dtype=np.float32))
        self._check_stopping()
        model = LoadedModel(m, entry.directory, cfg, runners, batcher, pre, layout, max_batch)
        model.load_seconds = time.perf_counter() - started
        metrics.load_seconds.labels(*labels).set(model.load_seconds)
        metrics.queue_depth.labels(*labels).set_function(lambda: batcher.depth)
        metrics.info.labels(*labels, model.provider).set(1)
        return model

    async def close(self) -> None:
        """Finish every accepted request, then stop."""
        self.ready = False
        self.cancel_loading()
        await asyncio.gather(*(m.batcher.stop() for m in self._models.values()))

    # -- lookup --------------------------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> LoadedModel:
        if not self.ready and not self._models:
            raise Unavailable("models are still loading", retry_after_s=2)
        if version is None:
            versions = self.versions(name)
            if not versions:
                raise ModelNotFound(f"unknown model {name!r} (GET /v1/models lists the models)")
            version = versions[-1]
        model = self._models.get((name, version))
        if model is None:
            if not self.versions(name):
                raise ModelNotFound(f"unknown model {name!r} (GET /v1/models lists the models)")
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: {self.versions(name)}")
        return model

    def names(self) -> set[str]:
        return {n for n, _ in self._models}

    def versions(self, name: str) -> list[str]:
        return sorted((v for n, v in self._models if n == name), key=int)

    def models(self) -> list[LoadedModel]:
        return [self._models[k] for k in sorted(self._models, key=lambda k: (k[0], int(k[1])))]

