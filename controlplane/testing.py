"""Helpers for tests of the control plane: definitions and token files, an in-process
plane, and :class:`FakeEngine`, a raw ADS client that ACKs or NACKs only when told."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import secrets
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from controlplane.ads import SERVED, AdsLimits
from controlplane.definitions import definitions_document, folder_definitions
from controlplane.main import serve
from controlplane.table import RouteTable
from engine.registry import PolicyRegistry

__all__ = [
    "ControlPlane",
    "FakeEngine",
    "admin_call",
    "new_token",
    "write_definitions",
    "write_tokens",
]


def write_definitions(path: Path, folders: Iterable[Path], build_info: dict[str, str]) -> Path:
    """Write the definitions file the builder would write for these policy folders."""
    document = definitions_document(folder_definitions(folders), build_info)
    path.write_text(json.dumps(document, indent=2, sort_keys=True))
    return path


def new_token() -> str:
    """A fresh random admin token (43 URL-safe characters)."""
    return secrets.token_urlsafe(32)


def write_tokens(path: Path, tokens: Mapping[str, tuple[str, str]]) -> Path:
    """Write a token file: ``{name: (role, token)}``; the file is readable by its owner only."""
    lines = ["# name role token"] + [f"{n} {role} {tok}" for n, (role, tok) in tokens.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


class ControlPlane:
    """:func:`controlplane.main.serve` as a task on the running loop (ports picked free).

    Authenticated by default: a token file with :attr:`admin_token` (``admin``,
    read-write) and :attr:`reader_token` (``reader``, read-only) is written to
    ``token_file`` (default: a new temporary directory). ``admin`` overrides other
    ``--admin-*`` settings by argument name (e.g. ``admin_max_body=100``).
    """

    def __init__(
        self,
        registry: PolicyRegistry,
        config: Path | None = None,
        *,
        settle: float = 0.0,
        token_file: Path | None = None,
        xds_cert: Path | None = None,
        xds_key: Path | None = None,
        xds_client_ca: Path | None = None,
        **admin: Any,
    ) -> None:
        """``xds_*``: the ADS TLS files (``--xds-cert``, ``--xds-key``, ``--xds-client-ca``)."""
        self.table = RouteTable(registry)
        self.admin_token, self.reader_token = new_token(), new_token()
        if token_file is None:
            token_file = Path(tempfile.mkdtemp(prefix="cp-tokens-")) / "tokens"
        self.token_file = write_tokens(
            token_file,
            {"admin": ("read-write", self.admin_token), "reader": ("read-only", self.reader_token)},
        )
        self.args = argparse.Namespace(
            config=str(config) if config else None,
            xds_listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            poll_interval=0.05,
            xds_max_streams=AdsLimits.max_streams,
            xds_max_streams_per_client=AdsLimits.max_streams_per_peer,
            settle=settle,
            admin_token_file=str(self.token_file),
            admin_no_auth=False,
            admin_tls_cert=None,
            admin_tls_key=None,
            admin_insecure=False,
            admin_allowed_host=[],
            admin_max_body=8 * 1024 * 1024,
            admin_max_connections=32,
            admin_timeout=30.0,
            xds_cert=str(xds_cert) if xds_cert else None,
            xds_key=str(xds_key) if xds_key else None,
            xds_client_ca=str(xds_client_ca) if xds_client_ca else None,
            metrics_listen=None,
            metrics_insecure=False,
            log_format="text",
        )
        for name, value in admin.items():
            if not hasattr(self.args, name):
                raise TypeError(f"unknown control plane setting {name!r}")
            setattr(self.args, name, value)
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


async def admin_call(
    plane: ControlPlane, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    """One admin API request to ``plane`` with its read-write token, in a thread (the
    answer may wait for engines this loop serves; socket timeout 90 s, beyond any
    ``?wait=``): status and JSON body."""

    def send() -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", plane.admin_port, timeout=90)
        headers = {"Authorization": f"Bearer {plane.admin_token}"}
        try:
            conn.request(
                method, path, body=None if body is None else json.dumps(body), headers=headers
            )
            reply = conn.getresponse()
            return reply.status, json.loads(reply.read() or b"null")
        finally:
            conn.close()

    return await asyncio.to_thread(send)


class FakeEngine:
    """An ADS client on ``127.0.0.1:port`` as node ``node``: subscribes to both served
    types, reads each version (settings and routes) and answers it only when told, or
    never (an engine that hangs). Use from one event loop; :meth:`close` at the end."""

    def __init__(self, port: int, node: str) -> None:
        self.port, self.node = port, node
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._last: dict[str, discovery_pb2.DiscoveryResponse] = {}

    async def connect(self) -> None:
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        self._call = stub.StreamAggregatedResources()
        for type_url in SERVED:
            await self._call.write(
                discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id=self.node), type_url=type_url)
            )

    async def next_version(self, within: float = 5.0) -> str:
        """Read until both types of one new version have arrived (at most ``within``
        seconds); that version."""
        async with asyncio.timeout(within):
            while True:
                response = await self._call.read()
                self._last[response.type_url] = response
                versions = {r.version_info for r in self._last.values()}
                if len(self._last) == len(SERVED) and len(versions) == 1:
                    return str(versions.pop())

    async def ack(self) -> None:
        """ACK the last response of each type."""
        for type_url, response in self._last.items():
            await self._call.write(
                discovery_pb2.DiscoveryRequest(
                    type_url=type_url,
                    version_info=response.version_info,
                    response_nonce=response.nonce,
                )
            )

    async def nack(self, message: str, previous: str = "") -> None:
        """NACK the last response of each type with ``message`` (``previous``: the
        version_info an engine reports, the one it still runs)."""
        for type_url, response in self._last.items():
            await self._call.write(
                discovery_pb2.DiscoveryRequest(
                    type_url=type_url,
                    version_info=previous,
                    response_nonce=response.nonce,
                    error_detail=status_pb2.Status(code=3, message=message),
                )
            )

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close(None)
