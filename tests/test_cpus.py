"""Threads are sized from the CPUs really available: affinity mask and cgroup quota (issue 12 item 5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from visionserve.service.cpus import available_cpus, quota_cpus
from visionserve.service.runtime import plan
from visionserve.service.settings import ModelSettings


def fake_v2(tmp_path: Path, limits: dict[str, str]) -> Path:
    """A cgroup v2 tree: {relative dir: cpu.max content}."""
    for rel, text in limits.items():
        d = tmp_path / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(text + "\n")
    return tmp_path


def test_cgroup_v2_quota_tightest_ancestor_wins(tmp_path: Path) -> None:
    root = fake_v2(tmp_path, {"": "max 100000", "kubepods": "400000 100000", "kubepods/pod1": "150000 100000"})
    assert quota_cpus(root, "0::/kubepods/pod1\n") == pytest.approx(1.5)
    assert quota_cpus(root, "0::/kubepods\n") == pytest.approx(4.0)
    assert quota_cpus(root, "0::/\n") is None  # "max": no quota


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    d = tmp_path / "cpu" / "docker" / "abc"
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text("200000\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # the root: unlimited
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert quota_cpus(tmp_path, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n") == pytest.approx(2.0)
    assert quota_cpus(tmp_path, "3:cpu,cpuacct:/\n") is None


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert quota_cpus(tmp_path, "0::/some/where\n") is None


def _server_threads(env: dict[str, str], prefix: list[str]) -> dict[str, int]:
    code = ("import json; from visionserve.service.settings import Settings; "
            "from visionserve.service.runtime import plan; s = Settings(); "
            "p = plan(s.defaults, 32, gpu=False, cpus=s.usable_cpus()); "
            "print(json.dumps({'cpus': s.usable_cpus(), 'decode': s.decode_threads or s.usable_cpus(), "
            "'instances': p.instances, 'solo': p.solo_threads}))")
    out = subprocess.run([*prefix, sys.executable, "-c", code], env={**os.environ, **env}, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is missing")
def test_taskset_one_cpu_sizes_every_pool_to_one() -> None:
    cpu = sorted(os.sched_getaffinity(0))[0]
    got = _server_threads({}, ["taskset", "-c", str(cpu)])
    assert got == {"cpus": 1, "decode": 1, "instances": 1, "solo": 0}


def test_a_fake_cgroup_quota_sizes_the_server(tmp_path: Path) -> None:
    root = fake_v2(tmp_path, {"pod": "100000 100000"})
    (root / "self.cgroup").write_text("0::/pod\n")
    got = _server_threads({"VISIONSERVE_CGROUP_ROOT": str(root)}, [])
    assert got == {"cpus": 1, "decode": 1, "instances": 1, "solo": 0}
    (root / "pod" / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs: three workers may run
    got = _server_threads({"VISIONSERVE_CGROUP_ROOT": str(root)}, [])
    assert got["cpus"] == min(3, len(os.sched_getaffinity(0)))


def test_the_cpus_setting_overrides_what_is_found() -> None:
    """The Helm chart passes the pod's CPU request: with a request and no limit there is no cgroup quota."""
    got = _server_threads({"VISIONSERVE_CPUS": "1"}, [])
    assert got == {"cpus": 1, "decode": 1, "instances": 1, "solo": 0}


def test_available_cpus_never_exceeds_the_affinity_mask() -> None:
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


def test_plan_fills_in_what_is_unset_from_the_cpus() -> None:
    cpu = plan(ModelSettings(), 32, gpu=False, cpus=4)
    assert (cpu.instances, cpu.intra_threads, cpu.solo_threads, cpu.batch, cpu.decode_in_worker, cpu.shared_session) \
        == (4, 1, 4, 4, True, True)
    assert plan(ModelSettings(), 2, gpu=False, cpus=4).batch == 2  # never above what clients may send
    assert plan(ModelSettings(), 32, gpu=False, cpus=1).solo_threads == 0  # one core: nothing to gain
    gpu = plan(ModelSettings(), 32, gpu=True, cpus=8)
    assert (gpu.instances, gpu.intra_threads, gpu.solo_threads, gpu.batch, gpu.decode_in_worker, gpu.shared_session) \
        == (2, 4, 0, 32, False, False)
    mine = plan(ModelSettings(instances=3, intra_op_threads=2, solo_threads=0, preferred_batch_size=8), 32,
                gpu=False, cpus=16)
    assert (mine.instances, mine.intra_threads, mine.solo_threads, mine.batch) == (3, 2, 0, 8)
