"""The control plane in-process: admin API, validation against an engine's definitions,
ADS pushes to a real xDS client, per-engine status, the watched config."""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.definitions import load_validation_registry
from controlplane.testing import ControlPlane, write_definitions
from engine.registry import PolicyRegistry
from engine.store import ConfigStore
from engine.xds.client import Backoff, XdsConfigSource, make_node
from tests.support import policy_folder, registry_from

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted(p for p in (REPO / "policies").glob("*/v*") if p.is_dir())

JWT = {
    "name": "jwtValidation",
    "version": "v1.0.0",
    "parameters": {
        "jwksUrl": "https://idp.example/jwks.json",
        "issuer": "https://idp.example",
        "audiences": ["api"],
    },
}
LIMIT = {"name": "rateLimit", "version": "v1.0.0", "parameters": {"requestsPerSecond": 5}}


@pytest.fixture(scope="module")
def definitions(tmp_path_factory: pytest.TempPathFactory) -> PolicyRegistry:
    path = tmp_path_factory.mktemp("defs") / "engine_definitions.json"
    write_definitions(path, SAMPLES, {"target": "//generated/test:engine"})
    loaded = load_validation_registry(path)
    assert loaded.build_info["target"] == "//generated/test:engine"
    return loaded.registry


async def call(
    plane: ControlPlane,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = "admin",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One admin API request; ``token``: "admin", "reader", None (no header) or a value."""
    secret = {"admin": plane.admin_token, "reader": plane.reader_token}.get(token or "", token)
    sent = {"Authorization": f"Bearer {secret}"} if secret else {}
    sent.update(headers or {})

    def run() -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", plane.admin_port, timeout=5)
        try:
            data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
            conn.request(method, path, body=data, headers=sent)
            reply = conn.getresponse()
            return reply.status, json.loads(reply.read() or b"null")
        finally:
            conn.close()

    return await asyncio.to_thread(run)


@pytest.fixture
async def plane(definitions: PolicyRegistry) -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(definitions)
    await plane.start()
    try:
        yield plane
    finally:
        assert await plane.stop() == 0


async def test_submit_replace_delete_a_route(plane):
    status, body = await call(plane, "PUT", "/routes/private", {"policies": [JWT]})
    assert status == 200, body
    first = body["version"]
    assert first.startswith("1-")
    status, body = await call(plane, "GET", "/routes/private")
    assert body["spec"] == {"policies": [JWT]}
    # YAML bodies work too (the config file's format).
    yaml_body = yaml.safe_dump({"policies": [JWT, LIMIT]})
    status, body = await call(plane, "PUT", "/routes/private", yaml_body)
    assert status == 200
    assert body["version"].startswith("2-")
    status, body = await call(plane, "DELETE", "/routes/private")
    assert status == 200
    status, body = await call(plane, "GET", "/routes")
    assert body["routes"] == {}
    assert (await call(plane, "DELETE", "/routes/private"))[0] == 404
    assert (await call(plane, "POST", "/routes/private", {}))[0] == 405


def _with(entry: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {**entry, "parameters": {**entry["parameters"], **params}}


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        pytest.param(
            _with(JWT, jwksUrl="http://idp.example/jwks.json"),
            "routes[r].policies[0] jwtValidation v1.0.0: jwksUrl must be HTTPS",
            id="http-jwksUrl",
        ),
        pytest.param(
            _with(LIMIT, requestsPerSecond=-1),
            "routes[r].policies[0] rateLimit v1.0.0: requestsPerSecond: -1 is less than or "
            "equal to the minimum of 0",
            id="negative-rate",
        ),
        pytest.param(
            _with(JWT, header="bad header"),
            "routes[r].policies[0] jwtValidation v1.0.0: header: 'bad header' does not match",
            id="pattern-mismatch",
        ),
        pytest.param(
            {**JWT, "parameters": {"jwksUrl": "https://idp.example/jwks.json"}},
            "routes[r].policies[0] jwtValidation v1.0.0: missing required parameter(s): "
            "audiences, issuer",
            id="missing-required",
        ),
        pytest.param(
            {**LIMIT, "version": "v3.0.0"},
            "routes[r].policies[0] rateLimit v3.0.0: policy 'rateLimit' version v3.0.0 is not "
            "in this engine (versions available: v1.0.0, v2.0.0)",
            id="version-not-in-engine",
        ),
        pytest.param(
            {**LIMIT, "condition": "request.method =="},
            "routes[r].policies[0] rateLimit v1.0.0: condition:",
            id="bad-cel",
        ),
        pytest.param(
            {**LIMIT, "mode": "dry-run"},
            "routes[r].policies[0] rateLimit v1.0.0: mode: 'dry-run' is not one of enforce, shadow",
            id="bad-mode",
        ),
    ],
)
async def test_invalid_submission_is_400_naming_route_policy_field(plane, entry, expected):
    assert (await call(plane, "PUT", "/routes/keep", {"policies": [LIMIT]}))[0] == 200
    before = plane.table.current
    status, body = await call(plane, "PUT", "/routes/r", {"policies": [entry]})
    assert status == 400
    assert any(error.startswith(expected) for error in body["errors"]), body["errors"]
    assert plane.table.current is before  # nothing changed, so nothing is pushed


async def test_every_error_is_reported(plane):
    bad = [_with(JWT, jwksUrl="http://x"), _with(LIMIT, requestsPerSecond=-1)]
    status, body = await call(plane, "PUT", "/routes/r", {"policies": bad})
    assert status == 400
    assert len(body["errors"]) == 2
    status, body = await call(plane, "PUT", "/routes/r", "policies: [")
    assert status == 400
    assert body["errors"][0].startswith("body: ")


async def test_unknown_route_setting_reaches_engines(plane):
    registry = registry_from("addHeader")
    plane.table.registry = registry
    store = ConfigStore()
    source = XdsConfigSource(
        f"127.0.0.1:{plane.xds_port}",
        registry,
        store,
        node=functools.partial(make_node, "e", "edge", registry, "0.1.0"),
    )
    task = asyncio.create_task(source.run())
    try:
        status, body = await call(
            plane, "PUT", "/routes", {"routes": {}, "unknownRoute": {"status": 200}}
        )
        assert status == 400
        assert body["errors"] == ["unknownRoute: status: must be an integer in 400-599, got 200"]
        status, body = await call(
            plane,
            "PUT",
            "/routes",
            {"routes": {"r": {"policies": []}}, "unknownRoute": {"action": "allow"}},
        )
        assert status == 200

        await asyncio.wait_for(applied_version(source, body["version"]), 10)
        # Settings and routes of one version are applied (and ACKed) together.
        assert source.status.settings_version == body["version"]
        assert store.current.unknown_route is None  # allow
        # A route change keeps the setting; every version carries both types, so the
        # engine can pair them by version.
        status, again = await call(plane, "PUT", "/routes/s", {"policies": []})
        assert status == 200
        await asyncio.wait_for(applied_version(source, again["version"]), 10)
        assert store.current.unknown_route is None
        assert source.status.settings_version == again["version"]

        async def settings_acked() -> None:
            while True:
                _, table = await call(plane, "GET", "/status")
                if table["engines"][0]["settingsAckedVersion"] == again["version"]:
                    return
                await asyncio.sleep(0.02)

        await asyncio.wait_for(settings_acked(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_shadow_entry_reaches_engines_as_shadow(plane):
    registry = registry_from("addHeader")
    plane.table.registry = registry
    store = ConfigStore()
    source = XdsConfigSource(
        f"127.0.0.1:{plane.xds_port}",
        registry,
        store,
        node=functools.partial(make_node, "e", "edge", registry, "0.1.0"),
    )
    task = asyncio.create_task(source.run())
    try:
        add = {
            "name": "addHeader",
            "version": "v1.0.0",
            "parameters": {"header": "x-a", "value": "1"},
        }
        spec = {"policies": [{**add, "mode": "shadow"}, {**add, "mode": "enforce"}, add]}
        status, body = await call(plane, "PUT", "/routes/r", spec)
        assert status == 200, body
        await asyncio.wait_for(applied_version(source, body["version"]), 10)
        chain = store.current.chain_for("r")
        assert chain is not None
        assert [p.shadow for p in chain.policies] == [True, False, False]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def applied_version(source: XdsConfigSource, version: str) -> None:
    while True:
        if source.status.acked_version == version:
            return
        await asyncio.sleep(0.02)


async def test_engines_get_accepted_versions_and_status_shows_each(plane):
    registry = registry_from("addHeader")
    # The engines' registry lacks the samples: validate against theirs for this test.
    plane.table.registry = registry
    engines = []
    for index in range(2):
        store = ConfigStore()
        node_id = f"engine-{index}"
        source = XdsConfigSource(
            f"127.0.0.1:{plane.xds_port}",
            registry,
            store,
            node=functools.partial(make_node, node_id, "edge", registry, "0.1.0"),
            backoff=Backoff(base=0.05, maximum=0.2),
        )
        engines.append((store, source, asyncio.create_task(source.run())))
    try:
        spec = {
            "policies": [
                {
                    "name": "addHeader",
                    "version": "v1.0.0",
                    "parameters": {"header": "x-a", "value": "1"},
                }
            ]
        }
        status, body = await call(plane, "PUT", "/routes/r", spec)
        assert status == 200
        version = body["version"]

        async def converged() -> list[dict[str, Any]]:
            while True:
                _, status_body = await call(plane, "GET", "/status")
                acked = [e for e in status_body["engines"] if e["ackedVersion"] == version]
                if len(acked) == 2:
                    return list(status_body["engines"])
                await asyncio.sleep(0.05)

        rows = await asyncio.wait_for(converged(), 10)
        assert sorted(r["node"] for r in rows) == ["engine-0", "engine-1"]
        assert all(r["connected"] for r in rows)
        assert rows[0]["metadata"]["policies"] == ["addHeader v1.0.0"]
        for store, source, _ in engines:
            assert source.status.acked_version == version
            assert store.current.chain_for("r") is not None

        # Rejected: nothing reaches the engines (no new response at all).
        responses = [source.status.responses for _, source, _ in engines]
        bad = {"policies": [{**spec["policies"][0], "parameters": {"header": "X"}}]}
        status, _ = await call(plane, "PUT", "/routes/r", bad)
        assert status == 400
        await asyncio.sleep(0.3)
        assert [source.status.responses for _, source, _ in engines] == responses
    finally:
        for _, _, task in engines:
            task.cancel()
        await asyncio.gather(*(t for _, _, t in engines), return_exceptions=True)


async def test_engine_nack_shows_in_status(plane):
    # The control plane validates against definitions; a rule only a policy's constructor
    # knows is the engine's to reject. Simulate it with an engine lacking the policy.
    plane.table.registry = registry_from("addHeader", "deny")
    store = ConfigStore()
    engine_registry = registry_from("addHeader")
    source = XdsConfigSource(
        f"127.0.0.1:{plane.xds_port}",
        engine_registry,
        store,
        node=lambda: make_node("old-engine", "edge", engine_registry, "0.1.0"),
    )
    task = asyncio.create_task(source.run())
    try:
        spec = {"policies": [{"name": "deny", "version": "v1.0.0"}]}
        status, body = await call(plane, "PUT", "/routes/r", spec)
        assert status == 200

        async def nacked() -> dict[str, Any]:
            while True:
                _, status_body = await call(plane, "GET", "/status")
                rows = [e for e in status_body["engines"] if e["nackedVersion"] == body["version"]]
                if rows:
                    return dict(rows[0])
                await asyncio.sleep(0.05)

        row = await asyncio.wait_for(nacked(), 10)
        assert row["node"] == "old-engine"
        assert "policy 'deny' is not in this engine" in row["nackError"]
        assert row["ackedVersion"] == ""
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


API_KEY_VALUE = "ak-live-6f1c0b9e4d"
REDIS_PASSWORD = "rp-9d2e7a51c3"
SECRET_ROUTE: dict[str, Any] = {
    "policies": [
        {
            "name": "apiKey",
            "version": "v1.0.0",
            "parameters": {"keys": [{"key": API_KEY_VALUE, "consumer": "mobile"}]},
        },
        {
            "name": "rateLimit",
            "version": "v2.0.0",
            "parameters": {
                "requestsPerSecond": 5,
                "backend": "redis",
                "redisUrl": f"redis://app:{REDIS_PASSWORD}@cache.internal:6379/0",
            },
        },
    ]
}


async def test_admin_api_and_status_never_show_secrets(plane):
    status, body = await call(plane, "PUT", "/routes/r", SECRET_ROUTE)
    assert status == 200, body
    shown = [
        json.dumps(await call(plane, "GET", path))
        for path in ("/routes", "/routes/r", "/status", "/healthz")
    ]
    for text in shown:
        assert API_KEY_VALUE not in text
        assert REDIS_PASSWORD not in text
    _, body = await call(plane, "GET", "/routes/r")
    entries = body["spec"]["policies"]
    assert entries[0]["parameters"]["keys"] == [{"key": "<redacted>", "consumer": "mobile"}]
    # Host, port and database stay visible for operators.
    assert entries[1]["parameters"]["redisUrl"] == "redis://app:<redacted>@cache.internal:6379/0"
    # Engines get the real values.
    pushed = plane.table.current.document["routes"]["r"]["policies"]
    assert pushed[0]["parameters"]["keys"][0]["key"] == API_KEY_VALUE

    # GET, change, PUT: the markers keep the current secrets.
    spec = body["spec"]
    spec["policies"][0]["parameters"]["stripKey"] = False
    status, body = await call(plane, "PUT", "/routes/r", spec)
    assert status == 200, body
    pushed = plane.table.current.document["routes"]["r"]["policies"]
    assert pushed[0]["parameters"] == {
        "keys": [{"key": API_KEY_VALUE, "consumer": "mobile"}],
        "stripKey": False,
    }
    assert REDIS_PASSWORD in pushed[1]["parameters"]["redisUrl"]
    # A marker with nothing to keep (a new route) is a 400 naming the field.
    status, body = await call(plane, "PUT", "/routes/other", spec)
    assert status == 400
    assert body["errors"][0].startswith(
        "routes[other].policies[0] apiKey v1.0.0: keys[0].key: is '<redacted>'"
    )


async def test_invalid_secret_is_400_without_its_value(plane):
    bad = {
        "policies": [
            {"name": "apiKey", "version": "v1.0.0", "parameters": {"keys": [API_KEY_VALUE]}},
            {
                "name": "rateLimit",
                "version": "v2.0.0",
                "parameters": {
                    "requestsPerSecond": 5,
                    "burstSize": 0,
                    "backend": "redis",
                    "redisUrl": f"redis://app:{REDIS_PASSWORD}@cache.internal:6379/0",
                },
            },
        ]
    }
    status, body = await call(plane, "PUT", "/routes/r", bad)
    assert status == 400
    text = json.dumps(body)
    expected = "routes[r].policies[0] apiKey v1.0.0: keys[0]: (secret, not shown) is not of type"
    assert expected in text
    assert API_KEY_VALUE not in text
    assert REDIS_PASSWORD not in text


@pytest.mark.parametrize("engine_build", ["current", "old-build"])
async def test_nack_text_never_shows_secrets(plane, tmp_path, engine_build):
    # The control plane validates against definitions only; the engine's constructor
    # rejects the token and quotes it, as careless policy code might. An engine built
    # before `secret` existed (old-build: its definition marks nothing) sends the
    # token in its NACK: the control plane scrubs it from /status.
    definitions = write_definitions(
        tmp_path / "defs.json", [policy_folder("secretToken")], {"target": "t"}
    )
    plane.table.registry = load_validation_registry(definitions).registry
    folder = policy_folder("secretToken")
    if engine_build == "old-build":
        folder = tmp_path / "secretToken" / "v1.0.0"
        folder.mkdir(parents=True)
        definition = (policy_folder("secretToken") / "policy-definition.yaml").read_text()
        (folder / "policy-definition.yaml").write_text(
            "\n".join(line for line in definition.splitlines() if "secret:" not in line)
        )
        (folder / "policy.py").write_text((policy_folder("secretToken") / "policy.py").read_text())
    engine_registry = registry_from(folder)
    token = "revoked-tk-0c4f8e21b7"
    source = XdsConfigSource(
        f"127.0.0.1:{plane.xds_port}",
        engine_registry,
        ConfigStore(),
        node=lambda: make_node("engine", "edge", engine_registry, "0.1.0"),
    )
    task = asyncio.create_task(source.run())
    try:
        spec = {
            "policies": [
                {"name": "secretToken", "version": "v1.0.0", "parameters": {"token": token}}
            ]
        }
        status, body = await call(plane, "PUT", "/routes/r", spec)
        assert status == 200, body

        async def nacked() -> dict[str, Any]:
            while True:
                _, status_body = await call(plane, "GET", "/status")
                rows = [e for e in status_body["engines"] if e["nackedVersion"] == body["version"]]
                if rows:
                    return dict(rows[0])
                await asyncio.sleep(0.05)

        row = await asyncio.wait_for(nacked(), 10)
        assert "routes[r].policies[0] secretToken v1.0.0: token:" in row["nackError"]
        assert token not in row["nackError"]
        assert "<redacted>" in row["nackError"]
        if engine_build == "current":  # the engine's own NACK text is clean too
            assert token not in source.status.last_error
            assert "'<redacted>' is revoked" in source.status.last_error
        else:
            assert token in source.status.last_error
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_watched_directory_replaces_the_table(definitions, tmp_path):
    config = tmp_path / "routes"
    config.mkdir()
    (config / "a.yaml").write_text(yaml.safe_dump({"routes": {"a": {"policies": [LIMIT]}}}))
    (config / "b.yaml").write_text(yaml.safe_dump({"routes": {"b": {"policies": []}}}))
    plane = ControlPlane(definitions, config)
    await plane.start()
    try:
        assert set(plane.table.routes()) == {"a", "b"}
        first = plane.table.current

        def swap(name: str, document: Any) -> None:  # atomic, as GitOps tools do
            tmp = config / f".{name}.tmp"
            tmp.write_text(yaml.safe_dump(document))
            tmp.replace(config / name)

        # A duplicate key across files is rejected; the table keeps its state.
        swap("c.yaml", {"routes": {"a": {"policies": []}}})
        await asyncio.sleep(0.3)
        assert plane.table.current is first
        (config / "c.yaml").unlink()
        swap("b.yaml", {"routes": {"b": {"policies": [_with(LIMIT, requestsPerSecond=-1)]}}})
        await asyncio.sleep(0.3)
        assert plane.table.current is first
        swap("b.yaml", {"routes": {"b": {"policies": [LIMIT]}}})

        await asyncio.wait_for(plane.table.wait_newer(first.generation), 5)
        assert plane.table.routes()["b"] == {"policies": [LIMIT]}
    finally:
        await plane.stop()


async def test_invalid_initial_config_is_exit_1(definitions, tmp_path):
    config = tmp_path / "routes.yaml"
    config.write_text(yaml.safe_dump({"routes": {"a": {"policies": [_with(LIMIT, x=1)]}}}))
    plane = ControlPlane(definitions, config)
    with pytest.raises(RuntimeError, match="exited with 1"):
        await plane.start()
