"""One-shot galleries on disk: named sets of labelled reference images and their embeddings.

Layout under the data directory::

    galleries/<gallery>/state.npz        the commit point: items (JSON) and their vectors [N, D], float32
    galleries/<gallery>/images/<sha256>  every reference image as it was sent (to re-embed on a new version)
    galleries/.locks/<gallery>.lock      one lock file per gallery (never deleted)

- Atomic: a state is written to a temporary file, fsync'd, renamed over ``state.npz`` and the directory
  fsync'd; a reference image is written (the same way) before the state that names it. A crash at any point
  leaves the previous state or the new one, never a mix.
- Safe under concurrent writers, threads and processes alike: every read-modify-write holds an exclusive
  ``flock`` on the gallery's lock file and re-reads the state inside it. Readers need no lock (a rename is
  atomic); they reload when the file's identity (inode, mtime, size) changes, so several server processes
  sharing a data directory see each other's writes.
- Search is exhaustive: a float32 matrix-vector product up to ``EXACT_ITEMS``; beyond, an 8-bit scan picks
  candidates that are then scored exactly (``service.gallery_index``: a quarter of the memory traffic). An
  enrolment keeps the index of the items before it and the items enrolled since are scored exactly, until
  there are ``TAIL_ITEMS`` of them and the index is rebuilt.
  benchmarks/gallery_search.py measures both against FAISS and HNSW (docs/embeddings.md).

Nothing here knows HTTP or models: the caller embeds, this module stores and searches.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidParameter, VisionServeError
from .gallery_index import EXACT_ITEMS, MIN_CANDIDATES, TAIL_ITEMS, CodeIndex

STATE = "state.npz"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class GalleryNotFound(VisionServeError):
    status_code = 404


class Conflict(VisionServeError):
    """The request contradicts the stored state (a gallery's model)."""

    status_code = 409


class StorageError(VisionServeError):
    """The data directory cannot be written (full, read-only)."""

    status_code = 507


def check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise InvalidParameter(f"invalid {kind} name {name!r}: 1-128 letters, digits, '_', '-', '.', "
                               "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Item:
    item: str
    label: str
    image: str  # sha256 of the reference image


@dataclass(frozen=True)
class Gallery:
    name: str
    model: str
    version: str  # the model version that made ``vectors``
    items: tuple[Item, ...] = ()
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    # the 8-bit index of a prefix of ``vectors``, carried over from the state this one was appended to: an
    # enrolment must not rebuild the index of every item before it (90 ms at 10 000 × 1280, 1.1 s at 100 000)
    base: CodeIndex | None = field(default=None, compare=False, repr=False)

    def index(self, item: str) -> int | None:
        return next((i for i, it in enumerate(self.items) if it.item == item), None)

    def with_item(self, item: Item, vector: np.ndarray) -> Gallery:
        """A copy with ``item`` added, or replacing the item of the same id."""
        vector = vector.reshape(1, -1).astype(np.float32)
        if len(self.items) and vector.shape[1] != self.vectors.shape[1]:
            raise Conflict(f"embedding of {vector.shape[1]} dims does not fit gallery {self.name!r} "
                           f"({self.vectors.shape[1]} dims)")
        i = self.index(item.item)
        if i is None:  # appended: the rows before it keep their codes
            vectors = vector if not len(self.items) else np.concatenate([self.vectors, vector])
            return replace(self, items=(*self.items, item), vectors=vectors, base=self.__dict__.get("codes", self.base))
        vectors = self.vectors.copy()
        vectors[i] = vector[0]
        return replace(self, items=(*self.items[:i], item, *self.items[i + 1:]), vectors=vectors, base=None)

    def without(self, item: str) -> Gallery:
        i = self.index(item)
        if i is None:
            raise GalleryNotFound(f"gallery {self.name!r} has no item {item!r}")
        return replace(self, items=self.items[:i] + self.items[i + 1:], vectors=np.delete(self.vectors, i, 0),
                       base=None)

    def reembedded(self, version: str, vectors: np.ndarray) -> Gallery:
        """The same items with every vector made again by another model version (no index carried over)."""
        return replace(self, version=version, vectors=vectors, base=None)

    @cached_property
    def codes(self) -> CodeIndex:
        """The 8-bit index of the first ``len(codes)`` vectors, built on first use (a state is immutable: one
        build per state). After appends it is the index carried over from before them, while the items
        appended since (at most ``TAIL_ITEMS``) are few enough to score exactly; then it is rebuilt whole."""
        if self.base is not None and len(self.items) - len(self.base) <= TAIL_ITEMS:
            return self.base
        return CodeIndex(self.vectors)

    def warm(self) -> Gallery:
        """Build what ``search`` will need (blocking: call off the event loop); returns self."""
        if len(self.items) > EXACT_ITEMS:
            self.codes  # noqa: B018 (a cached property: its first read builds the index)
        return self

    def search(self, query: np.ndarray, k: int) -> list[tuple[Item, float]]:
        """The ``k`` items most similar to a unit-length ``query`` (cosine), most similar first. The
        similarities are exact; beyond ``EXACT_ITEMS`` the 8-bit index chooses which items are scored."""
        if not self.items:
            return []
        query = query.astype(np.float32, copy=False)
        if len(self.items) <= EXACT_ITEMS:
            rows = np.arange(len(self.items))
            sims = self.vectors @ query
        else:
            index = self.codes
            rows = index.candidates(query, max(MIN_CANDIDATES, 4 * k))
            sims = (self.vectors[rows] * query).sum(axis=1)  # no BLAS call: no thread fan-out for 64 rows
            if len(index) < len(self.items):  # appended since the index was built: every one scored exactly
                rows = np.concatenate([rows, np.arange(len(index), len(self.items))])
                sims = np.concatenate([sims, self.vectors[len(index):] @ query])
        k = min(k, len(sims))
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.lexsort((rows[top], -sims[top]))]  # most similar first; ties by position, as before
        return [(self.items[rows[i]], float(sims[i])) for i in top]

    def describe(self) -> dict[str, Any]:
        return {"gallery": self.name, "model": self.model, "version": self.version,
                "items": [{"item": it.item, "label": it.label} for it in self.items]}


class Retry(Exception):
    """An update saw a state other than the one it was prepared against; prepare again."""


class GalleryStore:
    """Galleries under ``root``: load (cached), update under a lock, delete. Blocking: call off the loop."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "galleries"
        self._cache: dict[str, tuple[tuple[int, int, int], Gallery]] = {}
        self._cache_lock = threading.Lock()

    # -- reading -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / STATE).exists())

    def load(self, name: str) -> Gallery:
        """The gallery's current state; GalleryNotFound if it does not exist."""
        path = self.root / check_name("gallery", name) / STATE
        try:
            st = path.stat()
        except FileNotFoundError:
            raise GalleryNotFound(f"unknown gallery {name!r}") from None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._cache_lock:
            hit = self._cache.get(name)
        if hit is not None and hit[0] == sig:
            return hit[1]
        try:
            gallery = _read(name, path)
        except FileNotFoundError:  # deleted between the stat and the read
            raise GalleryNotFound(f"unknown gallery {name!r}") from None
        with self._cache_lock:
            self._cache[name] = (sig, gallery)
        return gallery

    def image(self, name: str, sha: str) -> bytes:
        return (self.root / name / "images" / sha).read_bytes()

    # -- writing -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Exclusive access to one gallery, across threads and processes."""
        locks = self.root / ".locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
            fd = os.open(locks / f"{check_name('gallery', name)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"cannot write galleries under {self.root}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def update(self, name: str, change: Callable[[Gallery | None], Gallery | None],
               images: dict[str, bytes] | None = None) -> Gallery | None:
        """Apply ``change`` to the current state (None: no gallery yet) under the gallery's lock, and write
        the result atomically (None: delete the gallery). ``images`` (sha256 → bytes) are stored first."""
        with self.locked(name):
            path = self.root / name / STATE
            # what readers see: the cached state while the file is the one cached (an enrolment into 100 000
            # items does not re-read 512 MB, and the index carries over)
            try:
                current: Gallery | None = self.load(name)
            except GalleryNotFound:
                current = None
            new = change(current)
            if new is current:
                return current
            try:
                if new is None:
                    self._remove(name)
                    return None
                for sha, data in (images or {}).items():
                    target = self.root / name / "images" / sha
                    if not target.exists():
                        _write_atomic(target, lambda f, data=data: f.write(data))
                _write_atomic(path, lambda f: _write(new, f))
                self._collect_garbage(new)
                st = path.stat()  # the state just written is the one readers will load: no re-read
                with self._cache_lock:
                    self._cache[name] = ((st.st_ino, st.st_mtime_ns, st.st_size), new)
            except OSError as e:
                raise StorageError(f"cannot write gallery {name!r}: {e.strerror or e}") from None
            return new

    def _remove(self, name: str) -> None:
        # rename first: a crash mid-delete leaves a hidden directory, never a half-deleted gallery
        trash = Path(tempfile.mkdtemp(prefix=f".trash-{name}-", dir=self.root))
        os.replace(self.root / name, trash / name)
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        with self._cache_lock:
            self._cache.pop(name, None)

    def _collect_garbage(self, gallery: Gallery) -> None:
        """Under the lock, after a commit: images no item names, and temporary files of crashed writes."""
        d = self.root / gallery.name
        used = {it.image for it in gallery.items}
        for p in [*(d / "images").glob("*"), *d.glob(".*.tmp")]:
            if p.name not in used:
                p.unlink(missing_ok=True)


def image_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the state file ----------------------------------------------------------------------------------------
def _write(g: Gallery, f: Any) -> None:
    meta = {"format": 1, "gallery": g.name, "model": g.model, "version": g.version,
            "items": [{"item": it.item, "label": it.label, "image": it.image} for it in g.items]}
    vectors = g.vectors if len(g.items) else np.zeros((0, 0), np.float32)
    np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), vectors=vectors.astype(np.float32))


def _read(name: str, path: Path) -> Gallery:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        vectors = np.ascontiguousarray(z["vectors"], dtype=np.float32)
    items = tuple(Item(d["item"], d["label"], d["image"]) for d in meta["items"])
    if len(items) != len(vectors) and items:
        raise ValueError(f"{path}: {len(items)} items but {len(vectors)} vectors")
    return Gallery(name, meta["model"], meta["version"], items, vectors)


def _write_atomic(path: Path, write: Callable[[Any], object]) -> None:
    """temp file in the same directory → fsync → rename over ``path`` → fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
