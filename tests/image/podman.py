"""Podman for tests: a private store and configuration in a temporary directory.

Nothing under /etc is read for storage or written: :class:`Podman` runs
``podman --root DIR/root --runroot DIR/runroot --storage-driver vfs`` with
``CONTAINERS_CONF`` pointing at its own ``containers.conf``, and passes its own signature
policy to pulls. What these sandboxed machines need (measured, podman 4.3 on bookworm):
``--cgroup-manager cgroupfs`` (no systemd), the ``runc`` runtime, and
``default_ulimits = []`` (the default ulimits cannot be raised here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PODMAN", "Podman", "PodmanError", "podman_unavailable"]

PODMAN = os.environ.get("PODMAN", "podman")

_CONTAINERS_CONF = """\
[containers]
default_ulimits = []
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
"""
_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


class PodmanError(Exception):
    """A podman command failed (its stderr is in the message)."""


def podman_unavailable() -> str | None:
    """Why podman cannot run here (missing binaries), or None."""
    for tool in (PODMAN, "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install podman runc)"
    return None


class Podman:
    """podman with its store, run root and configuration under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "containers.conf"
        self.conf.write_text(_CONTAINERS_CONF)
        self.policy = workdir / "policy.json"
        self.policy.write_text(json.dumps(_POLICY))
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        self.base = [
            PODMAN,
            "--root",
            str(workdir / "root"),
            "--runroot",
            str(workdir / "runroot"),
            "--tmpdir",
            str(workdir / "tmp"),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--runtime",
            "runc",
            "--events-backend",
            "file",
        ]

    def command(self, *args: str) -> list[str]:
        """The full command line of ``podman ARGS`` (for logs and the docs)."""
        return [*self.base, *args]

    def run(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``podman ARGS``; raise :class:`PodmanError` on failure when ``check``."""
        result = subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env,
        )
        if check and result.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)}: exit {result.returncode}: {result.stderr}")
        return result

    def load(self, tarball: Path, tag: str) -> str:
        """``podman load`` a docker-archive tarball, tag it; return the image ID."""
        output = self.run("load", "--quiet", "--input", str(tarball), timeout=300).stdout
        image_id = output.strip().split()[-1].removeprefix("sha256:")
        self.run("tag", image_id, tag)
        return image_id

    def wait_healthy(self, container: str, command: Sequence[str], timeout: float = 60) -> str:
        """Run ``podman exec CONTAINER COMMAND`` until it exits 0; return its output.

        Fails early (with the container's logs) if the container stops.
        """
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            result = self.run("exec", container, *command, check=False, timeout=30)
            if result.returncode == 0:
                return result.stdout
            last = result.stdout + result.stderr
            state = self.run("inspect", "--format", "{{.State.Running}}", container, check=False)
            if state.stdout.strip() != "true":
                logs = self.run("logs", container, check=False)
                raise PodmanError(f"{container} stopped: {logs.stdout}{logs.stderr}")
            time.sleep(0.5)
        raise PodmanError(f"{container} not healthy after {timeout}s: {last}")

    def stop(self, container: str, timeout: int = 10) -> None:
        """Stop and remove ``container`` (ignores one that is already gone)."""
        self.run("stop", "--time", str(timeout), container, check=False, timeout=timeout + 30)
        self.run("rm", "--force", container, check=False)
