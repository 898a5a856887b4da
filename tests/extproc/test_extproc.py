"""engine.transport.grpc_service through a real grpc.aio server and client (no Envoy).

Chains are built directly from small in-file policies, so these tests pin the ext_proc
translation (messages, modes, mutations, stream state machine) independently of config
loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.chain import Chain, ChainPolicy, RequestOutcome, Snapshot
from engine.envoy_metadata import EnvoyMetadata
from engine.policy import (
    ImmediateResponse,
    RequestContext,
    RequestModifications,
    ResponseContext,
    ResponseModifications,
)
from engine.route_names import RouteNamePattern
from engine.store import ConfigStore
from engine.transport import messages as msg
from engine.transport import server
from engine.transport import stream as stream_machine
from engine.transport.grpc_service import PolicyProcessor
from engine.transport.server import serve
from engine.transport.testing import (
    ExtProcClient,
    decode,
    request_body,
    request_headers,
    response_body,
    response_headers,
    serving,
)
from tests.extproc.chains import Deny, Modify, entry, snapshot

# ----------------------------------------------------------------------------- policies


@dataclass
class Seen:
    """What policies observed, in order."""

    requests: list[RequestContext] = field(default_factory=list)
    responses: list[ResponseContext] = field(default_factory=list)
    bodies: list[bytes | None] = field(default_factory=list)


class Recorder:
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    def on_request(self, ctx: RequestContext) -> None:
        self.seen.requests.append(ctx)
        self.seen.bodies.append(ctx.body)


class ResponseRecorder:
    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    def on_response(self, ctx: ResponseContext) -> None:
        self.seen.responses.append(ctx)
        self.seen.bodies.append(ctx.body)


class Upper:
    """Upper-cases the body of whichever phase it runs in."""

    def on_request(self, ctx: RequestContext) -> RequestModifications | None:
        return RequestModifications(body=ctx.body.upper()) if ctx.body is not None else None

    def on_response(self, ctx: ResponseContext) -> ResponseModifications | None:
        return ResponseModifications(body=ctx.body.upper()) if ctx.body is not None else None


class MetaWriter:
    def on_request(self, ctx: RequestContext) -> None:
        ctx.metadata["user"] = "alice"


class Respond:
    def __init__(self, action: ResponseModifications) -> None:
        self.action = action

    def on_response(self, ctx: ResponseContext) -> ResponseModifications:
        return self.action


# ----------------------------------------------------------------------------- fixtures


@dataclass
class Engine:
    target: str
    store: ConfigStore
    processor: PolicyProcessor
    seen: Seen


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    seen = Seen()
    store = ConfigStore(snapshot(public=[entry(Recorder(seen))]))
    processor = PolicyProcessor(store)
    async with serving(store, processor) as target:
        yield Engine(target, store, processor, seen)


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[ExtProcClient]:
    async with ExtProcClient(engine.target) as c:
        yield c


def use(engine: Engine, **routes: list[ChainPolicy]) -> None:
    engine.store.publish(snapshot(**routes), "test")


# ----------------------------------------------------------------------------- request phase


async def test_header_chain_mutates_at_headers_and_ends_stream(engine, client):
    action = RequestModifications(
        set_headers={"x-added": "yes"}, remove_headers=("x-drop",), path="/new", method="POST"
    )
    use(engine, public=[entry(Modify(action)), entry(Recorder(engine.seen))])
    replies = await client.exchange(
        "public", [request_headers("/old", "GET", {"x-drop": "1"}), response_headers(200)]
    )
    assert len(replies) == 1, "no response phase: the server ends the stream after headers"
    reply = decode(replies[0])
    assert reply.kind == "request_headers"
    assert reply.set_headers == {"x-added": "yes", ":path": "/new", ":method": "POST"}
    assert reply.remove_headers == ["x-drop"]
    assert reply.modes == {
        "request_body_mode": "NONE",
        "response_header_mode": "SKIP",
        "response_body_mode": "NONE",
    }
    ctx = engine.seen.requests[0]
    assert (ctx.path, ctx.method, ctx.body) == ("/new", "POST", None)
    assert engine.processor.stats.count("request_headers", "public") == 1


async def test_request_context_is_built_like_the_contract_says(engine, client):
    headers = [
        ("X-Multi", "a"),
        ("x-multi", "b"),
        ("x-request-id", "rid-7"),
        ("x-forwarded-for", "10.0.0.1, 10.0.0.2"),
        ("cookie", "caf\u00e9"),
    ]
    await client.exchange("public", [request_headers("/p?q=1", "PUT", headers)])
    ctx = engine.seen.requests[0]
    assert ctx.path == "/p?q=1"
    assert ctx.method == "PUT"
    assert ctx.route == "public"
    assert ctx.request_id == "rid-7"
    # No source.address attribute: the address is unknown. x-forwarded-for is never read
    # (the engine cannot tell the hops Envoy appended from those the client wrote).
    assert ctx.client_address == ""
    assert ctx.headers["x-multi"] == "a, b"
    assert ctx.headers["cookie"] == "caf\u00e9"
    assert not any(name.startswith(":") for name in ctx.headers)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        pytest.param("127.0.0.1:5555", "127.0.0.1", id="ipv4"),
        pytest.param("[::1]:5555", "::1", id="ipv6"),
    ],
)
async def test_client_address_is_the_source_attribute(engine, client, address, expected):
    # A spoofed x-forwarded-for does not win over what Envoy saw.
    spoofed = [("x-forwarded-for", "6.6.6.6"), ("x-envoy-external-address", "6.6.6.6")]
    await client.exchange(
        "public", [request_headers("/", headers=spoofed, attributes={"source.address": address})]
    )
    assert engine.seen.requests[0].client_address == expected


async def test_route_falls_back_to_route_name_attribute(engine, client):
    replies = await client.exchange(
        None, [request_headers("/", attributes={"xds.route_name": "public"})]
    )
    assert decode(replies[0]).kind == "request_headers"
    assert engine.seen.requests[0].route == "public"


async def test_metadata_key_wins_over_attribute(engine, client):
    use(engine, public=[], other=[entry(Recorder(engine.seen))])
    await client.exchange("other", [request_headers("/", attributes={"xds.route_name": "public"})])
    assert [c.route for c in engine.seen.requests] == ["other"]


async def test_route_name_pattern_derives_the_key_from_the_attribute(engine, client):
    # Envoy Gateway's route naming: the HTTPRoute's namespace/name is the chain key.
    engine.processor.route_names = RouteNamePattern(r"httproute/(?P<key>[^/]+/[^/]+)/rule/.+")
    use(engine, **{"shop/orders": [entry(Recorder(engine.seen))]})
    name = "httproute/shop/orders/rule/0/match/0/shop_example_com"
    await client.exchange(None, [request_headers("/", attributes={"xds.route_name": name})])
    assert [c.route for c in engine.seen.requests] == ["shop/orders"]
    assert engine.processor.stats.count("request_headers", "shop/orders") == 1


async def test_route_name_pattern_never_rewrites_the_metadata_key(engine, client):
    engine.processor.route_names = RouteNamePattern(r"(?P<key>[^.]+)\..+")
    use(engine, **{"a.b": [entry(Recorder(engine.seen))], "a": []})
    await client.exchange("a.b", [request_headers("/", attributes={"xds.route_name": "x.y"})])
    assert [c.route for c in engine.seen.requests] == ["a.b"]


async def test_unknown_route_keys_do_not_grow_the_counters(engine, client):
    # Before: stats.messages kept one counter per route key a peer sent, so a client
    # on the ext_proc port sending a new key per stream grew the engine's memory for good.
    before = len(engine.processor.stats.messages)
    for i in range(50):
        replies = await client.exchange(f"no-such-route-{i}-" + "x" * 1000, [request_headers("/")])
        assert decode(replies[0]).status == 404
    assert len(engine.processor.stats.messages) <= before + 1
    assert engine.processor.stats.count("request_headers") == 50
    assert engine.processor.stats.unknown_routes == 50


@pytest.mark.parametrize(
    "route", [pytest.param("nope", id="unknown"), pytest.param(None, id="missing")]
)
async def test_unknown_route_is_denied_by_default(engine, client, route, caplog):
    # Before: an unknown or missing route key passed through with no policy (fail open).
    replies = await client.exchange(route, [request_headers("/x")])
    reply = decode(replies[0])
    assert (reply.kind, reply.status) == ("immediate_response", 404)
    assert reply.body == b'{"error": "no policy chain for this route"}'
    assert engine.processor.stats.unknown_routes == 1
    assert "no policy chain for route key" in caplog.text
    assert "answering 404" in caplog.text
    assert engine.seen.requests == []


@pytest.mark.parametrize(
    "route", [pytest.param("nope", id="unknown"), pytest.param(None, id="missing")]
)
async def test_unknown_route_passes_through_when_allowed(engine, client, route, caplog):
    engine.store.publish(
        Snapshot(
            routes=MappingProxyType({"public": Chain(route="public")}),
            source="test",
            version=2,
            unknown_route=None,
        ),
        "test",
    )
    replies = await client.exchange(route, [request_headers("/x")])
    reply = decode(replies[0])
    assert reply.kind == "request_headers"
    assert reply.set_headers == {}
    assert reply.modes == {
        "request_body_mode": "NONE",
        "response_header_mode": "SKIP",
        "response_body_mode": "NONE",
    }
    assert engine.processor.stats.unknown_routes == 1
    assert "no policy chain for route key" in caplog.text
    assert engine.seen.requests == []


async def test_immediate_response_ends_stream(engine, client):
    use(engine, public=[entry(Deny()), entry(Recorder(engine.seen))])
    replies = await client.exchange("public", [request_headers("/"), response_headers(200)])
    assert len(replies) == 1
    reply = decode(replies[0])
    assert reply.kind == "immediate_response"
    assert reply.status == 401
    assert reply.body == b"denied"
    assert reply.set_headers == {"www-authenticate": "Bearer"}
    assert engine.seen.requests == []


async def test_body_chain_buffers_then_runs_on_body(engine, client):
    use(
        engine,
        public=[
            entry(Upper(), has_response=False, requires_request_body=True),
            entry(Modify(RequestModifications(set_headers={"x-after-body": "1"}))),
            entry(Recorder(engine.seen)),
        ],
    )
    stream = client.open("public")
    first = decode(await stream.send(request_headers("/", "POST", end_of_stream=False)))
    assert first.kind == "request_headers"
    assert first.set_headers == {}
    assert first.modes == {
        "request_body_mode": "BUFFERED",
        "response_header_mode": "SKIP",
        "response_body_mode": "NONE",
    }
    second = decode(await stream.send(request_body(b"hello")))
    assert second.kind == "request_body"
    assert second.body == b"HELLO"
    assert second.set_headers == {"x-after-body": "1", "content-length": "5"}
    assert await stream.finish() == (grpc.StatusCode.OK, "")
    assert engine.seen.bodies == [b"HELLO"]


async def test_body_chain_without_body_runs_at_headers(engine, client):
    use(engine, public=[entry(Recorder(engine.seen), requires_request_body=True)])
    replies = await client.exchange("public", [request_headers("/", end_of_stream=True)])
    modes = decode(replies[0]).modes
    assert modes is not None
    assert modes["request_body_mode"] == "NONE"
    assert engine.seen.bodies == [None]


async def test_body_set_without_buffering_uses_continue_and_replace(engine, client):
    use(engine, public=[entry(Modify(RequestModifications(body=b"new")))])
    replies = await client.exchange("public", [request_headers("/", "POST", end_of_stream=False)])
    reply = decode(replies[0])
    assert reply.replace
    assert reply.body == b"new"
    assert "content-length" not in reply.set_headers


# ----------------------------------------------------------------------------- response phase


async def test_response_phase_sees_request_as_sent_and_metadata(engine, client):
    rewrite = RequestModifications(set_headers={"x-up": "1"}, path="/rewritten")
    use(
        engine,
        public=[
            entry(Modify(rewrite)),
            entry(MetaWriter()),
            entry(Respond(ResponseModifications(status=418, set_headers={"x-resp": "r"}))),
            entry(ResponseRecorder(engine.seen)),
        ],
    )
    stream = client.open("public")
    first = decode(await stream.send(request_headers("/orig")))
    assert first.modes == {
        "request_body_mode": "NONE",
        "response_header_mode": "SEND",
        "response_body_mode": "NONE",
    }
    second = decode(await stream.send(response_headers(200, {"server": "echo"})))
    assert second.kind == "response_headers"
    assert second.set_headers == {"x-resp": "r", ":status": "418"}
    assert await stream.finish() == (grpc.StatusCode.OK, "")
    response = engine.seen.responses[0]
    assert response.status == 418
    assert response.request.path == "/rewritten"
    assert response.request.headers["x-up"] == "1"
    assert response.metadata == {"user": "alice"}
    assert response.metadata is response.request.metadata


async def test_response_body_chain_buffers_only_the_response(engine, client):
    use(
        engine,
        public=[
            entry(Upper(), has_request=False, requires_response_body=True),
            entry(Respond(ResponseModifications(status=201))),
        ],
    )
    stream = client.open("public")
    first = decode(await stream.send(request_headers("/", "POST", end_of_stream=False)))
    assert first.modes == {
        "request_body_mode": "NONE",
        "response_header_mode": "SEND",
        "response_body_mode": "BUFFERED",
    }
    headers_reply = decode(await stream.send(response_headers(200, end_of_stream=False)))
    assert headers_reply.kind == "response_headers"
    assert headers_reply.set_headers == {}
    body_reply = decode(await stream.send(response_body(b"abc")))
    assert body_reply.kind == "response_body"
    assert body_reply.body == b"ABC"
    assert body_reply.set_headers == {":status": "201", "content-length": "3"}
    assert await stream.finish() == (grpc.StatusCode.OK, "")


async def test_a_response_whose_body_never_comes_is_reported(engine, client, caplog):
    # An upstream answer of headers and trailers without data (a gRPC stream of no
    # messages): Envoy sends response_headers, then neither a body nor the trailers (the
    # mode override skips them), so the response policies never run. Before, the stream
    # ended with nothing logged or counted.
    use(
        engine,
        public=[
            entry(Upper(), has_request=False, requires_response_body=True),
            entry(Respond(ResponseModifications(status=201))),
        ],
    )
    replies = await client.exchange(
        "public",
        [request_headers("/", "GET"), response_headers(200, end_of_stream=False)],
    )
    assert [decode(r).kind for r in replies] == ["request_headers", "response_headers"]
    assert engine.processor.stats.unpoliced_responses == 1
    assert "response policies did not run" in caplog.text
    # A response that got its body is not counted.
    await client.exchange(
        "public",
        [
            request_headers("/", "GET"),
            response_headers(200, end_of_stream=False),
            response_body(b"abc"),
        ],
    )
    assert engine.processor.stats.unpoliced_responses == 1


async def test_snapshot_is_taken_once_per_stream(engine, client):
    """Copy-on-write: a reload between request and response does not change the chain."""
    old = Respond(ResponseModifications(set_headers={"x-version": "old"}))
    new = Respond(ResponseModifications(set_headers={"x-version": "new"}))
    use(engine, public=[entry(old)])
    stream = client.open("public")
    await stream.send(request_headers("/"))
    use(engine, public=[entry(new)])
    reply = decode(await stream.send(response_headers(200)))
    assert reply.set_headers == {"x-version": "old"}
    await stream.finish()
    replies = await client.exchange("public", [request_headers("/"), response_headers(200)])
    assert decode(replies[1]).set_headers == {"x-version": "new"}


# ----------------------------------------------------------------------------- failures


async def test_executor_failure_fails_closed(engine, client, monkeypatch):
    async def broken(chain: Chain, ctx: RequestContext, **_: Any) -> None:
        raise RuntimeError("engine bug")

    monkeypatch.setattr(stream_machine, "run_request", broken)
    replies = await client.exchange("public", [request_headers("/")])
    reply = decode(replies[0])
    assert (reply.kind, reply.status) == ("immediate_response", 500)
    assert engine.processor.stats.policy_failures == 1


EMPTY = external_processor_pb2.ProcessingRequest()


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        pytest.param(
            [response_headers(200)], "response_headers before request_headers", id="response-first"
        ),
        pytest.param([request_body(b"x")], "request_body before request_headers", id="body-first"),
        pytest.param([EMPTY], "no request/response message set", id="no-oneof"),
        pytest.param(
            [request_headers("/", end_of_stream=False), request_headers("/")],
            "second request_headers",
            id="second-request-headers",
        ),
        pytest.param(
            [request_headers("/"), response_body(b"x")],
            "response_body before response_headers",
            id="response-body-first",
        ),
    ],
)
async def test_protocol_errors_abort_only_that_stream(engine, client, messages, problem):
    use(
        engine,
        public=[
            entry(Recorder(engine.seen), requires_request_body=True),
            entry(Respond(ResponseModifications(status=200))),
        ],
    )
    healthy = client.open("public")
    assert await healthy.send(request_headers("/", end_of_stream=False)) is not None

    bad = client.open("public")
    for message in messages[:-1]:
        assert await bad.send(message) is not None
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bad.send(messages[-1])
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert problem in (info.value.details() or "")
    assert engine.processor.stats.protocol_errors == 1

    # The concurrent stream is unaffected.
    reply = decode(await healthy.send(request_body(b"ok")))
    assert reply.kind == "request_body"
    assert decode(await healthy.send(response_headers(204))).kind == "response_headers"
    assert await healthy.finish() == (grpc.StatusCode.OK, "")


# ----------------------------------------------------------------------------- server


async def test_health_reports_serving(engine):
    async with grpc.aio.insecure_channel(engine.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.ext_proc.v3.ExternalProcessor"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_waits_for_first_config():
    store = ConfigStore()
    ports: list[int] = []
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        serve("127.0.0.1:0", store, grace=0.1, ready=ready, stop=stop, on_bound=ports.append)
    )
    try:
        async with asyncio.timeout(5):
            await ready.wait()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            check: Callable[[], Any] = lambda: stub.Check(  # noqa: E731
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
            assert (await check()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            store.publish(snapshot(public=[]), "test")
            await asyncio.sleep(0.05)
            assert (await check()).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task


async def test_health_listener_is_dropped_after_first_config():
    """Only the first publish flips health to SERVING: later reloads must not keep
    spawning (and retaining) one health task each for the server's whole life."""
    calls: list[int] = []

    class CountingStore(ConfigStore):
        def add_listener(self, listener: Callable[[Snapshot], None]) -> Callable[[], None]:
            def counted(snap: Snapshot) -> None:
                calls.append(snap.version)
                listener(snap)

            return super().add_listener(counted)

    store = CountingStore()
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve("127.0.0.1:0", store, grace=0.1, ready=ready, stop=stop))
    try:
        async with asyncio.timeout(5):
            await ready.wait()
        for version in (1, 2, 3):
            store.publish(Snapshot(routes=MappingProxyType({}), version=version), "test")
            await asyncio.sleep(0.01)
        assert calls == [1]
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task


def test_mode_overrides_are_prebuilt():
    """No ProcessingMode is built per request: each combination exists once."""
    mode = msg.Mode
    first = msg.modes(mode.BUFFERED, False, mode.NONE)
    assert msg.modes(mode.BUFFERED, False, mode.NONE) is first
    assert msg.modes(mode.NONE, False, mode.NONE) is not first


def test_serve_workers_stops_started_workers_when_a_fork_fails(monkeypatch):
    """No orphans: workers already forked are stopped and reaped before the error surfaces."""
    forks: list[int | Exception] = [4242, 4343, OSError(11, "Resource temporarily unavailable")]
    killed: list[tuple[int, int]] = []
    reaped: list[int] = []

    def fork() -> int:
        result = forks.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    def waitpid(pid: int, options: int) -> tuple[int, int]:
        reaped.append(pid)
        return pid, 0

    monkeypatch.setattr(os, "fork", fork)
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setattr(os, "waitpid", waitpid)
    with pytest.raises(OSError, match="Resource temporarily unavailable"):
        server.serve_workers(3, lambda: asyncio.sleep(0), grace=0.1)
    assert sorted(killed) == [(4242, signal.SIGTERM), (4343, signal.SIGTERM)]
    assert sorted(reaped) == [4242, 4343]


def test_serve_workers_forwards_a_stop_signal_that_arrives_while_forking(monkeypatch):
    """SIGTERM during the fork loop is held, then forwarded to every worker (none orphaned)."""
    forked = iter([4242, 4343])
    killed: list[tuple[int, int]] = []
    early: list[int] = []
    polls = 0

    def fork() -> int:
        pid = next(forked)
        if pid == 4343:  # a stop request lands between the two forks
            signal.raise_signal(signal.SIGTERM)
        return pid

    def waitpid(pid: int, options: int) -> tuple[int, int]:
        nonlocal polls
        polls += 1
        stopped = {p for p, sig in killed if sig == signal.SIGTERM}
        for candidate in (4242, 4343):
            # A worker exits once told to stop (or, so the test ends, after 20 polls).
            if (candidate in stopped or polls > 20) and candidate not in exited:
                exited.add(candidate)
                return candidate, 0
        return 0, 0

    exited: set[int] = set()
    monkeypatch.setattr(os, "fork", fork)
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setattr(os, "waitpid", waitpid)
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: early.append(sig))
    try:
        code = server.serve_workers(2, lambda: asyncio.sleep(0), grace=0.1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert early == [], "the signal reached the parent before it could forward it"
    assert sorted(killed) == [(4242, signal.SIGTERM), (4343, signal.SIGTERM)]
    assert code == 0


class Held:
    """A response policy that runs until released: a stop request can land while it runs."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = False

    async def on_response(self, ctx: ResponseContext) -> ResponseModifications:
        self.started.set()
        await self.release.wait()
        self.finished = True
        return ResponseModifications(set_headers={"x-held": "done"})


async def stop_during_policy(
    policy: Held, *, release_after: Callable[[], Any]
) -> tuple[grpc.StatusCode, str]:
    """Serve ``policy``, send a stream into it, request the stop while it runs, release it
    once ``release_after()`` returns; return the stream's final status (the reply checked)."""
    store = ConfigStore(snapshot(public=[entry(policy)]))
    ports: list[int] = []
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        serve("127.0.0.1:0", store, grace=5, ready=ready, stop=stop, on_bound=ports.append)
    )
    async with asyncio.timeout(5):
        await ready.wait()
    async with ExtProcClient(f"127.0.0.1:{ports[0]}") as client:
        stream = client.open("public", timeout=10)
        await stream.send(request_headers("/"))
        pending = asyncio.create_task(stream.send(response_headers(200)))
        async with asyncio.timeout(5):
            await policy.started.wait()
        stop.set()
        await release_after()
        policy.release.set()
        reply = decode(await pending)
        assert reply.set_headers == {"x-held": "done"}
        status = await stream.finish()
    async with asyncio.timeout(10):
        await task
    return status


async def test_stop_drains_in_flight_stream():
    """Graceful stop: a stream whose policy is still running when stop is requested completes,
    with status OK (it flaked UNAVAILABLE "broken pipe", see the next test)."""
    policy = Held()
    assert await stop_during_policy(policy, release_after=lambda: asyncio.sleep(0.2)) == (
        grpc.StatusCode.OK,
        "",
    )


async def test_stop_closes_connections_only_after_the_in_flight_streams(monkeypatch):
    """Regression (issue 16, item 15): ``server.stop`` (GOAWAY) ran while a stream was in
    flight. gRPC core then closes the connection the moment that stream's OK status is
    written; the client's frames sent meanwhile are unread, the kernel resets the
    connection, and the client, failing its next write, dropped the status it had already
    received: UNAVAILABLE "broken pipe" in about 1 run in 10. Now the stop sequence calls
    ``server.stop`` only once no stream is in flight. Checked deterministically: the policy
    is released only once ``server.stop`` was called (or 0.5 s after the stop request, if
    the stop sequence rightly waits for it), and ``server.stop`` must find it finished."""
    policy = Held()
    finished_at_stop: list[bool] = []
    stop_called = asyncio.Event()
    make_server = grpc.aio.server

    def recording_server(*args: Any, **kwargs: Any) -> grpc.aio.Server:
        grpc_server = make_server(*args, **kwargs)
        stop_server = grpc_server.stop

        async def stop(grace: float | None) -> None:
            finished_at_stop.append(policy.finished)
            stop_called.set()
            await stop_server(grace)

        monkeypatch.setattr(grpc_server, "stop", stop)
        return grpc_server

    async def until_stop_called() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_called.wait(), 0.5)

    monkeypatch.setattr(grpc.aio, "server", recording_server)
    status = await stop_during_policy(policy, release_after=until_stop_called)
    assert finished_at_stop == [True], "server.stop ran while the stream was still in flight"
    assert status == (grpc.StatusCode.OK, "")


async def test_drain_reports_not_serving_and_keeps_serving():
    """Before: NOT_SERVING and server.stop happened together; now new streams still work
    during the drain, and a second stop request ends the drain early."""
    store = ConfigStore(snapshot(public=[]))
    ports: list[int] = []
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        serve("127.0.0.1:0", store, drain=30, ready=ready, stop=stop, on_bound=ports.append)
    )
    async with asyncio.timeout(5):
        await ready.wait()
    target = f"127.0.0.1:{ports[0]}"
    async with ExtProcClient(target) as client, grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stop.set()
        async with asyncio.timeout(5):
            while True:
                status = await health.Check(health_pb2.HealthCheckRequest(service=""))
                if status.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.01)
        replies = await client.exchange("public", [request_headers("/")])
        assert decode(replies[0]).kind == "request_headers"
        assert not task.done()
    stop.set()  # the second request: stop now, not after 30 s
    async with asyncio.timeout(5):
        await task


@pytest.mark.parametrize(
    "action",
    [
        pytest.param(RequestModifications(set_headers={"x-sub": "a\ud800"}), id="lone-surrogate"),
        pytest.param(RequestModifications(set_headers={"x-sub": "a\r\nx-admin: 1"}), id="crlf"),
        pytest.param(RequestModifications(set_headers={"x-sub": "a\x00"}), id="nul"),
        pytest.param(RequestModifications(set_headers={"x sub": "a"}), id="bad-name"),
        pytest.param(RequestModifications(remove_headers=("x:sub",)), id="bad-remove-name"),
        pytest.param(RequestModifications(path="/a\ud800"), id="path"),
        pytest.param(RequestModifications(append_headers={"x-sub": "\udfff"}), id="append"),
    ],
)
async def test_unencodable_policy_output_is_that_policys_failure(engine, client, action):
    # Before: the surrogate raised UnicodeEncodeError out of Process (reply building was
    # outside the guard); CR/LF went to Envoy, which rejects the whole mutation.
    use(engine, public=[entry(Modify(action), error_status=503)])
    replies = await client.exchange("public", [request_headers("/", headers={"x-sub": "spoof"})])
    reply = decode(replies[0])
    assert (reply.kind, reply.status) == ("immediate_response", 503)
    assert reply.body == b'{"error": "policy Modify v1.0.0 failed"}'


async def test_reply_building_is_inside_the_guard(engine, client, monkeypatch):
    # An outcome the executor let through but that cannot become a message (an engine bug)
    # still fails closed with a 500 instead of ending the stream with an error.
    async def unencodable(chain: Chain, ctx: RequestContext, **_: Any) -> RequestOutcome:
        return RequestOutcome(set_headers={"x-sub": "\ud800"})

    monkeypatch.setattr(stream_machine, "run_request", unencodable)
    replies = await client.exchange("public", [request_headers("/")])
    reply = decode(replies[0])
    assert (reply.kind, reply.status) == ("immediate_response", 500)
    assert engine.processor.stats.policy_failures == 1


# ----------------------------------------------------------------------------- header prefix


class BodyReader:
    """Needs the body (declare requires_request_body=True); records what it saw."""

    def __init__(self, seen: Seen) -> None:
        self.seen = seen

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        self.seen.bodies.append(ctx.body)
        return RequestModifications(set_headers={"x-body-len": str(len(ctx.body or b""))})


def prefix_chain(engine: Engine, *, error_status: int = 500) -> list[ChainPolicy]:
    return [
        entry(Modify(RequestModifications(set_headers={"x-head": "1"}))),
        entry(Recorder(engine.seen)),
        entry(BodyReader(engine.seen), requires_request_body=True, error_status=error_status),
        entry(Modify(RequestModifications(set_headers={"x-after": "1"}))),
    ]


async def test_header_only_prefix_runs_at_request_headers(engine, client):
    # Before: every request policy waited for the body, so nothing ran at the headers.
    use(engine, public=prefix_chain(engine))
    stream = client.open("public")
    head = decode(await stream.send(request_headers("/", "POST", end_of_stream=False)))
    assert head.kind == "request_headers"
    assert head.set_headers == {"x-head": "1"}
    assert head.modes is not None
    assert head.modes["request_body_mode"] == "BUFFERED"
    assert len(engine.seen.requests) == 1  # the recorder ran before any body
    body = decode(await stream.send(request_body(b"hello")))
    assert body.kind == "request_body"
    assert body.set_headers == {"x-body-len": "5", "x-after": "1"}
    assert engine.seen.bodies == [None, b"hello"]
    await stream.finish()


async def test_header_only_prefix_can_reject_before_the_body(engine, client):
    use(
        engine,
        public=[entry(Deny()), entry(BodyReader(engine.seen), requires_request_body=True)],
    )
    replies = await client.exchange("public", [request_headers("/", end_of_stream=False)])
    reply = decode(replies[0])
    assert (reply.kind, reply.status) == ("immediate_response", 401)
    assert engine.seen.bodies == []


@pytest.mark.parametrize(
    "instead",
    [
        pytest.param(response_headers(200), id="response-headers"),
        pytest.param(
            external_processor_pb2.ProcessingRequest(
                request_trailers=external_processor_pb2.HttpTrailers()
            ),
            id="request-trailers",
        ),
    ],
)
async def test_body_that_never_comes_fails_closed(engine, client, instead):
    # Before: response_headers aborted the stream (INVALID_ARGUMENT: with failure_mode_allow
    # Envoy passes), and request_trailers was answered "continue": the request went on with
    # its body policies never run.
    use(engine, public=prefix_chain(engine, error_status=503))
    replies = await client.exchange("public", [request_headers("/", end_of_stream=False), instead])
    reply = decode(replies[1])
    assert (reply.kind, reply.status) == ("immediate_response", 503)
    assert reply.body == b'{"error": "policy BodyReader v1.0.0 failed"}'
    assert engine.processor.stats.missing_bodies == 1


async def test_header_policy_replacing_the_body_runs_the_rest_at_once(engine, client):
    use(
        engine,
        public=[
            entry(Modify(RequestModifications(body=b"replaced"))),
            entry(BodyReader(engine.seen), requires_request_body=True),
        ],
    )
    replies = await client.exchange("public", [request_headers("/", "POST", end_of_stream=False)])
    reply = decode(replies[0])
    assert reply.kind == "request_headers"
    assert reply.replace
    assert reply.body == b"replaced"
    assert reply.set_headers == {"x-body-len": "8"}
    assert engine.seen.bodies == [b"replaced"]


def with_protocol(message: Any, request_mode: str, response_mode: str = "NONE") -> Any:
    mode = msg.Mode
    message.protocol_config.request_body_mode = mode.BodySendMode.Value(request_mode)
    message.protocol_config.response_body_mode = mode.BodySendMode.Value(response_mode)
    return message


async def test_streamed_chunks_are_held_until_the_last(engine, client):
    # Before: the first chunk was taken for the whole body.
    use(engine, public=[entry(Recorder(engine.seen), requires_request_body=True)])
    stream = client.open("public")
    head = decode(
        await stream.send(
            with_protocol(request_headers("/", "POST", end_of_stream=False), "STREAMED")
        )
    )
    assert head.modes is not None
    assert head.modes["request_body_mode"] == "STREAMED"  # pinned: known whatever Envoy does
    first = await stream.send(request_body(b"hel", end_of_stream=False))
    assert first.request_body.response.body_mutation.clear_body
    last = decode(await stream.send(request_body(b"lo", end_of_stream=True)))
    assert last.body == b"hello"  # the whole body travels with the last chunk
    assert engine.seen.bodies == [b"hello"]
    await stream.finish()


async def test_buffered_partial_cut_short_is_refused(engine, client):
    use(engine, public=[entry(BodyReader(engine.seen), requires_request_body=True)])
    messages = [
        with_protocol(request_headers("/", "POST", end_of_stream=False), "BUFFERED_PARTIAL"),
        request_body(b"prefix only", end_of_stream=False),
    ]
    replies = await client.exchange("public", messages)
    assert (decode(replies[1]).kind, decode(replies[1]).status) == ("immediate_response", 413)
    assert engine.seen.bodies == []


async def test_full_duplex_body_mode_is_refused(engine, client):
    use(engine, public=[entry(BodyReader(engine.seen), requires_request_body=True)])
    message = with_protocol(
        request_headers("/", "POST", end_of_stream=False), "FULL_DUPLEX_STREAMED"
    )
    replies = await client.exchange("public", [message])
    assert (decode(replies[0]).kind, decode(replies[0]).status) == ("immediate_response", 500)


async def test_bodies_over_the_limit_are_refused(engine, client):
    engine.processor.max_body_bytes = 8
    use(
        engine,
        public=[
            entry(Recorder(engine.seen), requires_request_body=True),
            entry(ResponseRecorder(engine.seen), requires_response_body=True),
        ],
    )
    head = request_headers("/", "POST", end_of_stream=False)
    replies = await client.exchange("public", [head, request_body(b"123456789")])
    big = decode(replies[1])
    assert (big.kind, big.status) == ("immediate_response", 413)
    assert big.body == b'{"error": "request body too large for the policy engine"}'
    streamed = with_protocol(request_headers("/", "POST", end_of_stream=False), "STREAMED")
    chunks = [request_body(b"12345", end_of_stream=False), request_body(b"6789")]
    replies = await client.exchange("public", [streamed, *chunks])
    assert decode(replies[2]).status == 413
    replies = await client.exchange(
        "public",
        [
            head,
            request_body(b"ok"),
            response_headers(200, end_of_stream=False),
            response_body(b"x" * 9),
        ],
    )
    assert (decode(replies[3]).kind, decode(replies[3]).status) == ("immediate_response", 500)
    assert engine.seen.bodies == [b"ok"]
    assert engine.processor.stats.too_large == 3


# ----------------------------------------------------------------------------- static chains


class Static:
    """Declares its actions static: the engine must never call its hooks."""

    def __init__(
        self,
        request: RequestModifications | ImmediateResponse | None = None,
        response: ResponseModifications | None = None,
    ) -> None:
        self.request, self.response = request, response

    def static_request(self) -> RequestModifications | ImmediateResponse | None:
        return self.request

    def static_response(self) -> ResponseModifications | None:
        return self.response

    def on_request(self, ctx: RequestContext) -> None:
        raise AssertionError("a static policy's hook was called")

    def on_response(self, ctx: ResponseContext) -> None:
        raise AssertionError("a static policy's hook was called")


def static_entry(policy: Static, **flags: Any) -> ChainPolicy:
    return entry(
        policy,
        has_request=policy.request is not None,
        has_response=policy.response is not None,
        static_request=policy.request,
        static_response=policy.response,
        **flags,
    )


def options(reply: Any, phase: str) -> list[tuple[str, str, bool]]:
    mutation = getattr(reply, phase).response.header_mutation
    return [
        (o.header.key, o.header.raw_value.decode(), o.append.value) for o in mutation.set_headers
    ]


async def test_a_static_chain_is_answered_with_its_net_change_without_calling_hooks(engine, client):
    first = Static(
        RequestModifications(set_headers={"x-a": "1", "x-gone": "v"}, append_headers={"x-b": "2"}),
        ResponseModifications(set_headers={"x-served": "engine"}),
    )
    second = Static(
        RequestModifications(
            remove_headers=("x-gone", "x-client"), append_headers={"x-a": "3"}, path="/static"
        )
    )
    use(engine, public=[static_entry(first), static_entry(second)])
    chain = engine.store.current.chain_for("public")
    assert chain.fully_static
    for _ in range(2):  # the second request gets the same, shared replies
        replies = await client.exchange(
            "public",
            [request_headers("/", headers={"x-client": "c", "x-b": "0"}), response_headers(200)],
        )
        assert len(replies) == 2
        assert options(replies[0], "request_headers") == [
            ("x-a", "1", False),
            (":path", "/static", False),
            ("x-a", "3", True),
            ("x-b", "2", True),
        ]
        assert sorted(decode(replies[0]).remove_headers) == ["x-client", "x-gone"]
        assert (decode(replies[0]).modes or {}).get("response_header_mode") == "SEND"
        assert options(replies[1], "response_headers") == [("x-served", "engine", False)]


async def test_a_static_phase_beside_a_dynamic_one_runs_in_order(engine, client):
    # The dynamic policy between two static ones sees the first one's change.
    first = Static(RequestModifications(set_headers={"x-step": "1"}))
    last = Static(response=ResponseModifications(set_headers={"x-served": "engine"}))
    use(
        engine,
        public=[static_entry(first), entry(Recorder(engine.seen)), static_entry(last)],
    )
    chain = engine.store.current.chain_for("public")
    assert chain.static_request_outcome is None
    assert chain.static_response_outcome is not None
    replies = await client.exchange(
        "public", [request_headers("/", headers={"x-step": "0"}), response_headers(200)]
    )
    assert engine.seen.requests[0].headers["x-step"] == "1"
    assert decode(replies[0]).set_headers == {"x-step": "1"}
    assert options(replies[1], "response_headers") == [("x-served", "engine", False)]


async def test_a_static_immediate_response_short_circuits(engine, client):
    deny = Static(ImmediateResponse(403, {"content-type": "text/plain"}, b"no"))
    use(engine, public=[static_entry(deny), entry(Recorder(engine.seen))])
    replies = await client.exchange("public", [request_headers("/")])
    assert (decode(replies[0]).status, decode(replies[0]).body) == (403, b"no")
    assert engine.seen.requests == []


class UserFromHeader:
    def on_request(self, ctx: RequestContext) -> None:
        if "x-user" in ctx.headers:
            ctx.metadata["user"] = ctx.headers["x-user"]


async def test_one_requests_metadata_never_lands_in_a_shared_reply(engine, client):
    # Regression: EnvoyMetadata.attach wrote into the reply in place, and some replies are
    # shared (the 500 reply; now also static-phase replies): a later request's reply then
    # carried an earlier request's metadata (here: another user's name in Envoy's log).
    engine.processor.envoy_metadata = EnvoyMetadata(keys=("user",))
    served = Static(response=ResponseModifications(set_headers={"x-served": "engine"}))
    use(engine, public=[entry(UserFromHeader()), static_entry(served)])

    async def metadata(headers: dict[str, str]) -> dict[str, Any]:
        replies = await client.exchange(
            "public", [request_headers("/", headers=headers), response_headers(200)]
        )
        return MessageToDict(replies[-1].dynamic_metadata)

    assert await metadata({"x-user": "alice"}) == {"policy_engine": {"user": "alice"}}
    assert await metadata({}) == {}
    # The 500 reply built once at import (a policy's body over the limit gets it).
    engine.processor.max_body_bytes = 4
    use(
        engine,
        public=[
            entry(UserFromHeader()),
            entry(Modify(RequestModifications(body=b"too long"))),
        ],
    )
    replies = await client.exchange("public", [request_headers("/", headers={"x-user": "bob"})])
    assert decode(replies[0]).status == 500
    assert MessageToDict(replies[0].dynamic_metadata) == {"policy_engine": {"user": "bob"}}
    assert not msg.INTERNAL_ERROR_REPLY.HasField("dynamic_metadata")
