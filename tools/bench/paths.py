"""What the benchmark compares: the engine's configuration and one entry per measured path."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any, Final

from tools.bench.envoy_config import NATIVE_REQUEST_HEADERS, NATIVE_RESPONSE_HEADERS

__all__ = [
    "ENGINE_KEYS",
    "JSON_BODY_BYTES",
    "TLS_KEYS",
    "BenchPath",
    "engine_config",
    "json_body",
    "paths",
]

ENGINE_KEYS: Final = ("empty", "headers-request", "headers", "jwt", "json")
TLS_KEYS: Final = ("empty", "headers")
"""Engine routes measured a second time over mTLS (``/tls-<key>/``, server ``engine-tls``)."""
ENGINE_TRANSPORT: Final = "grpcaio-uvloop"
"""The floor implementation on the engine's own transport (grpc.aio on uvloop:
engine/transport/server.py)."""
JSON_BODY_BYTES: Final = 100 * 1024


def engine_config(jwks_url: str, jwks_ca: str) -> dict[str, Any]:
    """Routes (a) empty, (b) 5 x setHeader, (c) jwtValidation + rateLimit, (d) jsonTransform."""
    headers: list[dict[str, Any]] = [
        {
            "name": "setHeader",
            "version": "v1.0.0",
            "parameters": {"request": {"set": {name: value}}},
        }
        for name, value in NATIVE_REQUEST_HEADERS
    ]
    request_only = copy.deepcopy(headers)
    # The native route also sets a response header: the last policy does too.
    headers[-1]["parameters"]["response"] = {"set": dict(NATIVE_RESPONSE_HEADERS)}
    return {
        "routes": {
            "empty": {"policies": []},
            "headers-request": {"policies": request_only},
            "headers": {"policies": headers},
            "jwt": {
                "policies": [
                    {
                        "name": "jwtValidation",
                        "version": "v1.0.0",
                        "parameters": {
                            "jwksUrl": jwks_url,
                            "caFile": jwks_ca,
                            "issuer": "https://idp.test/",
                            "audiences": ["orders-api"],
                        },
                    },
                    {
                        "name": "rateLimit",
                        "version": "v1.0.0",
                        # Never limiting: the benchmark measures the check, not 429s.
                        "parameters": {
                            "requestsPerSecond": 1000000,
                            "burstSize": 1000000,
                            "keyBy": "metadata",
                            "keyName": "jwt.sub",
                        },
                    },
                ]
            },
            "json": {
                "policies": [
                    {
                        "name": "jsonTransform",
                        "version": "v1.0.0",
                        "parameters": {
                            "request": {"set": {"meta.source": "gateway"}, "remove": ["password"]}
                        },
                    }
                ]
            },
        }
    }


def json_body(size: int = JSON_BODY_BYTES) -> bytes:
    """A JSON object of about ``size`` bytes: a list of small records plus a password field."""
    items: list[dict[str, Any]] = []
    body = b""
    while len(body) < size:
        n = len(items)
        items.extend(
            {"id": i, "name": f"user-{i}", "email": f"user{i}@example.com", "active": i % 2 == 0}
            for i in range(n, n + 50)
        )
        body = json.dumps({"password": "hunter2", "items": items}).encode()
    return body


@dataclass(frozen=True)
class BenchPath:
    """One measured path through Envoy. ``server`` names the ext_proc server whose CPU counts
    (``engine``, ``floor-<impl>``) or is None for Envoy-only paths; ``floor`` is the name of
    the path whose CPU per request is this one's floor."""

    name: str
    label: str
    url_path: str
    server: str | None = None
    floor: str | None = None
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    body: bool = False  # POST the 100 KB JSON body
    baseline: str = "direct"  # the Envoy-only path this one's rps and latency compare to


def paths(floor_impls: tuple[str, ...], token: str, *, tls: bool = False) -> list[BenchPath]:
    """Every path, in table order. The floors of the engine paths are the trivial servicer
    on the engine's transport (:data:`ENGINE_TRANSPORT`) with the same number of ext_proc
    messages per request. ``tls``: each route of :data:`TLS_KEYS` is followed by the same
    route through the engine over mTLS (same floor and baseline: the difference is TLS)."""
    json_headers = {"content-type": "application/json"}
    result = [
        BenchPath("direct", "Envoy direct -> nginx", "/direct/x"),
        BenchPath("native-request", "Envoy native headers (5 req)", "/native-request/x"),
        BenchPath("native", "Envoy native headers (5 req + 1 resp)", "/native/x"),
    ]
    for impl in floor_impls:
        result.append(
            BenchPath(
                f"floor1-{impl}", f"trivial servicer, {impl}", f"/floor1/{impl}/x", f"floor-{impl}"
            )
        )
    floor1, floor2 = f"floor1-{ENGINE_TRANSPORT}", f"floor2-{ENGINE_TRANSPORT}"
    floor_body = f"floorbody-{ENGINE_TRANSPORT}"
    if ENGINE_TRANSPORT in floor_impls:
        result += [
            BenchPath(
                floor2,
                f"trivial servicer, {ENGINE_TRANSPORT}, 2 messages",
                f"/floor2/{ENGINE_TRANSPORT}/x",
                f"floor-{ENGINE_TRANSPORT}",
            ),
            BenchPath(
                floor_body,
                f"trivial servicer, {ENGINE_TRANSPORT}, 100 KB body echoed",
                f"/floorbody/{ENGINE_TRANSPORT}/x",
                f"floor-{ENGINE_TRANSPORT}",
                method="POST",
                headers=json_headers,
                body=True,
                baseline="direct-json",
            ),
        ]
    result += [
        BenchPath("empty", "engine, empty chain", "/empty/x", "engine", floor1),
        BenchPath(
            "headers-request",
            "engine, 5 x setHeader (request headers)",
            "/headers-request/x",
            "engine",
            floor1,
            baseline="native-request",
        ),
        BenchPath(
            "headers",
            "engine, 5 x setHeader + 1 response header",
            "/headers/x",
            "engine",
            floor2,
            baseline="native",
        ),
        BenchPath(
            "jwt",
            "engine, jwtValidation + rateLimit",
            "/jwt/x",
            "engine",
            floor1,
            headers={"authorization": f"Bearer {token}"},
        ),
        BenchPath(
            "direct-json",
            "Envoy direct, 100 KB JSON POST",
            "/direct/json",
            method="POST",
            headers=json_headers,
            body=True,
        ),
        BenchPath(
            "json",
            "engine, jsonTransform 100 KB",
            "/json/x",
            "engine",
            floor_body,
            method="POST",
            headers=json_headers,
            body=True,
            baseline="direct-json",
        ),
    ]
    if tls:
        with_tls: list[BenchPath] = []
        for entry in result:
            with_tls.append(entry)
            if entry.server == "engine" and entry.name in TLS_KEYS:
                with_tls.append(
                    BenchPath(
                        f"{entry.name}-tls",
                        f"{entry.label}, over mTLS",
                        f"/tls-{entry.name}/x",
                        "engine-tls",
                        entry.floor,
                        method=entry.method,
                        headers=entry.headers,
                        body=entry.body,
                        baseline=entry.baseline,
                    )
                )
        result = with_tls
    return result
