"""The ADS server: pushes the route table to every engine and records what each did.

State of the world, wildcard (see :mod:`engine.xds.client` for why): each response
carries every route of the current :class:`~controlplane.table.TableVersion`. Per
stream:

* the first request names the engine (``node``); the current version is sent at once,
  whatever ``version_info`` the engine reports (it may come from another control
  plane instance, and re-sending an unchanged config costs the engine nothing);
* afterwards every new table version is sent as soon as it exists, as one
  EngineSettings and one RouteChain response with the same ``version_info`` (the engine
  applies the pair as one unit, see :mod:`engine.xds.client`); versions created while a
  response is in flight coalesce into the newest one;
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
NACKed (with the engine's error text); the admin API's ``/status`` shows it. Each verdict
and each stream's end also sets :meth:`AdsServer.changed`'s event, so a waiter
(:mod:`controlplane.rollout`, the admin API's ``?wait=``) wakes when there is something
new to read, not on a poll.

Limits (:class:`AdsLimits`): nothing a client sends makes the control plane's memory
grow without bound. Open streams are capped in total, per peer address and per node id;
a stream over a cap is refused with ``RESOURCE_EXHAUSTED`` naming the cap (and a log
line), before it costs more than its counter. Per stream, the status keeps node
metadata up to :data:`MAX_METADATA_BYTES` (else a note of its size), node ids and
clusters up to :data:`MAX_NODE_FIELD` characters (else INVALID_ARGUMENT), NACK texts up to
:data:`MAX_NACK_TEXT` characters; subscriptions are only the served types, and unknown
type URLs are logged at most :data:`MAX_WARNED_TYPES` times per stream. Closed streams
kept for ``/status``: the newest :data:`_KEEP_DISCONNECTED`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format

from controlplane.metrics import ControlPlaneMetrics
from controlplane.table import RouteTable, TableVersion
from engine.logformat import printable
from engine.tls import node_ids_of
from engine.xds.resources import ROUTE_CHAIN_TYPE, SETTINGS_TYPE

__all__ = [
    "MAX_METADATA_BYTES",
    "MAX_NACK_TEXT",
    "MAX_NODE_FIELD",
    "MAX_WARNED_TYPES",
    "AdsLimits",
    "AdsServer",
    "EngineStatus",
]

log: Final = logging.getLogger("controlplane.ads")

_KEEP_DISCONNECTED: Final = 100  # closed streams kept in the status, newest last
MAX_METADATA_BYTES: Final = 16 << 10
"""Node metadata larger than this (serialized) is not kept: ours lists the policies."""
MAX_NACK_TEXT: Final = 64 << 10
"""Characters of an engine's NACK text kept in the status (and logged)."""
MAX_WARNED_TYPES: Final = 8
"""Unknown type URLs logged per stream; more are ignored silently."""


@dataclass(frozen=True)  # no slots: the class attributes are the defaults (CLI flags)
class AdsLimits:
    """Caps on open ADS streams; a stream over one is refused with RESOURCE_EXHAUSTED.

    Per peer address: an engine with ``--workers N`` opens N streams, and engines sharing
    a host (or a NAT) share its address. Per node id: ids are self-declared (without
    mTLS), so this bounds one misbehaving engine, not an attacker, whom the per-address
    and total caps bound.
    """

    max_streams: int = 1024
    max_streams_per_peer: int = 64
    max_streams_per_node: int = 64


MAX_NODE_FIELD: Final = 256
"""Longest node id / cluster accepted (both are kept in the status and logged)."""


class _Refused(Exception):
    """A stream to end with ``code`` and this message (over a limit, or a bad node)."""

    def __init__(
        self, message: str, code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED
    ) -> None:
        super().__init__(message)
        self.code = code


def _peer_address(peer: str) -> str:
    """``ipv4:10.0.0.1:5000`` -> ``ipv4:10.0.0.1``; ``ipv6:[::1]:5000`` -> ``ipv6:[::1]``;
    anything else (``unix:...``) as it is."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer


SERVED: Final = (SETTINGS_TYPE, ROUTE_CHAIN_TYPE)
"""The types served, in the order a new version is sent. Every version is sent as both
types with the same ``version_info``; an engine applies (and ACKs) a version only when it
has both, so its routes ACK means it runs that version's routes *and* settings."""


@dataclass
class _Stream:
    """What one stream subscribed to and what it was last sent, per type URL."""

    subscribed: list[str] = field(default_factory=list)
    sent: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    """type URL -> (nonce, version, content key: the generation) of the last response."""
    poke: asyncio.Event = field(default_factory=asyncio.Event)
    counted_node: str | None = None
    """The node id this stream counts against (set once its node is known)."""

    @staticmethod
    def key(type_url: str, current: TableVersion) -> int:
        # Both types go out with every version, under the same version_info: the engine
        # applies a version only once it holds both halves (settings and routes are one
        # unit), so skipping unchanged settings would leave it waiting forever.
        return current.generation

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
    acked_generation: int = 0
    """The generation of ``acked_version`` (0: none yet); not shown, for waiters."""
    nacked_generation: int = 0
    """The generation of ``nacked_version`` (0: none yet); not shown, for waiters."""

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

    def __init__(
        self,
        table: RouteTable,
        limits: AdsLimits | None = None,
        *,
        verify_node_identity: bool = False,
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self.table = table
        self.metrics = metrics if metrics is not None else ControlPlaneMetrics()
        """Pushes and verdicts are counted here; its gauges read :attr:`engines`."""
        self.metrics.watch(self)
        self.limits = limits if limits is not None else AdsLimits()
        self.verify_node_identity = verify_node_identity
        self.engines: dict[int, EngineStatus] = {}
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        # Open streams per peer address / node id; keys leave at zero (bounded by the caps).
        self._open = 0
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._per_node: collections.Counter[str] = collections.Counter()
        self._changed = asyncio.Event()

    def changed(self) -> asyncio.Event:
        """An event set at the next ACK, NACK or stream end (then replaced by a new one).

        Take it *before* reading :attr:`engines`, then await it: nothing that happens
        after the read is missed, and any number of waiters cost nothing between
        verdicts (no polling)."""
        return self._changed

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def connected(self) -> list[EngineStatus]:
        """The engine streams open now."""
        return [e for e in self.engines.values() if e.connected]

    def status(self) -> list[dict[str, Any]]:
        """Every open stream, then recently closed ones; for the admin API."""
        return [e.as_json() for e in self.engines.values()]

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        peer = context.peer()
        address = _peer_address(peer)
        refusal = self._over_stream_limits(address)
        if refusal:
            log.warning("refusing ADS stream from %s: %s", peer, refusal)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        self._open += 1
        self._per_peer[address] += 1
        engine = EngineStatus(stream=next(self._ids), peer=peer)
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
                        failure = None if reader.cancelled() else reader.exception()
                        if isinstance(failure, _Refused):
                            await context.abort(failure.code, str(failure))
                        if isinstance(failure, grpc.aio.AbortError):
                            raise failure  # a refused identity: the stream ends with its status
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
                    self.metrics.pushed("routes" if type_url == ROUTE_CHAIN_TYPE else "settings")
        finally:
            reader.cancel()
            if reader.done() and not reader.cancelled():
                reader.exception()  # retrieved: a refusal the stream's end overtook is no error
            engine.connected = False
            engine.last_change = time.time()
            self._signal()
            log.info("engine %s stream %d closed", printable(engine.node_id), engine.stream)
            self._open -= 1
            _release(self._per_peer, address)
            if stream.counted_node is not None:
                _release(self._per_node, stream.counted_node)
            self._forget_old()

    def _over_stream_limits(self, address: str) -> str:
        """Why a new stream from ``address`` is refused ("" if it is not)."""
        limits = self.limits
        if self._open >= limits.max_streams:
            return (
                f"{self._open} ADS streams open, the limit (--xds-max-streams) is "
                f"{limits.max_streams}"
            )
        if self._per_peer[address] >= limits.max_streams_per_peer:
            return (
                f"{self._per_peer[address]} ADS streams open from {address}, the limit per "
                f"address (--xds-max-streams-per-client) is {limits.max_streams_per_peer}"
            )
        return ""

    async def _read(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        engine: EngineStatus,
        stream: _Stream,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        warned: set[str] = set()  # at most MAX_WARNED_TYPES entries
        async for request in requests:
            if self.verify_node_identity and not engine.node_id:
                await _check_identity(request, engine, context)
            if request.HasField("node") and not engine.node_id:
                _check_node(request.node)
                engine.node_id = request.node.id
                engine.cluster = request.node.cluster
                engine.metadata = _bounded_metadata(request.node)
                self._count_node(engine, stream)
            type_url = request.type_url
            if type_url not in SERVED:
                if type_url not in warned and len(warned) < MAX_WARNED_TYPES:
                    warned.add(type_url)
                    log.warning(
                        "engine %s asked for %r: not served%s",
                        printable(engine.node_id),
                        type_url[:200],
                        " (further unknown types on this stream are not logged)"
                        if len(warned) == MAX_WARNED_TYPES
                        else "",
                    )
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
                engine.nacked_version, engine.nacked_generation = sent[1], sent[2]
                # An engine's words (an older build, a policy's own message) may quote a
                # secret: neither /status nor the log shows it. Scrub before truncating, so a
                # secret cut in two by the bound cannot escape the scrub.
                engine.nack_error = _bounded_text(
                    self.table.scrub(request.error_detail.message), MAX_NACK_TEXT
                )
                log.warning(
                    "engine %s NACKed %s: %s",
                    printable(engine.node_id),
                    sent[1],
                    printable(engine.nack_error),
                )
                self.metrics.verdict(engine.node_id, "NACK")
            else:
                self.metrics.verdict(engine.node_id, "ACK")
                # The version sent with that nonce: the request's version_info is the
                # client's text (up to the message limit), not kept.
                if type_url == ROUTE_CHAIN_TYPE:
                    engine.acked_version, engine.acked_generation = sent[1], sent[2]
                else:
                    engine.settings_acked_version = sent[1]
            self._signal()

    def _count_node(self, engine: EngineStatus, stream: _Stream) -> None:
        """Count the stream against its node id; raise :class:`_Refused` over the cap."""
        node = engine.node_id
        if self._per_node[node] >= self.limits.max_streams_per_node:
            message = (
                f"{self._per_node[node]} ADS streams open for node {node[:200]!r}, the limit "
                f"per node (--xds-max-streams-per-client) is {self.limits.max_streams_per_node}"
            )
            log.warning("refusing ADS stream from %s: %s", engine.peer, message)
            raise _Refused(message)
        self._per_node[node] += 1
        stream.counted_node = node

    def _forget_old(self) -> None:
        closed = [k for k, e in self.engines.items() if not e.connected]
        for key in closed[: max(0, len(closed) - _KEEP_DISCONNECTED)]:
            del self.engines[key]


def _release(counter: collections.Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]  # keys of closed streams must not pile up


def _check_node(node: Any) -> None:
    """Raise :class:`_Refused` (INVALID_ARGUMENT) for an id or cluster the status would
    have to keep at any length."""
    for name, value in (("id", node.id), ("cluster", node.cluster)):
        if len(value) > MAX_NODE_FIELD:
            message = f"node {name} of {len(value)} characters; at most {MAX_NODE_FIELD}"
            log.warning("refusing ADS stream: %s", message)
            raise _Refused(message, grpc.StatusCode.INVALID_ARGUMENT)


def _bounded_text(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters not kept)"


def _bounded_metadata(node: Any) -> dict[str, Any]:
    """The node's metadata as JSON, or a note of its size when over the limit."""
    size = node.metadata.ByteSize()
    if size > MAX_METADATA_BYTES:
        log.warning(
            "engine %s sent %d bytes of node metadata (limit %d): not kept",
            printable(node.id[:200]),
            size,
            MAX_METADATA_BYTES,
        )
        return {"omitted": f"{size} bytes, over the limit of {MAX_METADATA_BYTES}"}
    return dict(json_format.MessageToDict(node.metadata))


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
