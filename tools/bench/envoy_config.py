"""The benchmark's Envoy: the end-to-end tests' bootstrap plus the paths being compared.

:func:`bench_bootstrap` starts from :func:`tests.e2e.harness.render_bootstrap` (the same
ext_proc filter the tests and the demo run) and adds, on one listener:

* ``/direct/``: ext_proc disabled, straight to nginx;
* ``/native/``: ext_proc disabled, Envoy's own route ``request_headers_to_add`` /
  ``response_headers_to_add`` doing the 5-header chain's header work;
* ``/floor1/<impl>/``, ``/floor2/<impl>/``: ext_proc sent to a trivial servicer (its own cluster,
  through ``ExtProcPerRoute.overrides.grpc_service``);
* ``/<key>/`` for each engine route key;
* ``/tls-<key>/`` for each of ``tls_keys``: the same route key, sent to a second engine
  over mTLS (cluster ``ext_proc_tls``: the engine cluster plus an ``UpstreamTlsContext``
  with a client certificate), so plaintext and TLS compare side by side in one run.

``cluster_settings`` replace the harness's circuit breakers and protocol options on every
ext_proc cluster (the engine's and the floors'), so runs can compare Envoy's defaults with
the settings docs/operators/envoy.md recommends (``tools/bench/settings.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Final

from tests.e2e.harness import EnvoyRoute, render_bootstrap

__all__ = [
    "NATIVE_REQUEST_HEADERS",
    "NATIVE_RESPONSE_HEADERS",
    "UPSTREAM_CIRCUIT_BREAKERS",
    "bench_bootstrap",
]

_TYPE: Final = "type.googleapis.com/envoy."
_PER_ROUTE: Final = _TYPE + "extensions.filters.http.ext_proc.v3.ExtProcPerRoute"

# What the 5-header chain does (tools/bench/bench.py builds it from the same lists).
NATIVE_REQUEST_HEADERS: Final = tuple((f"x-bench-{i}", f"value-{i}") for i in range(1, 6))
NATIVE_RESPONSE_HEADERS: Final = (("x-bench-served", "policy-engine"),)

# The upstream (nginx, HTTP/1.1: one connection per request in flight). Envoy's defaults
# (1,024 connections / pending / requests) would answer 503 past 2,048 clients; connections
# are capped below the benchmark's file limit and the rest waits in the pending queue.
UPSTREAM_CIRCUIT_BREAKERS: Final = {
    "thresholds": [
        {"max_connections": 4096, "max_pending_requests": 100000, "max_requests": 100000}
    ]
}


def _disabled(entry: dict[str, Any]) -> dict[str, Any]:
    entry["typed_per_filter_config"] = {
        "envoy.filters.http.ext_proc": {"@type": _PER_ROUTE, "disabled": True}
    }
    return entry


def _route(name: str, prefix: str) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"prefix": prefix},
        "route": {"cluster": "echo", "timeout": "30s"},
    }


def bench_bootstrap(
    *,
    admin_port: int,
    listener_port: int,
    engine_port: int,
    upstream_port: int,
    engine_keys: Sequence[str],
    floors: Mapping[str, int],
    cluster_settings: Mapping[str, Any] | None = None,
    message_timeout: float = 2.0,
    stream_timeout: float | None = None,
    tls_engine: tuple[int, dict[str, Any]] | None = None,
    tls_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """The benchmark's bootstrap (see the module docstring). ``floors``: impl -> port.
    ``tls_engine``: (port, the cluster's ``transport_socket``) of the engine behind the
    ``/tls-<key>/`` routes of ``tls_keys``.

    ``stream_timeout`` replaces the ext_proc ``grpc_service.timeout`` (the deadline of each
    whole ext_proc stream, sent as ``grpc-timeout``), e.g. for overload runs whose queueing
    delay exceeds the tests' 5 s."""
    routes = [EnvoyRoute(key, f"/{key}/", key) for key in engine_keys]
    bootstrap = render_bootstrap(
        admin_port=admin_port,
        listener_port=listener_port,
        engine_port=engine_port,
        upstream_port=upstream_port,
        routes=routes,
        message_timeout=message_timeout,
    )
    resources = bootstrap["static_resources"]
    clusters = resources["clusters"]
    by_name = {c["name"]: c for c in clusters}
    ext_proc_cluster = by_name["ext_proc"]
    for impl, port in floors.items():
        floor = copy.deepcopy(ext_proc_cluster)
        floor["name"] = floor["load_assignment"]["cluster_name"] = f"floor_{impl}"
        address = floor["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        address["address"]["socket_address"]["port_value"] = port
        clusters.append(floor)
    if tls_engine is not None:
        secured = copy.deepcopy(ext_proc_cluster)
        secured["name"] = secured["load_assignment"]["cluster_name"] = "ext_proc_tls"
        address = secured["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        address["address"]["socket_address"]["port_value"] = tls_engine[0]
        secured["transport_socket"] = copy.deepcopy(tls_engine[1])
        clusters.append(secured)
    for cluster in clusters:
        if cluster["name"] == "echo":
            cluster["circuit_breakers"] = copy.deepcopy(UPSTREAM_CIRCUIT_BREAKERS)
        elif cluster_settings is not None:  # replaces the harness's ext_proc settings
            cluster.pop("circuit_breakers", None)
            cluster.pop("typed_extension_protocol_options", None)
            _merge(cluster, cluster_settings)

    listener = resources["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc_filter = hcm["http_filters"][0]["typed_config"]
    if stream_timeout is not None:
        ext_proc_filter["grpc_service"]["timeout"] = f"{stream_timeout:g}s"
    grpc_timeout = ext_proc_filter["grpc_service"].get("timeout", "5s")
    vhost = hcm["route_config"]["virtual_hosts"][0]
    for entry in vhost["routes"]:
        entry["route"]["timeout"] = "30s"
    extra = [_disabled(_route("direct", "/direct/"))]
    native = _disabled(_route("native", "/native/"))
    native["request_headers_to_add"] = [
        {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for k, v in NATIVE_REQUEST_HEADERS
    ]
    native["response_headers_to_add"] = [
        {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for k, v in NATIVE_RESPONSE_HEADERS
    ]
    extra.append(native)
    native_request = _disabled(_route("native-request", "/native-request/"))
    native_request["request_headers_to_add"] = copy.deepcopy(native["request_headers_to_add"])
    extra.append(native_request)
    for impl in floors:
        for messages in ("1", "2", "body"):
            entry = _route(f"floor{messages}-{impl}", f"/floor{messages}/{impl}/")
            entry["typed_per_filter_config"] = {
                "envoy.filters.http.ext_proc": {
                    "@type": _PER_ROUTE,
                    "overrides": {
                        "grpc_service": {
                            "envoy_grpc": {"cluster_name": f"floor_{impl}"},
                            "timeout": grpc_timeout,
                        },
                        "grpc_initial_metadata": [
                            {"key": "x-policy-route", "value": f"floor{messages}"}
                        ],
                    },
                }
            }
            extra.append(entry)
    for key in tls_keys if tls_engine is not None else ():
        entry = _route(f"tls-{key}", f"/tls-{key}/")
        entry["typed_per_filter_config"] = {
            "envoy.filters.http.ext_proc": {
                "@type": _PER_ROUTE,
                "overrides": {
                    "grpc_service": {
                        "envoy_grpc": {"cluster_name": "ext_proc_tls"},
                        "timeout": grpc_timeout,
                    },
                    "grpc_initial_metadata": [{"key": "x-policy-route", "value": key}],
                },
            }
        }
        extra.append(entry)
    vhost["routes"] = extra + vhost["routes"]
    return bootstrap


def _merge(target: dict[str, Any], settings: Mapping[str, Any]) -> None:
    """Deep-merge ``settings`` into ``target`` (dicts merge; anything else replaces)."""
    for key, value in settings.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
