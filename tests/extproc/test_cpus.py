"""engine.cpus: the worker default follows the CPUs the process may use (issue 8 item 16)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.cpus import available_cpus, cgroup_cpu_limit


def fake_root(tmp_path: Path, cgroup: str, files: dict[str, str]) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for relative, text in files.items():
        path = tmp_path / "sys/fs/cgroup" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize(
    ("cgroup", "files", "limit"),
    [
        pytest.param("0::/\n", {"cpu.max": "100000 100000\n"}, 1.0, id="v2-one-cpu"),
        pytest.param("0::/\n", {"cpu.max": "max 100000\n"}, None, id="v2-unlimited"),
        pytest.param(
            "0::/kubepods/pod1\n",
            {"kubepods/pod1/cpu.max": "max 100000", "kubepods/cpu.max": "150000 100000"},
            1.5,
            id="v2-ancestor-limits",
        ),
        pytest.param(
            "4:cpu,cpuacct:/docker/abc\n",
            {
                "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
            },
            2.0,
            id="v1-cfs-quota",
        ),
        pytest.param(
            "4:cpu,cpuacct:/\n",
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
            None,
            id="v1-unlimited",
        ),
        pytest.param("0::/\n", {"cpu.max": "garbage"}, None, id="malformed"),
        pytest.param("0::/\n", {}, None, id="no-file"),
    ],
)
def test_cgroup_cpu_limit(tmp_path, cgroup, files, limit):
    assert cgroup_cpu_limit(fake_root(tmp_path, cgroup, files)) == limit


def test_available_cpus_is_bounded_by_the_quota(tmp_path):
    # Before: os.cpu_count(), so a 1-CPU pod on a big node got one worker per node core.
    root = fake_root(tmp_path, "0::/\n", {"cpu.max": "50000 100000"})
    assert available_cpus(root) == 1
    root2 = fake_root(tmp_path / "b", "0::/\n", {"cpu.max": "max 100000"})
    assert available_cpus(root2) == len(os.sched_getaffinity(0))


def test_available_cpus_on_this_machine():
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))
