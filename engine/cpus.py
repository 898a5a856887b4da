"""How many CPUs this process may actually use (read once, at startup).

``os.cpu_count()`` counts the machine's CPUs: a pod limited to 1 CPU on a 64-core node would
start 64 workers (and, with per-worker rate limits, allow 64 times the configured rate). The
answer here is the smallest of:

* the CPUs in the scheduler affinity mask (``os.sched_getaffinity``: taskset, cpusets);
* the cgroup v2 ``cpu.max`` quota of the process's cgroup and its ancestors
  (``"200000 100000"`` = 2 CPUs; ``"max ..."`` = no limit), rounded up;
* the cgroup v1 CFS quota (``cpu.cfs_quota_us / cpu.cfs_period_us``; -1 = no limit).

Unreadable or malformed files mean "no limit" from that source: the count is never below 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Final

__all__ = ["available_cpus", "cgroup_cpu_limit"]

_ROOT: Final = Path("/")


def available_cpus(root: Path = _ROOT) -> int:
    """CPUs this process may use (>= 1). ``root`` is for tests (a fake ``/``)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def cgroup_cpu_limit(root: Path = _ROOT) -> float | None:
    """The cgroup CPU quota in CPUs (may be fractional), or None when unlimited/unknown."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        relative = path.lstrip("/")
        if controllers == "":  # cgroup v2 unified hierarchy
            limits += _v2_limits(root / "sys/fs/cgroup", relative)
        elif "cpu" in controllers.split(","):
            limits += _v1_limits(root / "sys/fs/cgroup", controllers, relative)
    return min(limits) if limits else None


def _v2_limits(base: Path, relative: str) -> list[float]:
    # The cgroup and each ancestor may set cpu.max; inside a container the namespace root
    # is /sys/fs/cgroup itself, so that is always looked at too.
    found: list[float] = []
    directory = base / relative if relative else base
    while True:
        found += _v2_quota(directory / "cpu.max")
        if directory == base or base not in directory.parents:
            break
        directory = directory.parent
    return found


def _v2_quota(path: Path) -> list[float]:
    try:
        fields = path.read_text().split()
    except OSError:
        return []
    if len(fields) != 2 or fields[0] == "max":
        return []
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return []
    return [quota / period] if quota > 0 and period > 0 else []


def _v1_limits(base: Path, controllers: str, relative: str) -> list[float]:
    found: list[float] = []
    for mount in (controllers, "cpu", "cpu,cpuacct"):
        for directory in (base / mount / relative, base / mount):
            try:
                quota = int((directory / "cpu.cfs_quota_us").read_text())
                period = int((directory / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0:
                found.append(quota / period)
    return found
