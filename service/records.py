"""What the registry knows of each version (a record: state, reason, the served model) and the questions it
answers from that: which version serves a request and why none does, readiness, the index, descriptions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ModelNotFound, Unavailable
from .loader import LoadedModel
from .manifest import Manifest
from .repository import Fingerprint
from .settings import Settings

READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"


@dataclass
class VersionRecord:
    """What the registry knows of one version directory."""

    name: str
    version: str
    state: str = UNAVAILABLE
    reason: str = ""
    model: LoadedModel | None = None  # set while READY (and while a replacement for changed files loads)
    fingerprint: Fingerprint | None = None  # the files ``model`` was loaded from
    failed: Fingerprint | None = None  # the files that failed to load: not retried until they change
    cause: str | None = None  # why it is UNAVAILABLE, as a metric label
    manifest: Manifest | None = None  # the last readable manifest of this version (describes it when not READY)

    def as_index(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "state": self.state, "reason": self.reason}


class RecordQueries:
    """The read side of the registry (a mixin: ``Registry`` keeps the records and changes them)."""

    settings: Settings
    error: str | None
    _records: dict[str, dict[str, VersionRecord]]
    _unloaded: set[str]
    _seen: dict[str, dict[str, Fingerprint]]
    _started: bool
    _closing: bool

    # -- lookup --------------------------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The model version that serves a request: the highest READY one unless ``version`` is given."""
        records = self._records.get(name, {})
        if version is None:
            ready = self._ready_versions(name)
            if ready:
                return records[ready[-1]].model  # type: ignore[return-value]
        else:
            rec = records.get(version)
            if rec is not None and rec.state == READY and rec.model is not None:
                return rec.model
            if rec is None and records:
                raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: "
                                    f"{sorted(records, key=int)}")
        raise self._why_not(name, version)

    def _why_not(self, name: str, version: str | None) -> Exception:
        records = self._records.get(name, {})
        what = name if version is None else f"{name} version {version}"
        if not records or name in self._unloaded:
            if not self._started and name not in self._unloaded:
                return Unavailable("models are still loading", retry_after_s=2)
            if name in self._unloaded or name in self._seen:
                return ModelNotFound(f"model {name!r} is not loaded")
            return ModelNotFound(f"unknown model {name!r} (GET /v1/models lists the models)")
        chosen = [r for r in records.values() if version is None or r.version == version]
        if any(r.state == LOADING for r in chosen):
            return Unavailable(f"model {what} is loading", retry_after_s=2)
        if version is not None and chosen and chosen[0].cause is None:
            return ModelNotFound(f"model {what} is not loaded ({chosen[0].reason})")
        return Unavailable(f"model {what} is unavailable: {self._reasons(name, version)}", retry_after_s=5)

    def _reasons(self, name: str, version: str | None = None) -> str:
        records = self._records.get(name, {})
        failed = [r for r in records.values() if r.cause is not None and version in (None, r.version)]
        shown = failed or [r for r in records.values() if version in (None, r.version)]
        return "; ".join(f"version {r.version}: {r.reason}" for r in shown) or "no version directory"

    def _ready_versions(self, name: str) -> list[str]:
        return sorted((v for v, r in self._records.get(name, {}).items() if r.state == READY and r.model),
                      key=int)

    def names(self) -> set[str]:
        return {n for n in self._records if self._ready_versions(n)}

    def versions(self, name: str) -> list[str]:
        """The READY versions of ``name``, ascending."""
        return self._ready_versions(name)

    def models(self) -> list[LoadedModel]:
        """Every READY model version, by name and version."""
        return [self._records[n][v].model for n in sorted(self._records)  # type: ignore[misc]
                for v in self._ready_versions(n)]

    def records(self, name: str) -> list[VersionRecord]:
        return sorted(self._records.get(name, {}).values(), key=lambda r: int(r.version))

    def known(self) -> list[str]:
        """Every model the registry has a record of (READY or not)."""
        return sorted(self._records)

    # -- readiness and the index ---------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """None when the server is ready. Default: once the first pass is over, if some model is READY (or
        none was asked for). ``strict_readiness``: only when every model asked for has a READY version."""
        if self.error:
            return self.error
        if self._closing:
            return "the server is stopping"
        if not self._started:
            return "models are still loading"
        wanted = [n for n in self._records if n not in self._unloaded]
        missing = [n for n in wanted if not self._ready_versions(n)]
        if self.settings.strict_readiness and missing:
            return "not every model is available: " + "; ".join(f"{n}: {self._reasons(n)}" for n in missing)
        if wanted and len(missing) == len(wanted):
            return "no model is available: " + "; ".join(f"{n}: {self._reasons(n)}" for n in missing)
        return None

    def index_rows(self, disk: dict[str, dict[str, Fingerprint]], ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every version of every model in ``disk`` (the repository as it is now)
        or in the records, with its state and reason."""
        unseen = "new: the next repository poll looks at it" if self.settings.model_control == "poll" else "not loaded"
        out: list[dict[str, str]] = []
        for name in sorted(set(disk) | set(self._records)):
            records = self._records.get(name, {})
            for v in sorted(set(disk.get(name, {})) | set(records), key=int):
                rec = records.get(v)
                out.append(rec.as_index() if rec is not None else
                           {"name": name, "version": v, "state": UNAVAILABLE, "reason": unseen})
            if not disk.get(name) and not records:
                out.append({"name": name, "version": "", "state": UNAVAILABLE, "reason": "no version directory"})
        return [e for e in out if e["state"] == READY] if ready_only else out

    def manifest(self, name: str) -> Manifest | None:
        """The newest readable manifest of ``name`` (the model's task and input, even when nothing is READY)."""
        found = [r.manifest for r in self.records(name) if r.manifest is not None]
        return found[-1] if found else None

    def describe(self, name: str) -> dict[str, Any]:
        """Every version's state, provider and reason, for ``/v1/models`` and model metadata."""
        rows = []
        for r in self.records(name):
            row: dict[str, Any] = {"version": r.version, "state": r.state, "reason": r.reason}
            if r.model is not None:
                row["execution_provider"] = r.model.provider
            rows.append(row)
        states = {r["state"] for r in rows}
        state = READY if READY in states else LOADING if LOADING in states else UNAVAILABLE
        return {"state": state, "version_states": rows}
