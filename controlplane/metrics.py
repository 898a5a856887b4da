"""The control plane's Prometheus metrics (``--metrics-listen HOST:PORT``, ``GET /metrics``).

One process, one private registry (never prometheus-client's global one, never the
engine's multiprocess files). Counters are incremented where things happen; the gauges
are read from the ADS server's state at each scrape (:class:`_AdsCollector`), so they are
never stale.

Metric names (all prefixed ``policy_controlplane_``):

=============================================  ================================================
``xds_pushes_total{type}``                     ADS responses sent, ``routes`` / ``settings``
``xds_responses_total{node,result}``           engines' verdicts, ``ACK`` / ``NACK``: one per
                                               response answered, of either type (so a
                                               version counts two, as in the engine's own
                                               ``policy_engine_xds_responses_total``)
``admin_changes_total{role,result}``           admin API writes (PUT, DELETE): ``applied``,
                                               ``invalid`` (400), ``forbidden`` (403, a
                                               read-only token), ``unauthenticated`` (401,
                                               role ``none``)
``engines_connected``                          ADS streams open now
``engine_config_current{node}``                1 when every stream of that connected engine
                                               ACKed the table's current version, else 0
``engine_rejecting{node}``                     1 when that connected engine's last verdict on
                                               a version was a NACK (it keeps serving its
                                               previous configuration), else 0
``config_generation``                          the table's generation (each change + 1)
=============================================  ================================================

Cardinality: ``node`` is an engine's xDS node id. With ``--xds-client-ca`` a node id must
be named by the engine's certificate; without it any client may claim one, so at most
:data:`MAX_NODES` distinct ids get a series of their own and the rest share
:data:`OTHER_NODE`. Secrets never reach a label or a value (NACK texts are not exported).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from controlplane.ads import AdsServer

__all__ = [
    "ADMIN_RESULTS",
    "MAX_NODES",
    "OTHER_NODE",
    "PREFIX",
    "ControlPlaneMetrics",
]

PREFIX: Final = "policy_controlplane_"
MAX_NODES: Final = 1000
OTHER_NODE: Final = "(other)"
ADMIN_RESULTS: Final = ("applied", "invalid", "forbidden", "unauthenticated")
_ROLES: Final = ("read-only", "read-write", "none")


class ControlPlaneMetrics:
    """The control plane's metric families, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.pushes = Counter(
            PREFIX + "xds_pushes",
            "ADS responses sent to engines, by resource type",
            ["type"],
            registry=self.registry,
        )
        self.responses = Counter(
            PREFIX + "xds_responses",
            "engines' verdicts (ACK / NACK) on the ADS responses sent, one per response "
            "answered, routes or settings (a version is one of each), by node id",
            ["node", "result"],
            registry=self.registry,
        )
        self.admin_changes = Counter(
            PREFIX + "admin_changes",
            "admin API writes (PUT, DELETE) by the caller's role and the result",
            ["role", "result"],
            registry=self.registry,
        )
        for kind in ("routes", "settings"):  # known label values start at 0
            self.pushes.labels(kind)
        for role in _ROLES:
            for result in ADMIN_RESULTS:
                self.admin_changes.labels(role, result)
        self._nodes: set[str] = set()
        self._lock = threading.Lock()

    def node_label(self, node: str) -> str:
        """``node`` as a label value: its own while fewer than :data:`MAX_NODES` exist."""
        with self._lock:
            if node in self._nodes:
                return node
            if len(self._nodes) < MAX_NODES:
                self._nodes.add(node)
                for result in ("ACK", "NACK"):
                    self.responses.labels(node, result)
                return node
        return OTHER_NODE

    def pushed(self, type_name: str) -> None:
        self.pushes.labels(type_name).inc()

    def verdict(self, node: str, result: str) -> None:
        """An engine answered a response, of either type: ``ACK`` or ``NACK``. The engine
        answers both responses of a version alike, so one version counts two verdicts:
        the counts match ``xds_pushes_total`` (less those superseded or not yet answered)
        and the engine's own ``policy_engine_xds_responses_total``."""
        self.responses.labels(self.node_label(node), result).inc()

    def admin_change(self, role: str, result: str) -> None:
        """An admin write ended with ``result`` (one of :data:`ADMIN_RESULTS`)."""
        self.admin_changes.labels(role, result).inc()

    def watch(self, ads: AdsServer) -> None:
        """Export the gauges of ``ads`` (engines connected, per-engine state)."""
        self.registry.register(_AdsCollector(ads, self))

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every family."""
        return generate_latest(self.registry)


class _AdsCollector(Collector):
    """Gauges computed from the ADS server's state at scrape time (a scrape runs on the
    metrics thread: it copies the engine list once, never iterating a live dict)."""

    def __init__(self, ads: AdsServer, metrics: ControlPlaneMetrics) -> None:
        self._ads = ads
        self._metrics = metrics

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engines = [e for e in list(self._ads.engines.values()) if e.connected]
        generation = self._ads.table.current.generation
        connected = GaugeMetricFamily(PREFIX + "engines_connected", "ADS streams open now")
        connected.add_metric([], len(engines))
        current = GaugeMetricFamily(
            PREFIX + "engine_config_current",
            "1 when every stream of the engine ACKed the current version",
            labels=["node"],
        )
        rejecting = GaugeMetricFamily(
            PREFIX + "engine_rejecting",
            "1 when the engine's last verdict was a NACK (it serves its previous config)",
            labels=["node"],
        )
        by_node: dict[str, tuple[bool, bool]] = {}
        for engine in engines:
            if not engine.node_id:
                continue
            node = self._metrics.node_label(engine.node_id)
            up_to_date = engine.acked_generation == generation
            nacking = engine.nacked_generation > engine.acked_generation
            was_current, was_nacking = by_node.get(node, (True, False))
            by_node[node] = (was_current and up_to_date, was_nacking or nacking)
        for node, (up_to_date, nacking) in sorted(by_node.items()):
            current.add_metric([node], 1 if up_to_date else 0)
            rejecting.add_metric([node], 1 if nacking else 0)
        version = GaugeMetricFamily(
            PREFIX + "config_generation", "the route table's generation (each change + 1)"
        )
        version.add_metric([], generation)
        yield from (connected, current, rejecting, version)
