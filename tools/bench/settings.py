"""Envoy cluster settings for an ext_proc cluster, as the benchmark compares them.

``RECOMMENDED`` is what docs/operators/envoy.md asks for on the cluster that points at the
engine (what ``tests/e2e/harness.py``, and so the demo, configure); ``ENVOY_DEFAULTS`` is
Envoy's behaviour with nothing set, kept to show why:

* **circuit breakers**: Envoy's default thresholds are 1,024 pending requests, 1,024 requests
  and 1,024 connections per cluster and priority. On an HTTP/2 cluster every ext_proc stream is
  a "request" for as long as its HTTP request lives, so the 1,025th concurrent HTTP request's
  stream overflows (``upstream_rq_pending_overflow``), the ext_proc filter sees a gRPC error and
  answers 500 (``ext_proc.streams_failed``; the engine sees the stream CANCELLED). The
  thresholds must exceed the concurrent requests Envoy may carry.
* **max_requests_per_connection** (``common_http_protocol_options``): Envoy opens a new
  HTTP/2 connection to the engine only when it has none it may use, so each Envoy worker
  thread keeps ONE connection for ever, and ``SO_REUSEPORT`` spreads connections, not
  streams, across the engine's worker processes: with one Envoy worker one engine worker
  gets everything; with two, half the time. Retiring a connection after 100 streams makes
  Envoy open a fresh one, which the kernel hashes to a worker anew: over many connection
  lifetimes each engine worker gets its share of streams. The cost is one TCP + HTTP/2
  handshake per 100 streams (measured in the benchmark's workers section).
  ``max_concurrent_streams`` (HTTP/2) would also spread load, but only while streams pile up.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from tests.e2e.harness import EXT_PROC_CIRCUIT_BREAKERS, EXT_PROC_MAX_REQUESTS_PER_CONNECTION

__all__ = ["ENVOY_DEFAULTS", "RECOMMENDED", "ext_proc_cluster_settings"]


def ext_proc_cluster_settings(
    *,
    max_requests: int | None = None,
    max_concurrent_streams: int | None = None,
    max_requests_per_connection: int | None = EXT_PROC_MAX_REQUESTS_PER_CONNECTION,
) -> dict[str, Any]:
    """Cluster fields of an ext_proc cluster for the given limits (they replace the
    harness's); ``max_requests`` None keeps the harness's circuit breakers."""
    http2: dict[str, Any] = {}
    if max_concurrent_streams is not None:
        http2["max_concurrent_streams"] = max_concurrent_streams
    options: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": http2},
    }
    if max_requests_per_connection is not None:
        options["common_http_protocol_options"] = {
            "max_requests_per_connection": max_requests_per_connection
        }
    breakers = copy.deepcopy(EXT_PROC_CIRCUIT_BREAKERS)
    if max_requests is not None:
        breakers = {
            "thresholds": [
                {
                    "max_connections": max_requests,
                    "max_pending_requests": max_requests,
                    "max_requests": max_requests,
                }
            ]
        }
    return {
        "circuit_breakers": breakers,
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options
        },
    }


RECOMMENDED: Final = ext_proc_cluster_settings()
"""What tests/e2e/harness.py (and so the demo) configures, and docs/operators/envoy.md documents."""

ENVOY_DEFAULTS: Final[dict[str, Any]] = {
    "typed_extension_protocol_options": {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
}
"""HTTP/2 and nothing else: Envoy's default circuit breakers and connection reuse."""
