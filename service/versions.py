"""Which versions of a model to serve: Triton's ``version_policy`` (latest N, specific versions, or all)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LatestPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_versions: int = Field(default=1, ge=1)


class SpecificPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    versions: list[int] = Field(min_length=1)


class VersionPolicy(BaseModel):
    """Exactly one of ``latest``, ``specific`` or ``all``, spelt as in Triton's model configuration:
    ``{"latest": {"num_versions": 2}}``, ``{"specific": {"versions": [1, 3]}}``, ``{"all": {}}``.
    Nothing set means ``latest`` with one version (Triton's default)."""

    model_config = ConfigDict(extra="forbid")

    latest: LatestPolicy | None = None
    specific: SpecificPolicy | None = None
    all: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> VersionPolicy:
        chosen = [k for k in ("latest", "specific", "all") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"version_policy takes one of latest, specific, all; got {chosen}")
        if not chosen:
            self.latest = LatestPolicy()
        return self

    def select(self, versions: Iterable[str]) -> list[str]:
        """The versions this policy serves out of ``versions`` (numeric strings), ascending."""
        ordered = sorted(set(versions), key=int)
        if self.specific is not None:
            wanted = set(self.specific.versions)
            return [v for v in ordered if int(v) in wanted]
        if self.all is not None:
            return ordered
        assert self.latest is not None
        return ordered[-self.latest.num_versions:]

    def describe(self) -> str:
        if self.specific is not None:
            return f"specific versions {self.specific.versions}"
        if self.all is not None:
            return "all versions"
        assert self.latest is not None
        n = self.latest.num_versions
        return "the latest version" if n == 1 else f"the latest {n} versions"

    def triton(self) -> dict[str, Any]:
        """As Triton's model configuration writes it."""
        return self.model_dump(exclude_none=True)
