"""How many CPUs this process may really use: the affinity mask and the cgroup CPU quota, not the host's count.

A pod limited to 2 CPUs on a 64-core node sees ``os.cpu_count() == 64``; sizing thread pools from that
oversubscribes the quota and the kernel throttles the whole process (CFS throttling: latency spikes of a
whole period, 100 ms by default). The quota is ``cpu.max`` (cgroup v2: ``"<quota> <period>"`` or ``"max"``)
or ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (cgroup v1), read for this process's own cgroup and its
ancestors (the tightest wins). ``VISIONSERVE_CGROUP_ROOT`` points the lookup elsewhere (the tests' fake
cgroup trees).
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``taskset``, cpusets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and cgroup v1 ``cpu`` controller path, from /proc/self/cgroup."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(root: Path, rel: str) -> list[Path]:
    """root/rel and each parent directory up to root, innermost first."""
    parts = [p for p in rel.strip("/").split("/") if p]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def quota_cpus(root: Path | None = None, proc_cgroup: str | None = None) -> float | None:
    """The cgroup CPU quota in CPUs (e.g. 1.5), or None when there is none."""
    root = Path(root or os.environ.get("VISIONSERVE_CGROUP_ROOT", "/sys/fs/cgroup"))
    if proc_cgroup is None:
        proc_cgroup = _read(root / "self.cgroup") if "VISIONSERVE_CGROUP_ROOT" in os.environ else None
        proc_cgroup = proc_cgroup if proc_cgroup is not None else (_read(Path("/proc/self/cgroup")) or "")
    v2, v1 = _cgroup_paths(proc_cgroup)
    limits: list[float] = []
    if v2 is not None:
        for d in _ancestors(root, v2):
            text = _read(d / "cpu.max")
            if text:
                quota, _, period = text.partition(" ")
                if quota != "max" and period:
                    limits.append(int(quota) / int(period))
    if v1 is not None:
        for base in (root / "cpu", root / "cpu,cpuacct", root):
            for d in _ancestors(base, v1):
                quota_text, period_text = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                if quota_text and period_text and int(quota_text) > 0:
                    limits.append(int(quota_text) / int(period_text))
    positive = [x for x in limits if x > 0]
    return min(positive) if positive else None


@lru_cache(maxsize=1)
def available_cpus() -> int:
    """Whole CPUs this process can keep busy: min(affinity, ceil(cgroup quota)), at least 1."""
    n = affinity_cpus()
    quota = quota_cpus()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)
