"""Envoy on a whole bootstrap (a deploy/envoy file made runnable), for tests/deploy.

:class:`BootstrapEnvoy` is :class:`tests.e2e.harness.EnvoyProcess` (readiness, stats,
log, stop) started on a given bootstrap instead of one the harness renders.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

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
        self._start(binary, workdir, bootstrap, start_timeout)
