"""The engine's xDS client against a raw ADS server (engine/xds/client.py).

The raw server validates nothing, so these tests push what a broken xDS server might
and read the engine's ACK / NACK requests back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2
from policy_engine.v1 import route_chain_pb2

from engine.config import load_config
from engine.store import EMPTY_SNAPSHOT, ConfigStore
from engine.xds.client import SUBSCRIBED, Backoff, XdsConfigSource, make_node
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

    async def push_ok(
        self, version: str, routes: dict[str, Any], settings: list[any_pb2.Any] | None = None
    ) -> None:
        """Push one version as the control plane does (settings, then routes, same
        version_info) and check both halves are ACKed."""
        sent = await push_pair(self.server, version, routes, settings)
        for response in sent:
            ack = await self.server.next_request(type_url=response.type_url)
            assert ack.response_nonce == response.nonce
            assert ack.version_info == version, ack.error_detail.message
            assert not ack.HasField("error_detail")


async def push_pair(
    server: RawXdsServer,
    version: str,
    routes: dict[str, Any] | list[any_pb2.Any],
    settings: list[any_pb2.Any] | None = None,
) -> list[Any]:
    """Settings (default: none, i.e. the defaults) then routes, both as ``version``."""
    resources = [route_any(k, v) for k, v in routes.items()] if isinstance(routes, dict) else routes
    first = await server.push(settings or [], version=version, type_url=SETTINGS_TYPE)
    return [first, await server.push(resources, version=version)]


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
    """Push ``resources`` (with valid default settings of the same version unless
    ``type_url`` is given) and check every response of that version is NACKed alike."""
    before = rig.store.current
    previous = rig.source.status.acked_version
    if "type_url" in kwargs:
        sent = [await rig.server.push(resources, version=version, **kwargs)]
    else:
        sent = await push_pair(rig.server, version, resources)
    messages = set()
    for response in sent:
        reply = await rig.server.next_request(type_url=response.type_url)
        assert reply.type_url == response.type_url
        assert reply.response_nonce == response.nonce
        # The previous version of that type (none for a type never subscribed).
        assert reply.version_info == (previous if response.type_url in SUBSCRIBED else "")
        assert reply.version_info != version
        assert reply.error_detail.code == code_pb2.INVALID_ARGUMENT
        messages.add(reply.error_detail.message)
    assert rig.store.current is before, "a NACKed update must not be applied, even in part"
    assert len(messages) == 1, "both halves of a version are rejected with the same reason"
    return str(messages.pop())


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
    served = rig.store.current
    rig.server.close_streams()  # the control plane drops the stream
    again = await rig.server.next_request()
    assert again.version_info == "7"
    assert again.response_nonce == ""
    settings_again = await rig.server.next_request(type_url=SETTINGS_TYPE)
    assert settings_again.version_info == "7"
    assert rig.header_value() == "before"  # still serving meanwhile
    # A control plane re-sends the version the engine runs: ACKed, nothing rebuilt.
    await rig.push_ok("7", {"r": add_header("before")})
    assert rig.store.current is served
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
        await push_pair(server, "1", {"r": add_header("one")})
        await server.next_request()
        await server.stop()
        await asyncio.sleep(1.0)  # several failed attempts while it is down
        assert store.current.chain_for("r") is not None  # the last good config serves on
        server = RawXdsServer()
        await server.start(port)
        resumed = await server.next_request(timeout=5)
        assert resumed.version_info == "1"
        await push_pair(server, "2", {"r": add_header("two")})
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


ALLOW: Final = route_chain_pb2.UnknownRoute.ALLOW


async def until(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Bounded polling of state the client exposes no event for; no timed assertion."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - nothing to wait on but the state
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def allows_unknown(rig: Rig) -> bool:
    """``unknownRoute: allow`` is serving (a function: mypy would narrow the attribute)."""
    return rig.store.current.unknown_route is None


async def test_settings_and_routes_of_one_version_apply_as_one_unit(rig):
    await rig.push_ok("1", {"r": add_header("one")})
    assert not allows_unknown(rig)  # default: deny
    await rig.push_ok("2", {"r": add_header("one")}, [settings_any(ALLOW)])
    assert allows_unknown(rig)
    assert rig.header_value() == "one"
    assert rig.source.status.settings_version == rig.source.status.acked_version == "2"
    # A version without a settings resource means the defaults again.
    await rig.push_ok("3", {"r": add_header("two")})
    assert not allows_unknown(rig)
    assert rig.header_value() == "two"


async def test_settings_alone_publish_nothing(rig):
    """Issue 16.1: on first connect, settings (here unknownRoute: allow) must not go live
    with zero routes; the engine publishes (and turns SERVING) only with both halves."""
    settings = await rig.server.push([settings_any(ALLOW)], version="1", type_url=SETTINGS_TYPE)
    await until(lambda: rig.source.status.responses == 1, "the settings response handled")
    assert rig.store.last_source == "", "settings alone were published"
    assert rig.store.current is EMPTY_SNAPSHOT
    routes = await rig.server.push([route_any("r", add_header("one"))], version="1")
    for response in (settings, routes):  # the pair is ACKed together once complete
        ack = await rig.server.next_request(type_url=response.type_url)
        assert (ack.version_info, ack.response_nonce) == ("1", response.nonce)
        assert not ack.HasField("error_detail")
    assert rig.store.current.unknown_route is None
    assert rig.header_value() == "one"


async def test_first_version_nacked_publishes_nothing_even_with_allow(rig):
    """Routes the engine rejects (here a policy version it lacks) must not leave the
    accepted settings (allow) running with no routes."""
    bad = [route_any("r", {"policies": [{"name": "addHeader", "version": "v9.0.0"}]})]
    sent = await push_pair(rig.server, "1", bad, [settings_any(ALLOW)])
    for response in sent:
        reply = await rig.server.next_request(type_url=response.type_url)
        assert reply.response_nonce == response.nonce
        assert reply.version_info == ""
        assert "version v9.0.0 is not in this engine" in reply.error_detail.message
    assert rig.store.current is EMPTY_SNAPSHOT
    assert rig.source.status.settings_version == ""


async def test_nacked_routes_keep_the_previous_settings_with_them(rig):
    await rig.push_ok("1", {"r": add_header("one")})
    before = rig.store.current
    bad = [route_any("r", add_header("bad", header="X-Upper"))]
    sent = await push_pair(rig.server, "2", bad, [settings_any(ALLOW)])
    for response in sent:
        reply = await rig.server.next_request(type_url=response.type_url)
        assert reply.version_info == "1"
        assert "does not match" in reply.error_detail.message
    assert rig.store.current is before
    assert rig.store.current.unknown_route is not None  # still deny: version 1 whole
    assert rig.source.status.settings_version == "1"


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        pytest.param(
            [settings_any(route_chain_pb2.UnknownRoute.DENY, status=200)],
            "unknownRoute: status: must be an integer in 400-599, got 200",
            id="bad-status",
        ),
        pytest.param(
            [settings_any(1), settings_any(2)],
            "settings: 2 EngineSettings resources; at most one is allowed",
            id="two-resources",
        ),
    ],
)
async def test_invalid_settings_reject_the_whole_version(rig, settings, reason):
    await rig.push_ok("1", {"r": add_header("one")})
    before = rig.store.current
    sent = await push_pair(rig.server, "2", {"r": add_header("two")}, settings)
    for response in sent:  # the routes were fine, yet their version is rejected too
        reply = await rig.server.next_request(type_url=response.type_url)
        assert (reply.version_info, reply.response_nonce) == ("1", response.nonce)
        assert reply.error_detail.message == reason
    assert rig.store.current is before
    assert rig.header_value() == "one"


async def test_a_response_waits_for_its_partner_of_the_same_version(rig, caplog):
    await rig.server.push([settings_any(ALLOW)], version="1", type_url=SETTINGS_TYPE)
    await rig.server.push([route_any("r", add_header("two"))], version="2")
    await until(lambda: rig.source.status.responses == 2, "both responses handled")
    assert rig.store.current is EMPTY_SNAPSHOT  # no pair of one version yet
    settings = await rig.server.push([], version="2", type_url=SETTINGS_TYPE)
    routes_ack = await rig.server.next_request()
    assert routes_ack.version_info == "2"
    settings_ack = await rig.server.next_request(type_url=SETTINGS_TYPE)
    # The superseded settings of version 1 are never answered (nor applied), but said.
    assert (settings_ack.version_info, settings_ack.response_nonce) == ("2", settings.nonce)
    assert (
        "EngineSettings version 1 superseded by version 2 before RouteChain version 1 "
        "arrived: dropped unanswered"
    ) in caplog.text
    assert rig.store.current.unknown_route is not None  # version 2's settings: defaults
    assert rig.header_value() == "two"


async def test_a_warm_start_config_stays_whole_until_a_complete_state(rig):
    warm = load_config({"routes": {"r": add_header("warm")}}, source="warm.yaml", registry=REGISTRY)
    rig.store.publish(warm, "file")
    await rig.server.push([settings_any(ALLOW)], version="1", type_url=SETTINGS_TYPE)
    await until(lambda: rig.source.status.responses == 1, "the settings response handled")
    assert rig.store.current is warm
    await rig.server.push([route_any("r", add_header("xds"))], version="1")
    await until(lambda: rig.store.current is not warm, "the complete state published")
    assert rig.header_value() == "xds"
    assert rig.store.current.unknown_route is None


async def _flap(server: RawXdsServer, streams: int) -> None:
    """Each stream: answer one version, then drop it (a control plane that answers then
    falls over)."""
    for opened in range(1, streams + 1):
        await until(lambda n=opened: server.opened >= n and server.streams, f"stream {opened}")  # type: ignore[misc]
        await server.next_request()
        await server.next_request(type_url=SETTINGS_TYPE)
        sent = await push_pair(server, "1", {"r": add_header("one")})
        for response in sent:
            await server.next_request(type_url=response.type_url)
        server.close_streams()


@pytest.mark.parametrize(
    ("healthy_after", "attempts"),
    [
        pytest.param(None, 4, id="answers-then-drops-keeps-growing"),
        pytest.param(0.0, 1, id="healthy-stream-resets"),
    ],
)
async def test_backoff_resets_only_after_a_healthy_stream(healthy_after, attempts):
    """Issue 16.14: a response alone must not reset the reconnect backoff."""
    server = RawXdsServer()
    port = await server.start()
    kwargs: dict[str, Any] = {} if healthy_after is None else {"healthy_after": healthy_after}
    source = XdsConfigSource(
        f"127.0.0.1:{port}",
        REGISTRY,
        ConfigStore(),
        node=lambda: make_node("flappy", "edge", REGISTRY, "0.1.0"),
        backoff=Backoff(base=0.01, maximum=0.05, rand=lambda: 1.0),
        **kwargs,  # default: HEALTHY_AFTER (10 s), far longer than these streams live
    )
    task = asyncio.create_task(source.run())
    try:
        await _flap(server, 4)
        await until(lambda: server.opened >= 5, "the fifth stream")
        assert source.backoff.attempt == attempts
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.stop()
