"""Envoy on a whole bootstrap (a deploy/envoy file made runnable), for tests/deploy.

:class:`BootstrapEnvoy` is :class:`tests.e2e.harness.EnvoyProcess` (readiness, stats,
log, stop) started on a given bootstrap instead of one the harness renders.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.harness import EnvoyProcess

__all__ = ["BootstrapEnvoy", "validate"]


def validate(binary: Path, config: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate -c config``: exit 0 when Envoy would accept it."""
    return subprocess.run(
        [str(binary), "--mode", "validate", "-c", str(config), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


class BootstrapEnvoy(EnvoyProcess):
    """A running Envoy on ``bootstrap`` (its admin and listener ports given). Use as a
    context manager, or call :meth:`close`."""

    def __init__(  # the parent's __init__ renders its own bootstrap: not called
        self,
        binary: Path,
        workdir: Path,
        bootstrap: dict[str, Any],
        *,
        admin_port: int,
        port: int,
        start_timeout: float = 60.0,
    ) -> None:
        self.admin_port = admin_port
        self.port = port
        self.config_path = workdir / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        self.log_path = workdir / "envoy.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                str(binary),
                "-c",
                str(self.config_path),
                "--disable-hot-restart",
                "--file-flush-interval-msec",
                "200",
                "--concurrency",
                "1",
                "-l",
                "warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + start_timeout
        try:
            while not self._ready():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Envoy not ready after {start_timeout}s:\n{self.log()}")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise
