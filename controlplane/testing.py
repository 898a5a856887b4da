"""Helpers for tests of the control plane: definitions files and an in-process plane."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterable
from pathlib import Path

from controlplane.definitions import definitions_document, folder_definitions
from controlplane.main import serve
from controlplane.table import RouteTable
from engine.registry import PolicyRegistry

__all__ = ["ControlPlane", "write_definitions"]


def write_definitions(path: Path, folders: Iterable[Path], build_info: dict[str, str]) -> Path:
    """Write the definitions file the builder would write for these policy folders."""
    document = definitions_document(folder_definitions(folders), build_info)
    path.write_text(json.dumps(document, indent=2, sort_keys=True))
    return path


class ControlPlane:
    """:func:`controlplane.main.serve` as a task on the running loop (ports picked free)."""

    def __init__(
        self,
        registry: PolicyRegistry,
        config: Path | None = None,
        *,
        xds_cert: Path | None = None,
        xds_key: Path | None = None,
        xds_client_ca: Path | None = None,
    ) -> None:
        """``xds_*``: the ADS TLS files (``--xds-cert``, ``--xds-key``, ``--xds-client-ca``)."""
        self.table = RouteTable(registry)
        self.args = argparse.Namespace(
            config=str(config) if config else None,
            xds_listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            poll_interval=0.05,
            xds_cert=str(xds_cert) if xds_cert else None,
            xds_key=str(xds_key) if xds_key else None,
            xds_client_ca=str(xds_client_ca) if xds_client_ca else None,
        )
        self.xds_port = 0
        self.admin_port = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[int] | None = None

    async def start(self) -> None:
        bound = asyncio.Event()

        def on_bound(xds: int, admin: int) -> None:
            self.xds_port, self.admin_port = xds, admin
            bound.set()

        self._task = asyncio.create_task(
            serve(self.args, self.table, stop=self._stop, on_bound=on_bound, handle_signals=False)
        )
        waiter = asyncio.ensure_future(bound.wait())
        await asyncio.wait({self._task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            waiter.cancel()
            raise RuntimeError(f"control plane exited with {self._task.result()}")

    async def stop(self) -> int:
        self._stop.set()
        assert self._task is not None
        return await self._task
