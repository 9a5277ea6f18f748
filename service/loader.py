"""Turning one repository version into a served model: sessions, batcher, preprocessor, warm-up.

The registry decides *which* versions to load and when; this module only knows *how*, and says why a
version cannot be served (``LoadFailed.cause``: manifest, checksum, onnx, provider, warmup).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .batcher import Batcher, BatchStats
from .imaging import Preprocessor
from .manifest import Manifest
from .metrics import Metrics
from .repository import ChecksumMismatch, ModelEntry, RepositoryError, load_entry
from .runtime import Plan, ProviderUnavailable, Runner, plan, release_arena_after, terminable_run_options
from .settings import ModelSettings, Settings


class LoadCancelled(Exception):
    """The server is stopping: model loading gave up between two steps."""


class LoadFailed(Exception):
    """A version that cannot be served; ``cause`` names the step that refused it (a metric label)."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause
        self.message = message
        self.manifest: Manifest | None = None  # when it was readable: what the model would have been


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
    users: int = 0  # requests that looked this version up and are not finished: an unload waits for them

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def provider(self) -> str:
        return self.runners[0].provider


class ModelLoader:
    """Builds LoadedModels on a loading thread; ``cancel()`` (server stopping) interrupts it between steps
    and terminates a warm-up run in progress."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._stopping = threading.Event()
        self._warmup_runs: set[object] = set()

    def cancel(self) -> None:
        self._stopping.set()
        for options in list(self._warmup_runs):
            options.terminate = True  # type: ignore[attr-defined]

    def check_stopping(self) -> None:
        if self._stopping.is_set():
            raise LoadCancelled("the server is stopping")

    def load(self, directory: Path, name: str, version: str) -> LoadedModel:
        """Read, verify, open and warm up ``directory`` (which should hold ``name`` version ``version``)."""
        try:
            entry = load_entry(directory, verify_checksum=True)
        except ChecksumMismatch as e:
            raise LoadFailed("checksum", str(e)) from None
        except RepositoryError as e:
            raise LoadFailed("manifest", str(e)) from None
        m = entry.manifest
        if (m.name, m.version) != (name, version):
            raise LoadFailed("manifest", f"{directory}: the manifest says {m.name} version {m.version}; a version "
                                         f"directory must hold its own name and number")
        try:
            return self._build(entry)
        except LoadFailed as e:
            e.manifest = m
            raise

    def _build(self, entry: ModelEntry) -> LoadedModel:
        started = time.perf_counter()
        m = entry.manifest
        cfg = self.settings.for_model(m.name)
        split = m.postprocess.batched  # False: the model answers for one image, without a batch axis
        max_batch = (cfg.max_batch_size or m.max_batch_size) if split else 1
        layout = plan(cfg, max_batch, cpus=self.settings.usable_cpus())
        sessions = []
        for _ in range(1 if layout.shared_session else layout.instances):
            self.check_stopping()
            sessions.append(self._session(entry, cfg, layout.intra_threads))
        runners = sessions * layout.instances if layout.shared_session else sessions
        solo = None
        if layout.solo_threads:
            self.check_stopping()
            solo = self._session(entry, cfg, layout.solo_threads, spinning=True)
        labels = (m.name, m.version)
        metrics = self.metrics

        def on_batch(stats: BatchStats) -> None:
            if stats.background:  # explanation work: counted by the explainer, kept out of live figures
                return
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
            background_options=terminable_run_options,
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
        self.check_stopping()
        model = LoadedModel(m, entry.directory, cfg, runners, batcher, pre, layout, max_batch)
        model.load_seconds = time.perf_counter() - started
        return model

    def _session(self, entry: ModelEntry, cfg: ModelSettings, threads: int, spinning: bool | None = None) -> Runner:
        try:
            runner = Runner(entry.model_path, cfg, threads=threads, spinning=spinning)
        except ProviderUnavailable as e:
            raise LoadFailed("provider", str(e)) from None
        except Exception as e:  # onnxruntime refuses the file: not ONNX, truncated, unsupported operator...
            raise LoadFailed("onnx", f"{entry.model_path}: onnxruntime cannot load it: {_first_line(e)}") from None
        m = entry.manifest
        outputs = {o.name for o in m.outputs}
        if runner.input_name != m.input.name or not outputs <= set(runner.output_names):
            raise LoadFailed("onnx", f"{entry.model_path}: the model takes {runner.input_name!r} and returns "
                                     f"{runner.output_names}; the manifest says {m.input.name!r} and "
                                     f"{sorted(outputs)}")
        return runner

    def _warm_up(self, runner: Runner, batch: np.ndarray, *, release: bool = False) -> None:
        options = terminable_run_options()
        if release:
            release_arena_after(options)
        self._warmup_runs.add(options)
        try:
            self.check_stopping()
            runner.run(batch, options)
        except Exception as e:
            self.check_stopping()  # a terminated run is a cancellation, not a failure
            raise LoadFailed("warmup", f"a warm-up batch of {len(batch)} failed: {_first_line(e)}") from None
        finally:
            self._warmup_runs.discard(options)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
