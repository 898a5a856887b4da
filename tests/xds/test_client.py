"""The engine's xDS client against a raw ADS server (engine/xds/client.py).

The raw server validates nothing, so these tests push what a broken xDS server might
and read the engine's ACK / NACK requests back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2
from policy_engine.v1 import route_chain_pb2

from engine.store import ConfigStore
from engine.xds.client import Backoff, XdsConfigSource, make_node
from engine.xds.resources import MAX_RESOURCE_BYTES, ROUTE_CHAIN_TYPE, SETTINGS_TYPE
from engine.xds.testing import RawXdsServer, route_any
from tests.support import registry_from

REGISTRY = registry_from("addHeader", "deny")


def add_header(value: str, **extra: Any) -> dict[str, Any]:
    return {
        "policies": [
            {
                "name": "addHeader",
                "version": "v1.0.0",
                "parameters": {"header": "x-version", "value": value, **extra},
            }
        ]
    }


@dataclass
class Rig:
    server: RawXdsServer
    store: ConfigStore
    source: XdsConfigSource
    task: asyncio.Task[None]

    def header_value(self, route: str = "r") -> str:
        chain = self.store.current.chain_for(route)
        assert chain is not None
        return str(chain.policies[0].instance.value)

    async def push_ok(self, version: str, routes: dict[str, Any]) -> None:
        response = await self.server.push(
            [route_any(k, v) for k, v in routes.items()], version=version
        )
        ack = await self.server.next_request()
        assert ack.response_nonce == response.nonce
        assert ack.version_info == version, ack.error_detail.message
        assert not ack.HasField("error_detail")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    server = RawXdsServer()
    port = await server.start()
    store = ConfigStore()
    source = XdsConfigSource(
        f"127.0.0.1:{port}",
        REGISTRY,
        store,
        node=lambda: make_node("engine-1", "edge", REGISTRY, "0.1.0"),
        backoff=Backoff(base=0.05, maximum=0.2),
    )
    task = asyncio.create_task(source.run())
    try:
        first = await server.next_request()
        assert first.type_url == ROUTE_CHAIN_TYPE
        assert first.node.id == "engine-1"
        assert first.node.cluster == "edge"
        assert first.version_info == ""
        assert first.response_nonce == ""
        assert next(
            iter(first.node.metadata.fields["policies"].list_value.values)
        ).string_value == ("addHeader v1.0.0")
        settings = await server.next_request(type_url=SETTINGS_TYPE)  # same stream
        assert settings.version_info == ""
        assert not settings.HasField("node")
        yield Rig(server, store, source, task)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.stop()


async def test_ack_applies_the_update(rig):
    await rig.push_ok("1", {"r": add_header("one")})
    assert rig.header_value() == "one"
    assert rig.store.last_source == "xds"
    await rig.push_ok("2", {"r": add_header("two"), "s": {"policies": []}})
    assert rig.header_value() == "two"
    assert set(rig.store.current.routes) == {"r", "s"}
    # State of the world: a route missing from the response is removed.
    await rig.push_ok("3", {"s": {"policies": []}})
    assert set(rig.store.current.routes) == {"s"}
    assert rig.source.status.acked_version == "3"


async def nack(rig: Rig, resources: list[any_pb2.Any], version: str, **kwargs: Any) -> str:
    before = rig.store.current
    response = await rig.server.push(resources, version=version, **kwargs)
    type_url = kwargs.get("type_url", ROUTE_CHAIN_TYPE)
    reply = await rig.server.next_request(type_url=type_url)
    assert reply.type_url == type_url
    assert reply.response_nonce == response.nonce
    previous = {ROUTE_CHAIN_TYPE: rig.source.status.acked_version}.get(type_url, "")
    assert reply.version_info == previous  # the previous version of that type
    assert reply.version_info != version
    assert reply.error_detail.code == code_pb2.INVALID_ARGUMENT
    assert rig.store.current is before, "a NACKed update must not be applied, even in part"
    return str(reply.error_detail.message)


async def test_invalid_update_is_nacked_naming_route_policy_field(rig):
    await rig.push_ok("1", {"r": add_header("good")})
    message = await nack(
        rig,
        [
            route_any("r", add_header("bad", header="X-Upper")),
            route_any("s", {"policies": [{"name": "addHeader", "version": "v1.0.0"}]}),
            route_any("t", add_header("fine")),
        ],
        "2",
    )
    assert message.splitlines() == [
        "routes[r].policies[0] addHeader v1.0.0: header: 'X-Upper' does not match '^[a-z0-9-]+$'",
        "routes[s].policies[0] addHeader v1.0.0: missing required parameter(s): header, value",
    ]
    assert rig.header_value() == "good"
    assert set(rig.store.current.routes) == {"r"}
    # The next good update is ACKed as usual.
    await rig.push_ok("3", {"r": add_header("better")})
    assert rig.header_value() == "better"
    assert ("NACK", "2") in rig.source.status.history


async def test_missing_version_is_nacked_naming_the_versions_this_engine_has(rig):
    message = await nack(
        rig, [route_any("r", {"policies": [{"name": "addHeader", "version": "v9.0.0"}]})], "1"
    )
    assert message == (
        "routes[r].policies[0] addHeader v9.0.0: policy 'addHeader' version v9.0.0 is not in "
        "this engine (versions available: v1.0.0)"
    )
    assert rig.store.current.routes == {}


def _raw(type_url: str, value: bytes) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=value)


@pytest.mark.parametrize(
    ("resources", "kwargs", "reason"),
    [
        pytest.param(
            [route_any("r", add_header("x"))],
            {"type_url": "type.googleapis.com/envoy.config.cluster.v3.Cluster"},
            "type URL 'type.googleapis.com/envoy.config.cluster.v3.Cluster' was not subscribed",
            id="wrong-response-type-url",
        ),
        pytest.param(
            [_raw("type.googleapis.com/google.protobuf.Struct", b"")],
            {},
            "resources[0]: type URL 'type.googleapis.com/google.protobuf.Struct' is not "
            "type.googleapis.com/policy_engine.v1.RouteChain",
            id="wrong-resource-type-url",
        ),
        pytest.param(
            [_raw(ROUTE_CHAIN_TYPE, b"\x0a\xff\xff\xff\xff")],
            {},
            "resources[0]: cannot decode as policy_engine.v1.RouteChain",
            id="undecodable-any",
        ),
        pytest.param(
            [route_any("r", add_header("x" * (MAX_RESOURCE_BYTES + 10)))],
            {},
            "over the limit of 1048576 bytes per resource",
            id="huge-resource",
        ),
        pytest.param(
            [route_any("r", add_header("a")), route_any("r", add_header("b"))],
            {},
            "resources[1]: route key 'r' appears twice (also resources[0])",
            id="duplicate-route-keys",
        ),
    ],
)
async def test_malformed_input_is_nacked_with_a_clear_reason(rig, resources, kwargs, reason):
    await rig.push_ok("1", {"r": add_header("good")})
    message = await nack(rig, resources, "2", **kwargs)
    assert reason in message
    assert rig.header_value() == "good"
    assert not rig.task.done(), "the client must survive malformed input"
    await rig.push_ok("3", {"r": add_header("after")})
    assert rig.header_value() == "after"


async def test_reconnects_and_resumes_from_the_acked_version(rig):
    await rig.push_ok("7", {"r": add_header("before")})
    rig.server.close_streams()  # the control plane drops the stream
    again = await rig.server.next_request()
    assert again.version_info == "7"
    assert again.response_nonce == ""
    assert rig.header_value() == "before"  # still serving meanwhile
    await rig.push_ok("8", {"r": add_header("after")})
    assert rig.header_value() == "after"
    assert rig.source.status.connects == 2


async def test_control_plane_restart_on_the_same_port():
    server = RawXdsServer()
    port = await server.start()
    store = ConfigStore()
    source = XdsConfigSource(
        f"127.0.0.1:{port}",
        REGISTRY,
        store,
        node=lambda: make_node(None, "edge", REGISTRY, "0.1.0"),
        backoff=Backoff(base=0.05, maximum=0.3),
    )
    task = asyncio.create_task(source.run())
    try:
        await server.next_request()
        await server.push([route_any("r", add_header("one"))], version="1")
        await server.next_request()
        await server.stop()
        await asyncio.sleep(1.0)  # several failed attempts while it is down
        assert store.current.chain_for("r") is not None  # the last good config serves on
        server = RawXdsServer()
        await server.start(port)
        resumed = await server.next_request(timeout=5)
        assert resumed.version_info == "1"
        await server.push([route_any("r", add_header("two"))], version="2")
        assert (await server.next_request()).version_info == "2"
        chain = store.current.chain_for("r")
        assert chain is not None
        assert chain.policies[0].instance.value == "two"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.stop()


def test_backoff_grows_exponentially_with_full_jitter_and_resets():
    top = Backoff(base=0.1, maximum=1.0, rand=lambda: 1.0)
    assert [round(top.next_delay(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    top.reset()
    assert top.next_delay() == pytest.approx(0.1)
    bottom = Backoff(base=0.1, maximum=1.0, rand=lambda: 0.0)
    assert bottom.next_delay() == 0.0


def test_default_node_id_names_host_and_pid():
    import os
    import socket

    node = make_node(None, "edge", REGISTRY, "0.1.0")
    assert node.id == f"{socket.gethostname()}-{os.getpid()}"
    assert node.user_agent_name == "policy-engine"


def settings_any(action: int, status: int = 0) -> any_pb2.Any:
    settings = route_chain_pb2.EngineSettings()
    settings.unknown_route.action = action  # type: ignore[assignment]
    settings.unknown_route.status = status
    packed = any_pb2.Any()
    packed.Pack(settings)
    return packed


async def test_settings_apply_together_with_the_accepted_routes(rig):
    await rig.push_ok("1", {"r": add_header("one")})
    assert rig.store.current.unknown_route is not None  # default: deny
    response = await rig.server.push(
        [settings_any(route_chain_pb2.UnknownRoute.ALLOW)], version="s1", type_url=SETTINGS_TYPE
    )
    ack = await rig.server.next_request(type_url=SETTINGS_TYPE)
    assert (ack.version_info, ack.response_nonce) == ("s1", response.nonce)
    assert not ack.HasField("error_detail")
    assert rig.store.current.unknown_route is None  # allow
    assert rig.header_value() == "one"  # the routes stayed
    # A later routes update keeps the accepted settings.
    await rig.push_ok("2", {"r": add_header("two")})
    assert rig.store.current.unknown_route is None
    assert rig.source.status.settings_version == "s1"


async def test_invalid_settings_are_nacked_and_change_nothing(rig):
    await rig.push_ok("1", {"r": add_header("one")})
    before = rig.store.current
    response = await rig.server.push(
        [settings_any(route_chain_pb2.UnknownRoute.DENY, status=200)],
        version="s1",
        type_url=SETTINGS_TYPE,
    )
    nack = await rig.server.next_request(type_url=SETTINGS_TYPE)
    assert (nack.version_info, nack.response_nonce) == ("", response.nonce)
    assert nack.error_detail.message == (
        "unknownRoute: status: must be an integer in 400-599, got 200"
    )
    assert rig.store.current is before
    two = [settings_any(1), settings_any(2)]
    await rig.server.push(two, version="s2", type_url=SETTINGS_TYPE)
    nack = await rig.server.next_request(type_url=SETTINGS_TYPE)
    assert nack.error_detail.message == (
        "settings: 2 EngineSettings resources; at most one is allowed"
    )
