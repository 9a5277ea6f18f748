"""The registry owns model lifecycles: which versions are served, loading, swapping, draining, unloading.

Nothing else opens a model file. Every version the registry knows has a record with a state (READY,
LOADING, UNAVAILABLE) and, when it is not READY, a reason (``records.py``, which also answers lookups and
readiness from them; ``loader.py`` builds a served model from a version directory). Lifecycle changes run
one at a time (an asyncio lock); a load itself runs on a thread, so serving goes on meanwhile.

The rules, in Triton's terms (``model_control``):
- ``none``: the repository is read once at start; ``poll``: and again every ``poll_interval_s``, acting on
  what changed; ``explicit``: ``load()`` / ``unload()`` (the repository API) say when.
- A model's version policy chooses among the versions that are not known to be broken. A new version is
  loaded and warmed up *before* it becomes the default; only then is the version it replaces retired.
- A version that fails (bad manifest, sha256 mismatch, ONNX Runtime refuses it, required provider missing,
  warm-up fails) is UNAVAILABLE with the reason, counted in ``visionserve_model_load_failures_total``, and
  not retried until its files change; the versions already serving keep serving.
- Retiring a version drains it: it takes no new requests, the ones that already looked it up finish
  (``LoadedModel.users``), its batcher runs what is queued, then its sessions are released.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import Conflict, ModelNotFound, Unavailable
from .loader import LoadCancelled, LoadedModel, LoadFailed, ModelLoader
from .metrics import Metrics
from .records import LOADING, READY, UNAVAILABLE, RecordQueries, VersionRecord
from .repository import Fingerprint, model_names, snapshot
from .settings import Settings

__all__ = ["LoadCancelled", "LoadedModel", "Registry", "VersionRecord"]

log = logging.getLogger("visionserve.registry")
T = TypeVar("T")


class Registry(RecordQueries):
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = ModelLoader(settings, metrics)
        self.error: str | None = None  # a failure of the repository as a whole (set by the app)
        self._records: dict[str, dict[str, VersionRecord]] = {}
        self._unloaded: set[str] = set()  # explicit mode: names not (or no longer) asked for
        self._seen: dict[str, dict[str, Fingerprint]] = {}  # the repository as last reconciled, per model
        self._lock = asyncio.Lock()
        self._started = False  # the first pass over the repository is over
        self._closing = False
        self._poller: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._threads: set[threading.Thread] = set()

    # -- start and stop ------------------------------------------------------------------------------
    async def load_all(self) -> None:
        """The first pass over the repository (every model; in ``explicit`` mode those of ``load_models``),
        then, in ``poll`` mode, the poller. A model that fails is UNAVAILABLE; the others load regardless."""
        repo = self.settings.repository
        disk = await self._off_loop(lambda: snapshot(repo))
        mode = self.settings.model_control
        if mode == "none" and not any(disk.values()):
            raise FileNotFoundError(f"no models in repository {repo}")
        names = sorted(disk)
        if mode == "explicit" and "*" not in self.settings.load_models:
            self._unloaded = {n for n in names if n not in self.settings.load_models}
            missing = sorted(set(self.settings.load_models) - set(names))
            if missing:
                log.error("load_models names models not in the repository: %s", ", ".join(missing))
            names = [n for n in names if n not in self._unloaded]
        async with self._lock:
            for name in names:
                await self._reconcile(name, disk[name])
        self._started = True
        if mode == "poll":
            self._poller = asyncio.create_task(self._poll(), name="repository-poll")

    async def close(self) -> None:
        """Stop polling and loading; finish every accepted request, then stop."""
        self._closing = True
        self.cancel_loading()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await asyncio.gather(*list(self._retiring), return_exceptions=True)
        await asyncio.gather(*(m.batcher.stop() for m in self.models()))

    async def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index, from the repository as it is now and the records."""
        try:
            disk = await self._off_loop(lambda: snapshot(self.settings.repository))
        except OSError as e:  # the repository cannot be read now (a volume remounting): what the registry knows
            log.warning("model repository unreadable (%s); the index shows the loaded models only", e)
            disk = {}
        return self.index_rows(disk, ready_only)

    def cancel_loading(self) -> None:
        """Stop loading models as soon as possible: between steps, and mid-run for a warm-up inference."""
        self.loader.cancel()

    def loading_thread_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

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
            finally:
                self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=target, name="load-models", daemon=True)
        self._threads.add(thread)
        thread.start()
        return await done

    # -- the repository API (explicit mode) ----------------------------------------------------------
    async def load(self, name: str) -> None:
        """Load (or reload) ``name`` as its directory is now: new versions per the policy, changed files
        reloaded, removed versions unloaded. Raises Unavailable with the reasons if no version is READY."""
        self._require_mode("load")
        disk = await self._off_loop(lambda: snapshot(self.settings.repository))
        if name not in disk:
            raise ModelNotFound(f"no model {name!r} in the repository (POST /v2/repository/index lists them)")
        async with self._lock:
            self._unloaded.discard(name)
            # a load request retries versions that failed before, even with unchanged files
            for rec in self._records.get(name, {}).values():
                rec.failed = None
            await self._reconcile(name, disk[name])
        if not self._ready_versions(name):
            raise Unavailable(f"model {name} failed to load: {self._reasons(name)}", retry_after_s=5)

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name``; returns once they are drained and released."""
        self._require_mode("unload")
        async with self._lock:
            records = self._records.get(name)
            if not records and name not in await self._off_loop(lambda: model_names(self.settings.repository)):
                raise ModelNotFound(f"unknown model {name!r}")
            self._unloaded.add(name)
            tasks = [self._retire(rec, "unloaded") for rec in (records or {}).values()]
        await asyncio.gather(*(t for t in tasks if t is not None))

    def _require_mode(self, action: str) -> None:
        if self.settings.model_control != "explicit":
            raise Conflict(f"model {action} through the API needs --model-control explicit; this server runs "
                           f"with {self.settings.model_control!r}")

    # -- polling -------------------------------------------------------------------------------------
    async def _poll(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.poll_once()
            except LoadCancelled:
                return
            except Exception:  # a repository that cannot be read now (a remounting volume): try again later
                log.exception("polling the model repository failed")

    async def poll_once(self) -> None:
        """Reconcile every model whose directory changed since it was last looked at."""
        disk = await self._off_loop(lambda: snapshot(self.settings.repository))
        for name in sorted(set(disk) | set(self._records)):
            if disk.get(name, {}) != self._seen.get(name):
                async with self._lock:
                    await self._reconcile(name, disk.get(name, {}))

    # -- reconciling one model with its directory ----------------------------------------------------
    async def _reconcile(self, name: str, disk: dict[str, Fingerprint]) -> None:
        self._seen[name] = disk
        records = self._records.setdefault(name, {})
        for version in [v for v in records if v not in disk]:  # the directory went away
            rec = records.pop(version)
            if rec.cause is not None:
                self.metrics.unavailable.remove(name, version, rec.cause)
            self._retire(rec, "the version directory was removed")
        policy = self.settings.for_model(name).version_policy

        def usable(v: str) -> bool:
            rec = records.get(v)
            return rec is None or rec.model is not None or rec.failed != disk[v]

        while True:  # a failure changes what the policy picks (latest 1: the previous version): go round again
            wanted = policy.select(v for v in disk if usable(v))
            todo = [v for v in reversed(wanted) if self._needs_load(records.get(v), disk[v])]
            if not todo:
                break
            for v in todo:
                await self._load_version(name, v, disk[v])
        for v, rec in records.items():
            if rec.model is not None and v not in wanted:
                newer = [w for w in wanted if int(w) > int(v)]
                self._retire(rec, f"replaced by version {newer[-1]}" if newer else
                             f"not among {policy.describe()}")
        for v in disk:
            if v not in records:
                records[v] = VersionRecord(name, v, reason=f"not among {policy.describe()}")
        if not records:
            del self._records[name]
            self._seen.pop(name, None)

    @staticmethod
    def _needs_load(rec: VersionRecord | None, files: Fingerprint) -> bool:
        if rec is None:
            return True
        if rec.failed == files:
            return False
        return rec.model is None or rec.fingerprint != files

    async def _load_version(self, name: str, version: str, files: Fingerprint) -> None:
        rec = self._records[name].setdefault(version, VersionRecord(name, version))
        if rec.model is None:
            rec.state, rec.reason = LOADING, "loading"
        directory = Path(self.settings.repository) / name / version
        started = time.perf_counter()
        try:
            model = await self._off_loop(lambda: self.loader.load(directory, name, version))
        except LoadFailed as e:
            rec.manifest = e.manifest or rec.manifest
            self._failed(rec, files, e.cause, e.message)
            return
        except LoadCancelled:
            if rec.model is None:
                rec.state, rec.reason = UNAVAILABLE, "loading cancelled: the server is stopping"
            raise
        except Exception as e:  # anything else is a bug, but it must not stop the other models loading
            log.exception("loading %s version %s", name, version)
            self._failed(rec, files, "internal", f"{type(e).__name__}: {e}")
            return
        if self._closing:
            raise LoadCancelled("the server is stopping")
        old = rec.model
        model.batcher.start()
        model.ready = True
        if rec.cause is not None:  # it failed before: no longer
            self.metrics.unavailable.labels(name, version, rec.cause).set(0)
        rec.model, rec.fingerprint, rec.failed, rec.cause = model, files, None, None
        rec.manifest = model.manifest
        rec.state, rec.reason = READY, ""
        labels = (name, version)
        m = self.metrics
        m.load_seconds.labels(*labels).set(model.load_seconds)
        m.queue_depth.labels(*labels).set_function(lambda: model.batcher.depth)
        m.info.labels(*labels, model.provider).set(1)
        m.ready.labels(*labels).set(1)
        m.loads.labels(*labels).inc()
        log.info("model %s version %s ready on %s in %.2f s (%d instance(s) x %d thread(s), batches of up "
                 "to %d, solo session %s, max client batch %d)", name, version, model.provider,
                 time.perf_counter() - started, len(model.runners), model.plan.intra_threads, model.plan.batch,
                 f"{model.plan.solo_threads} threads" if model.plan.solo_threads else "off", model.max_batch_size)
        if old is not None:  # its files changed: the new copy serves, the old one drains
            self._drain(old)

    def _failed(self, rec: VersionRecord, files: Fingerprint, cause: str, message: str) -> None:
        rec.failed = files
        self.metrics.load_failures.labels(rec.name, rec.version, cause).inc()
        if rec.model is not None:
            rec.reason = f"its files changed and the new ones failed to load ({message}); still serving the files " \
                         "loaded before"
            log.error("model %s version %s: %s", rec.name, rec.version, rec.reason)
            return
        rec.state, rec.reason, rec.cause = UNAVAILABLE, f"{cause}: {message}", cause
        self.metrics.unavailable.labels(rec.name, rec.version, cause).set(1)
        self.metrics.ready.labels(rec.name, rec.version).set(0)
        log.error("model %s version %s is UNAVAILABLE: %s", rec.name, rec.version, rec.reason)

    # -- retiring ------------------------------------------------------------------------------------
    def _retire(self, rec: VersionRecord, why: str) -> asyncio.Task[None] | None:
        """Take a version out of service now; it drains and unloads in the background."""
        model, rec.model = rec.model, None
        rec.state, rec.reason, rec.fingerprint = UNAVAILABLE, why, None
        if model is None:
            return None
        log.info("model %s version %s: %s; draining and unloading", rec.name, rec.version, why)
        return self._drain(model)

    def _drain(self, model: LoadedModel) -> asyncio.Task[None]:
        model.ready = False
        task = asyncio.create_task(self._unload(model), name=f"unload-{model.name}-{model.version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    async def _unload(self, model: LoadedModel) -> None:
        # Requests that looked this version up before it was retired still use it: wait for them (bounded
        # by the graceful timeout), then the batcher runs what is queued and stops.
        until = time.monotonic() + max(self.settings.graceful_timeout_s, 1.0)
        while model.users > 0 and time.monotonic() < until:
            await asyncio.sleep(0.01)
        await model.batcher.stop()
        labels = (model.name, model.version)
        rec = self._records.get(model.name, {}).get(model.version)
        if rec is None or rec.model is None:  # no newer copy of this same version took the metrics over
            self.metrics.ready.labels(*labels).set(0)
            self.metrics.queue_depth.remove(*labels)
        if rec is None or rec.model is None or rec.model.provider != model.provider:
            try:
                self.metrics.info.remove(*labels, model.provider)
            except KeyError:
                pass
        self.metrics.unloads.labels(*labels).inc()
        n_runners = len(model.runners)
        model.runners.clear()
        del model
        await asyncio.get_running_loop().run_in_executor(None, _release_memory)
        log.info("model %s version %s unloaded (%d runner(s) released)", labels[0], labels[1], n_runners)

def _release_memory() -> None:
    """Hand freed heap memory back to the system after an unload (glibc keeps it otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the memory is reused by the process instead
        pass
