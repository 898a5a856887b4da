"""The engine as an xDS client: route chains over ADS, state of the world.

:class:`XdsConfigSource` is a :class:`~engine.store.ConfigSource`. It opens one ADS
stream (``envoy.service.discovery.v3.AggregatedDiscoveryService``) to the control
plane, subscribes to :data:`~engine.xds.resources.ROUTE_CHAIN_TYPE` and
:data:`~engine.xds.resources.SETTINGS_TYPE` (``unknownRoute``) with a wildcard (no
resource names: the engine cannot know the route keys in advance) and treats every
response as the complete state of its type; the configuration is the accepted state of
both types (a server that never sends settings leaves the defaults).

Protocol, per the xDS spec:

* First requests of a stream, one per type: ``type_url``, ``version_info`` = the version
  of that type last ACKed (empty at first start), no nonce; the first carries ``node``.
* Each response is decoded (:func:`~engine.xds.resources.decode_resources`) and
  validated by :func:`engine.config.load_config`, the code path of the file source,
  in a worker thread (validation and policy construction never block the event
  loop); the snapshot is then published on the loop, whole or not at all.
* ACK: ``version_info`` = the response's version, ``response_nonce`` = its nonce.
* NACK: ``version_info`` = the last ACKed version, the nonce, and ``error_detail``
  (``google.rpc.Status``, code INVALID_ARGUMENT) whose message lists every problem,
  one per line, naming route, policy and field. The last good snapshot keeps serving.

Why state of the world and not delta: the engine must validate and apply the whole
route table atomically anyway, a wildcard SotW response *is* that table (a route
missing from it is deleted, as xDS does for Listener/Cluster), and version/nonce
handling stays one counter. The price is resending every route on each change, a few
kilobytes for hundreds of routes; one resource per route keeps delta open.

Connection loss: the engine keeps serving the last good snapshot and reconnects with
exponential backoff and full jitter (:class:`Backoff`), each attempt on a fresh
channel so gRPC's own reconnect backoff (up to two minutes) cannot exceed ours. The
delay resets once a stream has delivered a response.

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
from engine.store import ConfigStore
from engine.tls import ClientTlsFiles, channel_credentials, channel_options
from engine.xds.resources import (
    ROUTE_CHAIN_TYPE,
    SETTINGS_TYPE,
    decode_resources,
    decode_settings,
)

__all__ = [
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
    """The RouteChain version last ACKed."""
    settings_version: str = ""
    """The EngineSettings version last ACKed."""
    nacked_version: str = ""
    last_error: str = ""
    responses: int = 0
    connects: int = 0
    history: list[tuple[str, str]] = field(default_factory=list)
    """(``"ACK"`` or ``"NACK"``, version), the last :data:`_HISTORY` decisions."""


_HISTORY: Final = 100
SUBSCRIBED: Final = (ROUTE_CHAIN_TYPE, SETTINGS_TYPE)
"""The types the engine subscribes to on its ADS stream (wildcard), in this order."""


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

    def __init__(
        self,
        target: str,
        registry: PolicyRegistry,
        store: ConfigStore,
        *,
        node: Callable[[], base_pb2.Node],
        backoff: Backoff | None = None,
        tls: ClientTlsFiles | None = None,
    ) -> None:
        self.target = target
        self.tls = tls
        self.registry = registry
        self.store = store
        self._node_factory = node
        self.backoff = backoff if backoff is not None else Backoff()
        self.status = XdsStatus()
        # The resources last ACKed, per type: an update of one type is validated together
        # with the accepted state of the other, as one document.
        self._accepted: dict[str, list[Any]] = {t: [] for t in SUBSCRIBED}

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
                self.backoff.reset()
                await call.write(await self.handle(response))

    async def handle(self, response: discovery_pb2.DiscoveryResponse) -> Any:
        """Validate and apply one response; return the ACK or NACK to send back."""
        self.status.responses += 1
        version = response.version_info
        if response.type_url not in SUBSCRIBED:
            subscribed = " and ".join(SUBSCRIBED)
            errors = [f"type URL {response.type_url!r} was not subscribed ({subscribed} are)"]
            return self._nack(response, errors)
        candidate = {**self._accepted, response.type_url: list(response.resources)}
        try:
            snapshot = await asyncio.to_thread(
                self._build, candidate, response.version_info, self.store.current
            )
        except ConfigError as exc:
            return self._nack(response, list(exc.errors))
        except Exception as exc:  # a bug must NACK (and be logged), never end the stream
            log.exception("xDS: building version %s failed", version)
            return self._nack(response, [f"internal error: {type(exc).__name__}: {exc}"])
        self.store.publish(snapshot, self.name)
        self._accepted = candidate
        if response.type_url == ROUTE_CHAIN_TYPE:
            self.status.acked_version = version
        else:
            self.status.settings_version = version
        self._remember("ACK", version)
        log.info(
            "xDS: ACK %s version %s: %d routes (snapshot %d)",
            response.type_url.rpartition(".")[2],
            version,
            len(snapshot.routes),
            snapshot.version,
        )
        return discovery_pb2.DiscoveryRequest(
            type_url=response.type_url, version_info=version, response_nonce=response.nonce
        )

    def _version_of(self, type_url: str) -> str:
        if type_url == ROUTE_CHAIN_TYPE:
            return self.status.acked_version
        if type_url == SETTINGS_TYPE:
            return self.status.settings_version
        return ""

    def _build(self, candidate: dict[str, list[Any]], version: str, previous: Snapshot) -> Snapshot:
        source = f"xds {self.target} version {version}"
        document, errors = decode_resources(candidate[ROUTE_CHAIN_TYPE])
        settings, problems = decode_settings(candidate[SETTINGS_TYPE])
        errors += [f"settings: {problem}" for problem in problems]
        if errors:
            raise ConfigError(source, errors)
        document.update(settings)
        return load_config(document, source=source, registry=self.registry, previous=previous)

    def _nack(self, response: discovery_pb2.DiscoveryResponse, errors: list[str]) -> Any:
        version = response.version_info
        self.status.nacked_version = version
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

    def _remember(self, verdict: str, version: str) -> None:
        metrics.xds_response(verdict)
        history = self.status.history
        history.append((verdict, version))
        if len(history) > _HISTORY:
            del history[: len(history) - _HISTORY]
