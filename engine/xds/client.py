"""The engine as an xDS client: route chains over ADS, state of the world.

:class:`XdsConfigSource` is a :class:`~engine.store.ConfigSource`. It opens one ADS
stream (``envoy.service.discovery.v3.AggregatedDiscoveryService``) to the control
plane, subscribes to :data:`~engine.xds.resources.ROUTE_CHAIN_TYPE` and
:data:`~engine.xds.resources.SETTINGS_TYPE` (``unknownRoute``) with a wildcard (no
resource names: the engine cannot know the route keys in advance) and treats every
response as the complete state of its type; the configuration is the accepted pair of
both types (an EngineSettings response without a resource means the defaults; a server
that never sends EngineSettings never configures the engine).

Protocol, per the xDS spec:

* First requests of a stream, one per type: ``type_url``, ``version_info`` = the version
  of that type last ACKed (empty at first start), no nonce; the first carries ``node``.
* **One version = one unit.** The configuration is a *pair*: the RouteChain response and
  the EngineSettings response of the same ``version_info`` (the control plane sends both
  for every version). A response is held, unanswered, until its partner of the same
  version has arrived (or that partner is the accepted state already, e.g. a server
  re-sending one type). Only then is the pair decoded
  (:func:`~engine.xds.resources.decode_resources`) and validated by
  :func:`engine.config.load_config`, the code path of the file source, in a worker
  thread (validation and policy construction never block the event loop); the snapshot
  is published on the loop, whole or not at all, and both responses are answered alike.
  So nothing is published before both types have been accepted once (settings alone,
  e.g. ``unknownRoute: allow`` with zero routes, never go live; a warm-start config and
  NOT_SERVING health stay until then), and new settings never run with old routes or
  the reverse. A held response superseded by a newer one of its type is dropped
  unanswered (the server only reads verdicts on its latest nonce), with a warning; a
  server that never sends the partner leaves the engine on its previous state.
* ACK: ``version_info`` = the response's version, ``response_nonce`` = its nonce.
* NACK: ``version_info`` = the last ACKed version of that type, the nonce, and
  ``error_detail`` (``google.rpc.Status``, code INVALID_ARGUMENT) whose message lists
  every problem, one per line, naming route, policy and field. A rejected pair NACKs
  both of its responses with the same text; the last accepted pair keeps serving, both
  of its halves.

Why state of the world and not delta: the engine must validate and apply the whole
route table atomically anyway, a wildcard SotW response *is* that table (a route
missing from it is deleted, as xDS does for Listener/Cluster), and version/nonce
handling stays one counter. The price is resending every route on each change, a few
kilobytes for hundreds of routes; one resource per route keeps delta open.

Connection loss: the engine keeps serving the last good snapshot and reconnects with
exponential backoff and full jitter (:class:`Backoff`), each attempt on a fresh
channel so gRPC's own reconnect backoff (up to two minutes) cannot exceed ours. The
delay resets only after a stream has stayed up for :data:`HEALTHY_AFTER` seconds since
its first response: a control plane that answers and then drops the stream is retried
with growing delays, not every 0.25 s.

TLS (``tls``, :class:`~engine.tls.ClientTlsFiles`): each attempt's channel reads the
CA, client certificate and key as they are then, so a rotated certificate is presented
from the next connect on; a running stream keeps its connection (nothing is dropped
when the files change). A file that cannot be used at a reconnect is logged (file and
flag named) and retried with the backoff; the last good snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from engine import metrics
from engine.chain import Snapshot
from engine.config import load_config
from engine.errors import ConfigError, TlsError
from engine.registry import PolicyRegistry
from engine.secrets import document_secrets, scrub
from engine.store import ConfigStore
from engine.tls import ClientTlsFiles, channel_credentials, channel_options
from engine.xds.resources import (
    ROUTE_CHAIN_TYPE,
    SETTINGS_TYPE,
    decode_resources,
    decode_settings,
)

__all__ = [
    "HEALTHY_AFTER",
    "MAX_MESSAGE_BYTES",
    "Backoff",
    "XdsConfigSource",
    "XdsStatus",
    "make_node",
]

log: Final = logging.getLogger("engine.xds")

MAX_MESSAGE_BYTES: Final = 64 << 20
"""gRPC's default 4 MiB receive limit would turn one oversized resource into a stream
error and a reconnect loop; above it we NACK resources larger than
:data:`~engine.xds.resources.MAX_RESOURCE_BYTES` with a clear reason instead."""

HEALTHY_AFTER: Final = 10.0
"""Seconds a stream must stay up after its first response before the reconnect backoff
resets. Longer than the default maximum backoff, so a flapping control plane is retried
at the maximum delay rather than at the base."""


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(max, base*2^n)).

    Full jitter (not +/- a fraction) spreads a fleet of engines that lost the same
    control plane, so they do not all reconnect in the same instant.
    """

    base: float = 0.25
    maximum: float = 5.0
    rand: Callable[[], float] = random.random
    attempt: int = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; advances the attempt counter."""
        ceiling = min(self.maximum, self.base * 2.0 ** min(self.attempt, 30))
        self.attempt += 1
        return ceiling * self.rand()

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class XdsStatus:
    """What the client last did (for logs, tests and operators)."""

    connected: bool = False
    acked_version: str = ""
    """The version whose RouteChain response was last ACKed (= the version published)."""
    settings_version: str = ""
    """The version whose EngineSettings response was last ACKed (always equal to
    :attr:`acked_version`: the two types are accepted only together)."""
    nacked_version: str = ""
    last_error: str = ""
    responses: int = 0
    connects: int = 0
    history: list[tuple[str, str]] = field(default_factory=list)
    """(``"ACK"`` or ``"NACK"``, version), the last :data:`_HISTORY` decisions."""


_HISTORY: Final = 100
SUBSCRIBED: Final = (ROUTE_CHAIN_TYPE, SETTINGS_TYPE)
"""The types the engine subscribes to on its ADS stream (wildcard), in this order."""
_PARTNER: Final = {ROUTE_CHAIN_TYPE: SETTINGS_TYPE, SETTINGS_TYPE: ROUTE_CHAIN_TYPE}


@dataclass(frozen=True, slots=True)
class _Accepted:
    """One type's half of the accepted (published) pair."""

    version: str
    resources: tuple[Any, ...]


def make_node(
    node_id: str | None, cluster: str, registry: PolicyRegistry, engine_version: str
) -> base_pb2.Node:
    """The ``Node`` this engine presents: id (default ``<hostname>-<pid>``), cluster, and
    metadata listing the compiled-in policies so the control plane can show them."""
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "policies": [f"{p.name} {p.version}" for p in registry],
            "pid": os.getpid(),
        }
    )
    return base_pb2.Node(
        id=node_id or f"{socket.gethostname()}-{os.getpid()}",
        cluster=cluster,
        metadata=metadata,
        user_agent_name="policy-engine",
        user_agent_version=engine_version,
    )


class XdsConfigSource:
    """Keeps ``store`` on the control plane's configuration; see the module docstring.

    ``node`` is built in the process that runs :meth:`run` (with ``--workers`` each
    worker is its own xDS client, as each Envoy instance is). :meth:`load_initial`
    returns the store's current snapshot: the xDS stream is asynchronous, so a warm
    start config (a file) is published by the caller before :meth:`run`.
    """

    name: Final = "xds"
    _candidate_secrets: frozenset[str] = frozenset()
    """The secret strings of the routes last built (see :meth:`_nack`)."""

    def __init__(
        self,
        target: str,
        registry: PolicyRegistry,
        store: ConfigStore,
        *,
        node: Callable[[], base_pb2.Node],
        backoff: Backoff | None = None,
        healthy_after: float = HEALTHY_AFTER,
        clock: Callable[[], float] = time.monotonic,
        tls: ClientTlsFiles | None = None,
    ) -> None:
        self.target = target
        self.tls = tls
        self.registry = registry
        self.store = store
        self._node_factory = node
        self.backoff = backoff if backoff is not None else Backoff()
        self.healthy_after = healthy_after
        self._clock = clock
        self.status = XdsStatus()
        # The published pair, per type; empty until both types were accepted together.
        self._accepted: dict[str, _Accepted] = {}
        # Responses of the current stream waiting for their partner, per type (the newest).
        self._held: dict[str, discovery_pb2.DiscoveryResponse] = {}
        # When the current stream delivered its first response (None: not yet).
        self._first_response_at: float | None = None

    def load_initial(self) -> Snapshot:
        """The current snapshot (see the class docstring)."""
        return self.store.current

    async def run(self) -> None:
        """Stream from the control plane until cancelled; reconnect on any failure."""
        node = self._node_factory()
        log.info("xDS: node %s (cluster %s), control plane %s", node.id, node.cluster, self.target)
        while True:
            try:
                await self._connect_once(node)
                log.warning("xDS: control plane %s closed the stream", self.target)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "xDS: stream to %s failed: %s %s", self.target, exc.code().name, exc.details()
                )
            except TlsError as exc:
                log.error("xDS: cannot connect to %s: %s", self.target, exc)
            except Exception:  # never let the source die: keep serving, keep retrying
                log.exception("xDS: unexpected client failure; reconnecting")
            self.status.connected = False
            metrics.xds_connected(False)
            if self._stream_was_healthy():
                self.backoff.reset()
            delay = self.backoff.next_delay()
            log.info(
                "xDS: reconnecting in %.2fs; serving version %d meanwhile",
                delay,
                self.store.current.version,
            )
            await asyncio.sleep(delay)

    async def _connect_once(self, node: base_pb2.Node) -> None:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # Detects a control plane that vanished without closing the connection. Every
            # 5 minutes: the most frequent ping grpc-go servers (go-control-plane) accept by
            # default (EnforcementPolicy.MinTime); more often risks a GOAWAY
            # "too_many_pings". A killed control plane on a live host resets the connection
            # at once anyway (tested: reconnect within the backoff bound).
            ("grpc.keepalive_time_ms", 300_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        if self.tls is None:
            channel = grpc.aio.insecure_channel(self.target, options=options)
        else:  # the files as they are now: a rotated client certificate is used from here on
            credentials = channel_credentials(self.tls)
            channel = grpc.aio.secure_channel(
                self.target, credentials, options=[*options, *channel_options(self.tls)]
            )
        async with channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources()
            self.status.connects += 1
            self._first_response_at = None
            self._held.clear()  # nonces belong to the stream that sent them
            for index, type_url in enumerate(SUBSCRIBED):
                await call.write(
                    discovery_pb2.DiscoveryRequest(
                        node=node if index == 0 else None,
                        type_url=type_url,
                        version_info=self._version_of(type_url),
                    )
                )
            async for response in call:
                if not self.status.connected:
                    self.status.connected = True
                    metrics.xds_connected(True)
                    log.info("xDS: connected to %s", self.target)
                if self._first_response_at is None:
                    self._first_response_at = self._clock()
                for reply in await self.handle(response):
                    await call.write(reply)

    def _stream_was_healthy(self) -> bool:
        """True if the stream that just ended stayed up ``healthy_after`` seconds after
        its first response (only then may the backoff start again from its base)."""
        since = self._first_response_at
        self._first_response_at = None
        return since is not None and self._clock() - since >= self.healthy_after

    async def handle(self, response: discovery_pb2.DiscoveryResponse) -> list[Any]:
        """Take one response; return the ACKs / NACKs to send now, in order.

        The list is empty while the response waits for its partner of the same version
        (see the module docstring); once the pair is complete it holds one verdict per
        response of the pair that was not answered yet, all ACK or all NACK.
        """
        self.status.responses += 1
        type_url = response.type_url
        version = response.version_info
        if type_url not in SUBSCRIBED:
            subscribed = " and ".join(SUBSCRIBED)
            errors = [f"type URL {type_url!r} was not subscribed ({subscribed} are)"]
            return [self._nack(response, errors)]
        partner_type = _PARTNER[type_url]
        held = self._held.get(partner_type)
        accepted = self._accepted.get(partner_type)
        answering = [response]
        if held is not None and held.version_info == version:
            del self._held[partner_type]
            answering.insert(0, held)  # it arrived first: answered first
            partner: tuple[Any, ...] = tuple(held.resources)
        elif accepted is not None and accepted.version == version:
            partner = accepted.resources  # the server re-sent one half of the pair we run
        else:
            self._drop_superseded(type_url, version)
            self._held[type_url] = response
            # Routine (the control plane sends settings, then routes), hence debug.
            log.debug(
                "xDS: holding %s version %s until %s version %s arrives",
                _short(type_url),
                version,
                _short(partner_type),
                version,
            )
            return []
        self._drop_superseded(type_url, version)
        candidate = {type_url: tuple(response.resources), partner_type: partner}
        if all(
            (a := self._accepted.get(t)) is not None
            and a.version == version
            and a.resources == candidate[t]
            for t in SUBSCRIBED
        ):  # a re-send of the pair we run (a reconnect): nothing to rebuild
            return [self._ack(r) for r in answering]
        try:
            snapshot = await asyncio.to_thread(self._build, candidate, version, self.store.current)
        except ConfigError as exc:
            return [self._nack(r, list(exc.errors)) for r in answering]
        except Exception as exc:  # a bug must NACK (and be logged), never end the stream
            log.exception("xDS: building version %s failed", version)
            errors = [f"internal error: {type(exc).__name__}: {exc}"]
            return [self._nack(r, errors) for r in answering]
        self.store.publish(snapshot, self.name)
        self._accepted = {t: _Accepted(version, candidate[t]) for t in SUBSCRIBED}
        self.status.acked_version = self.status.settings_version = version
        log.info(
            "xDS: accepted version %s: %d routes (snapshot %d)",
            version,
            len(snapshot.routes),
            snapshot.version,
        )
        return [self._ack(r) for r in answering]

    def _drop_superseded(self, type_url: str, version: str) -> None:
        """Forget the held response of ``type_url`` (unanswered: the server reads only
        verdicts on its latest nonce); a warning, as its partner never came: the server
        may not be sending both types for every version."""
        superseded = self._held.pop(type_url, None)
        if superseded is not None and superseded.version_info != version:  # not a re-send
            log.warning(
                "xDS: %s version %s superseded by version %s before %s version %s arrived: "
                "dropped unanswered (a server must send both types for every version, with "
                "the same version_info)",
                _short(type_url),
                superseded.version_info,
                version,
                _short(_PARTNER[type_url]),
                superseded.version_info,
            )

    def _ack(self, response: discovery_pb2.DiscoveryResponse) -> Any:
        self._remember("ACK", response.version_info)
        log.info("xDS: ACK %s version %s", _short(response.type_url), response.version_info)
        return discovery_pb2.DiscoveryRequest(
            type_url=response.type_url,
            version_info=response.version_info,
            response_nonce=response.nonce,
        )

    def _version_of(self, type_url: str) -> str:
        if type_url == ROUTE_CHAIN_TYPE:
            return self.status.acked_version
        if type_url == SETTINGS_TYPE:
            return self.status.settings_version
        return ""

    def _build(
        self, candidate: dict[str, tuple[Any, ...]], version: str, previous: Snapshot
    ) -> Snapshot:
        source = f"xds {self.target} version {version}"
        document, errors = decode_resources(candidate[ROUTE_CHAIN_TYPE])
        self._candidate_secrets = document_secrets(document, self.registry)  # for _nack
        settings, problems = decode_settings(candidate[SETTINGS_TYPE])
        errors += [f"settings: {problem}" for problem in problems]
        if errors:
            raise ConfigError(source, errors)
        document.update(settings)
        return load_config(document, source=source, registry=self.registry, previous=previous)

    def _nack(self, response: discovery_pb2.DiscoveryResponse, errors: list[str]) -> Any:
        version = response.version_info
        self.status.nacked_version = version
        # Config errors never show a secret; an internal error's text might: the NACK
        # (shown by the control plane's /status) and the log lines go out scrubbed of the
        # secrets of the routes being built (whichever response of the pair this is).
        secrets = self._candidate_secrets | self._secrets_of(response)
        errors = [scrub(line, secrets) for line in errors]
        self.status.last_error = "\n".join(errors)
        self._remember("NACK", version)
        previous = self._version_of(response.type_url)
        log.error(
            "xDS: NACK %s version %s (%d error(s)); keeping version %s",
            response.type_url,
            version,
            len(errors),
            previous or "<none>",
        )
        for line in errors:
            log.error("xDS: version %s: %s", version, line)
        return discovery_pb2.DiscoveryRequest(
            type_url=response.type_url or ROUTE_CHAIN_TYPE,
            version_info=previous,
            response_nonce=response.nonce,
            error_detail=status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT, message=self.status.last_error
            ),
        )

    def _secrets_of(self, response: discovery_pb2.DiscoveryResponse) -> frozenset[str]:
        """The secret strings of the routes in ``response`` (none for other types)."""
        if response.type_url != ROUTE_CHAIN_TYPE:
            return frozenset()
        document, _ = decode_resources(list(response.resources))
        return document_secrets(document, self.registry)

    def _remember(self, verdict: str, version: str) -> None:
        metrics.xds_response(verdict)
        history = self.status.history
        history.append((verdict, version))
        if len(history) > _HISTORY:
            del history[: len(history) - _HISTORY]


def _short(type_url: str) -> str:
    """``RouteChain`` / ``EngineSettings`` for log lines."""
    return type_url.rpartition(".")[2]
