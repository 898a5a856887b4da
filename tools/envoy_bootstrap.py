"""The Envoy configurations of ``deploy/envoy/``, loaded and made runnable here.

``deploy/envoy/sidecar.yaml`` is the one source of the ext_proc filter and the ext_proc
cluster: the end-to-end harness (:func:`tests.e2e.harness.render_bootstrap`), and through
it the demo and the benchmark, take them from there with :func:`ext_proc_filter` and
:func:`engine_cluster_settings`; :func:`localize` turns a whole deploy file into one that
runs on 127.0.0.1 with free ports and test certificates (tests/deploy).
``sidecar-http.yaml`` adds the HTTP transport's filter and cluster (:data:`HTTP_ENGINE_CLUSTER`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

__all__ = [
    "DEPLOY_DIR",
    "ENGINE_CLUSTER",
    "EXT_PROC_FILTER",
    "HTTP_ENGINE_CLUSTER",
    "access_log",
    "engine_cluster",
    "engine_cluster_settings",
    "ext_proc_filter",
    "http_connection_manager",
    "load",
    "localize",
    "processing_mode_overridden",
]

DEPLOY_DIR: Final = Path(os.path.abspath(__file__)).parent.parent / "deploy" / "envoy"
"""``deploy/envoy`` (under Bazel: in the runfiles tree, as a data dependency)."""
EXT_PROC_FILTER: Final = "envoy.filters.http.ext_proc"
ENGINE_CLUSTER: Final = "ext_proc"
HTTP_ENGINE_CLUSTER: Final = "ext_proc_http"
"""The engine's HTTP ext_proc transport (``--listen-http``) in ``sidecar-http.yaml``."""

_cache: dict[str, dict[str, Any]] = {}


def load(name: str = "sidecar") -> dict[str, Any]:
    """A fresh copy of ``deploy/envoy/<name>.yaml`` as a dict (the caller may change it)."""
    if name not in _cache:
        path = DEPLOY_DIR / f"{name}.yaml"
        document = yaml.safe_load(path.read_text())
        if not isinstance(document, dict) or "static_resources" not in document:
            raise ValueError(f"{path}: not an Envoy bootstrap (no static_resources)")
        _cache[name] = document
    return copy.deepcopy(_cache[name])


def http_connection_manager(bootstrap: Mapping[str, Any]) -> dict[str, Any]:
    """The first listener's HTTP connection manager ``typed_config`` (not a copy)."""
    listener = bootstrap["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _ext_proc(bootstrap: Mapping[str, Any]) -> dict[str, Any]:
    for entry in http_connection_manager(bootstrap)["http_filters"]:
        if entry["name"] == EXT_PROC_FILTER:
            return entry  # type: ignore[no-any-return]
    raise ValueError(f"no {EXT_PROC_FILTER} filter in the bootstrap")


def engine_cluster(bootstrap: Mapping[str, Any], name: str = ENGINE_CLUSTER) -> dict[str, Any]:
    """The engine's cluster ``name`` of ``bootstrap`` (default: the gRPC one; not a copy)."""
    for cluster in bootstrap["static_resources"]["clusters"]:
        if cluster["name"] == name:
            return cluster  # type: ignore[no-any-return]
    raise ValueError(f"no cluster {name!r} in the bootstrap")


def ext_proc_filter(name: str = "sidecar") -> dict[str, Any]:
    """The ext_proc filter's ``typed_config`` of ``deploy/envoy/<name>.yaml`` (a copy)."""
    typed: dict[str, Any] = _ext_proc(load(name))["typed_config"]
    return typed


def engine_cluster_settings(name: str = "sidecar") -> dict[str, Any]:
    """The ext_proc cluster's settings that do not depend on where the engine is: circuit
    breakers, HTTP/2 and connection options, timeouts, health checks (a copy)."""
    cluster = engine_cluster(load(name))
    for key in ("name", "load_assignment", "type", "transport_socket"):
        cluster.pop(key, None)
    return cluster


def access_log(path: Path | str, name: str = "sidecar") -> list[dict[str, Any]]:
    """The HTTP connection manager's ``access_log`` of ``deploy/envoy/<name>.yaml``, each
    file logger writing to ``path`` instead of stdout."""
    logs: list[dict[str, Any]] = http_connection_manager(load(name)).get("access_log", [])
    for entry in logs:
        entry["typed_config"]["path"] = str(path)
    return logs


def processing_mode_overridden(settings: Mapping[str, Any]) -> bool:
    """Whether ext_proc ``settings`` replace the processing mode (so the deploy file's
    ``allowed_override_modes``, written for its own mode, no longer apply)."""
    return "processing_mode" in settings and "allowed_override_modes" not in settings


def _endpoint(cluster: dict[str, Any], host: str, port: int) -> None:
    cluster["load_assignment"] = {
        "cluster_name": cluster["name"],
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": host, "port_value": port}}
                        }
                    }
                ]
            }
        ],
    }


def localize(
    bootstrap: dict[str, Any],
    *,
    admin_port: int,
    listener_port: int,
    engine_port: int,
    upstream_port: int,
    host: str = "127.0.0.1",
    access_log_path: Path | str | None = None,
    files: Mapping[str, str] | None = None,
    server_name: str | None = None,
    engine_http_port: int | None = None,
) -> dict[str, Any]:
    """Make a deploy file runnable here (in place; returns it): every address ``host``
    with these ports (the engine, its HTTP transport when the file has one, and the
    application as STATIC clusters), access logs to
    ``access_log_path``, each ``filename`` in ``files`` replaced by its value, and the
    engine's TLS name (SNI and SAN match) ``server_name``."""
    bootstrap["admin"]["address"]["socket_address"] = {"address": host, "port_value": admin_port}
    listener = bootstrap["static_resources"]["listeners"][0]
    listener["address"]["socket_address"] = {"address": host, "port_value": listener_port}
    hcm = http_connection_manager(bootstrap)
    if access_log_path is not None:
        for entry in hcm.get("access_log", []):
            entry["typed_config"]["path"] = str(access_log_path)
    ports = {ENGINE_CLUSTER: engine_port, HTTP_ENGINE_CLUSTER: engine_http_port}
    for cluster in bootstrap["static_resources"]["clusters"]:
        port = ports.get(cluster["name"], upstream_port)
        if port is None:
            raise ValueError(f"cluster {cluster['name']!r}: pass engine_http_port")
        for key in ("dns_lookup_family", "dns_refresh_rate"):
            cluster.pop(key, None)
        cluster["type"] = "STATIC"
        _endpoint(cluster, host, port)
        tls = cluster.get("transport_socket", {}).get("typed_config")
        if tls is None:
            continue
        common = tls["common_tls_context"]
        for certificate in common.get("tls_certificates", []):
            for part in certificate.values():
                part["filename"] = (files or {}).get(part["filename"], part["filename"])
        trusted = common["validation_context"]["trusted_ca"]
        trusted["filename"] = (files or {}).get(trusted["filename"], trusted["filename"])
        if server_name is not None:
            tls["sni"] = server_name
            for san in common["validation_context"].get("match_typed_subject_alt_names", []):
                san["matcher"] = {"exact": server_name}
    return bootstrap
