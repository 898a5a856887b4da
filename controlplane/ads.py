"""The ADS server: pushes the route table to every engine and records what each did.

State of the world, wildcard (see :mod:`engine.xds.client` for why): each response
carries every route of the current :class:`~controlplane.table.TableVersion`. Per
stream:

* the first request names the engine (``node``); the current version is sent at once,
  whatever ``version_info`` the engine reports (it may come from another control
  plane instance, and re-sending an unchanged config costs the engine nothing);
* afterwards every new table version is sent as soon as it exists; versions created
  while a response is in flight coalesce into the newest one;
* a request whose ``response_nonce`` is the last nonce sent is the engine's verdict on
  that response: ACK (``version_info`` = that version, no ``error_detail``) or NACK
  (``error_detail`` set). Requests with an older nonce are stale and ignored, as the
  xDS protocol says. Requests for other type URLs are ignored (logged once).

Node identity (``verify_node_identity``, on when ADS requires client certificates): the
first request of a stream must carry a ``node`` whose id the client certificate names (a
URI SAN ``spiffe://<trust domain>/node/<node id>``, :func:`engine.tls.node_ids_of`);
otherwise the stream ends with PERMISSION_DENIED before anything is sent, so an engine can
neither read the configuration under another engine's name nor spoof its ``/status``.

:class:`EngineStatus` keeps, per stream, the node, what was sent, what was ACKed or
NACKed (with the engine's error text); the admin API's ``/status`` shows it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format

from controlplane.table import RouteTable, TableVersion
from engine.tls import node_ids_of
from engine.xds.resources import ROUTE_CHAIN_TYPE, SETTINGS_TYPE

__all__ = ["AdsServer", "EngineStatus"]

log: Final = logging.getLogger("controlplane.ads")

_KEEP_DISCONNECTED: Final = 100  # closed streams kept in the status, newest last
SERVED: Final = (SETTINGS_TYPE, ROUTE_CHAIN_TYPE)
"""The types served, in the order a new version is sent: settings first, so that when an
engine ACKs the routes of a version it already has that version's settings."""


@dataclass
class _Stream:
    """What one stream subscribed to and what it was last sent, per type URL."""

    subscribed: list[str] = field(default_factory=list)
    sent: dict[str, tuple[str, str, object]] = field(default_factory=dict)
    """type URL -> (nonce, version, content key) of the last response."""
    poke: asyncio.Event = field(default_factory=asyncio.Event)

    @staticmethod
    def key(type_url: str, current: TableVersion) -> object:
        # Routes are resent with every version (their ACK is the engine's "I run version
        # N"); settings only when they changed.
        return current.generation if type_url == ROUTE_CHAIN_TYPE else current.settings_hash

    def due(self, current: TableVersion) -> list[str]:
        """The subscribed types whose current content this stream has not been sent."""
        return [
            t
            for t in SERVED
            if t in self.subscribed
            and (t not in self.sent or self.sent[t][2] != self.key(t, current))
        ]


@dataclass
class EngineStatus:
    """One engine stream as the control plane saw it."""

    stream: int
    peer: str
    node_id: str = ""
    cluster: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    connected: bool = True
    connected_at: float = field(default_factory=time.time)
    sent_version: str = ""
    sent_nonce: str = ""
    acked_version: str = ""
    nacked_version: str = ""
    nack_error: str = ""
    settings_acked_version: str = ""
    last_change: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "peer": self.peer,
            "node": self.node_id,
            "cluster": self.cluster,
            "metadata": self.metadata,
            "connected": self.connected,
            "connectedAt": self.connected_at,
            "sentVersion": self.sent_version,
            "ackedVersion": self.acked_version,
            "nackedVersion": self.nacked_version,
            "nackError": self.nack_error,
            "settingsAckedVersion": self.settings_acked_version,
            "lastChange": self.last_change,
        }


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """The ``StreamAggregatedResources`` servicer over one :class:`RouteTable`."""

    def __init__(self, table: RouteTable, *, verify_node_identity: bool = False) -> None:
        self.table = table
        self.verify_node_identity = verify_node_identity
        self.engines: dict[int, EngineStatus] = {}
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)

    def status(self) -> list[dict[str, Any]]:
        """Every open stream, then recently closed ones; for the admin API."""
        return [e.as_json() for e in self.engines.values()]

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        engine = EngineStatus(stream=next(self._ids), peer=context.peer())
        self.engines[engine.stream] = engine
        stream = _Stream()
        reader = asyncio.create_task(self._read(request_iterator, engine, stream, context))
        try:
            while True:
                current = self.table.current
                due = stream.due(current)
                if not due:
                    # Wait for a new table version, a new subscription, or the stream's end.
                    stream.poke.clear()
                    waiter = asyncio.ensure_future(self.table.wait_newer(current.generation))
                    poked = asyncio.ensure_future(stream.poke.wait())
                    pending: set[asyncio.Future[Any]] = {reader, waiter, poked}
                    finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    poked.cancel()
                    if reader in finished:
                        denied = None if reader.cancelled() else reader.exception()
                        if isinstance(denied, grpc.aio.AbortError):
                            raise denied  # a refused identity: the stream ends with its status
                        return
                    continue
                for type_url in due:  # settings first: routes then apply with them
                    nonce = str(next(self._nonces))
                    stream.sent[type_url] = (nonce, current.version, stream.key(type_url, current))
                    if type_url == ROUTE_CHAIN_TYPE:
                        engine.sent_version, engine.sent_nonce = current.version, nonce
                    engine.last_change = time.time()
                    resources = (
                        current.resources if type_url == ROUTE_CHAIN_TYPE else current.settings
                    )
                    yield discovery_pb2.DiscoveryResponse(
                        version_info=current.version,
                        resources=list(resources),
                        type_url=type_url,
                        nonce=nonce,
                    )
        finally:
            reader.cancel()
            engine.connected = False
            engine.last_change = time.time()
            log.info("engine %s stream %d closed", engine.node_id, engine.stream)
            self._forget_old()

    async def _read(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        engine: EngineStatus,
        stream: _Stream,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        warned: set[str] = set()
        async for request in requests:
            if self.verify_node_identity and not engine.node_id:
                await _check_identity(request, engine, context)
            if request.HasField("node") and not engine.node_id:
                engine.node_id = request.node.id
                engine.cluster = request.node.cluster
                engine.metadata = json_format.MessageToDict(request.node.metadata)
            type_url = request.type_url
            if type_url not in SERVED:
                if type_url not in warned:
                    warned.add(type_url)
                    log.warning("engine %s asked for %r: not served", engine.node_id, type_url)
                continue
            if not request.response_nonce:
                if type_url not in stream.subscribed:  # the initial request of that type
                    stream.subscribed.append(type_url)
                    stream.poke.set()
                continue
            sent = stream.sent.get(type_url)
            if sent is None or request.response_nonce != sent[0]:
                continue  # stale: a verdict on a response that has been superseded
            engine.last_change = time.time()
            if request.HasField("error_detail"):
                engine.nacked_version = sent[1]
                engine.nack_error = request.error_detail.message
                log.warning(
                    "engine %s NACKed %s: %s", engine.node_id, sent[1], request.error_detail.message
                )
            elif type_url == ROUTE_CHAIN_TYPE:
                engine.acked_version = request.version_info
            else:
                engine.settings_acked_version = request.version_info

    def _forget_old(self) -> None:
        closed = [k for k, e in self.engines.items() if not e.connected]
        for key in closed[: max(0, len(closed) - _KEEP_DISCONNECTED)]:
            del self.engines[key]


async def _check_identity(
    request: discovery_pb2.DiscoveryRequest,
    engine: EngineStatus,
    context: grpc.aio.ServicerContext[Any, Any],
) -> None:
    """End the stream (PERMISSION_DENIED) unless ``request`` (the stream's first) names a
    node whose id the peer's client certificate names; see the module docstring."""
    uris = [v.decode("utf-8", "replace") for v in context.auth_context().get("peer_uri", [])]
    names = node_ids_of(uris)
    node_id = request.node.id if request.HasField("node") else ""
    if node_id and node_id in names:
        return
    if not node_id:
        problem = "the first request must carry the node, whose id the certificate must name"
    else:
        named = ", ".join(repr(n) for n in names) or "none"
        problem = (
            f"node id {node_id!r} is not named by the client certificate (it names {named}: "
            "URI SAN spiffe://<trust domain>/node/<id>)"
        )
    log.warning("engine stream %d from %s refused: %s", engine.stream, engine.peer, problem)
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
