"""engine.transport.http_service: JSON ProcessingRequest <-> the ext_proc stream machine (no Envoy).

Messages are built with engine.transport.testing and turned into the proto3 JSON Envoy sends
(proto field names, base64 ``raw_value``); replies are parsed back with protobuf's own JSON
parser, which proves they are valid proto3 JSON. The same scenarios run through a real Envoy
in tests/e2e/test_http_transport.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format

from engine import metrics
from engine.config import load_config
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
from engine.transport.grpc_service import PolicyProcessor
from engine.transport.http_server import start_http_server
from engine.transport.http_service import STATE_NAMESPACE, HttpExtProc
from engine.transport.testing import decode, request_headers, response_headers
from tests.extproc.chains import Deny, Modify, entry, snapshot
from tests.support import registry_from


class MetaWriter:
    def on_request(self, ctx: RequestContext) -> None:
        ctx.metadata["user"] = "alice"


class Respond:
    def __init__(self, action: ResponseModifications) -> None:
        self.action = action

    def on_response(self, ctx: ResponseContext) -> ResponseModifications:
        return self.action


class Upper:
    def __init__(self) -> None:
        self.calls = 0

    def on_request(self, ctx: RequestContext) -> None:
        self.calls += 1

    def on_response(self, ctx: ResponseContext) -> None:
        self.calls += 1


class Remember:
    """Response policy recording what it sees of the request and the metadata."""

    def __init__(self) -> None:
        self.seen: list[ResponseContext] = []

    def on_response(self, ctx: ResponseContext) -> ResponseModifications:
        self.seen.append(ctx)
        return ResponseModifications(set_headers={"x-user": str(ctx.metadata.get("user"))})


def as_json(message: Any, *, state: dict[str, Any] | None = None) -> bytes:
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    if state is not None:
        data["metadata_context"] = {"filter_metadata": {STATE_NAMESPACE: state}}
    return json.dumps(data).encode()


def parsed(body: bytes) -> Any:
    return json_format.Parse(body, pb.ProcessingResponse())


def route(name: str) -> dict[str, str]:
    return {"xds.route_name": name, "source.address": "10.0.0.7:5555"}


async def call(handler: HttpExtProc, body: bytes) -> tuple[int, bytes]:
    """As the HTTP server uses the handler: an answer at once, or an awaitable it runs in a
    task of its own."""
    result = handler("/", body)
    if isinstance(result, tuple):
        return result
    return await asyncio.create_task(result)


async def post(handler: HttpExtProc, body: bytes) -> tuple[int, Any, dict[str, Any]]:
    status, reply = await call(handler, body)
    return status, (parsed(reply) if status == 200 else None), json.loads(reply)


def make(**routes: Any) -> tuple[HttpExtProc, PolicyProcessor]:
    processor = PolicyProcessor(ConfigStore(snapshot(**routes)))
    return HttpExtProc(processor), processor


async def test_request_header_mutation_and_no_response_phase():
    action = RequestModifications(set_headers={"x-added": "yes"}, remove_headers=("x-drop",))
    handler, _ = make(public=[entry(Modify(action))])
    message = request_headers("/p", "GET", {"x-drop": "1"}, attributes=route("public"))
    status, reply, raw = await post(handler, as_json(message))
    assert status == 200
    got = decode(reply)
    assert got.kind == "request_headers"
    assert got.set_headers == {"x-added": "yes"}
    assert got.remove_headers == ["x-drop"]
    assert got.modes is not None
    assert got.modes["response_header_mode"] == "SKIP"
    assert "dynamic_metadata" not in raw, "no response phase: no state to carry"


async def test_state_carries_metadata_and_request_to_the_response_phase():
    remember = Remember()
    rewrite = RequestModifications(set_headers={"x-up": "1"}, path="/rewritten")
    handler, _ = make(public=[entry(MetaWriter()), entry(Modify(rewrite)), entry(remember)])
    message = request_headers(
        "/p", "GET", {"authorization": "Bearer secret", "x-in": "a"}, attributes=route("public")
    )
    status, reply, raw = await post(handler, as_json(message))
    assert status == 200
    assert (decode(reply).modes or {})["response_header_mode"] == "SEND"
    state = raw["dynamic_metadata"][STATE_NAMESPACE]
    assert b"secret" not in base64.b64decode(state["s"]), "credentials never in metadata"
    status, reply, _ = await post(handler, as_json(response_headers(200), state=state))
    assert status == 200
    got = decode(reply)
    assert got.kind == "response_headers"
    assert got.set_headers == {"x-user": "alice"}
    (ctx,) = remember.seen
    assert ctx.request.path == "/rewritten"
    assert ctx.request.headers["x-up"] == "1"
    assert ctx.request.headers["x-in"] == "a"
    assert "authorization" not in ctx.request.headers
    assert ctx.request.client_address == "10.0.0.7"
    assert ctx.status == 200


async def test_response_status_and_envoy_metadata_like_grpc():
    handler, processor = make(
        public=[entry(MetaWriter()), entry(Respond(ResponseModifications(status=418)))]
    )
    processor.envoy_metadata = EnvoyMetadata(keys=("user",))
    _, _, raw = await post(handler, as_json(request_headers(attributes=route("public"))))
    assert raw["dynamic_metadata"]["policy_engine"] == {"user": "alice"}
    state = raw["dynamic_metadata"][STATE_NAMESPACE]
    status, reply, raw = await post(handler, as_json(response_headers(200), state=state))
    assert status == 200
    assert decode(reply).set_headers == {":status": "418"}
    assert raw["dynamic_metadata"]["policy_engine"] == {"user": "alice"}


async def test_immediate_response():
    handler, _ = make(public=[entry(Deny())])
    status, reply, _ = await post(handler, as_json(request_headers(attributes=route("public"))))
    assert status == 200
    got = decode(reply)
    assert got.kind == "immediate_response"
    assert got.status == 401
    assert got.body == b"denied"
    assert got.set_headers == {"www-authenticate": "Bearer"}


async def test_unknown_route_is_denied():
    handler, _ = make(public=[])
    status, reply, _ = await post(handler, as_json(request_headers(attributes=route("nope"))))
    assert status == 200
    assert decode(reply).status == 404


@pytest.mark.parametrize("flag", ["requires_request_body", "requires_response_body"])
async def test_route_needing_bodies_is_refused_never_skipped(flag, caplog, tmp_path):
    upper = Upper()
    handler, _ = make(body=[entry(upper, **{flag: True})])
    metrics.enable(str(tmp_path))
    status, reply, _ = await post(handler, as_json(request_headers(attributes=route("body"))))
    assert status == 200
    got = decode(reply)
    assert (got.kind, got.status) == ("immediate_response", 500)
    assert handler.processor.stats.body_refusals == 1
    assert "route 'body'" in caplog.text
    try:
        exposition = metrics.render().decode()
    finally:
        metrics.disable()
    assert 'policy_engine_http_body_refusals_total{route="(unknown)"} 1.0' in exposition
    assert upper.calls == 0


@pytest.mark.parametrize(
    ("state", "why"),
    [
        (None, "no policy_engine.http_state metadata"),
        ({"s": "not base64!"}, "malformed"),
        ({"s": base64.b64encode(b"\xc1").decode()}, "malformed"),
        ({"s": base64.b64encode(b"\x80").decode()}, "malformed"),
    ],
    ids=["missing", "not-base64", "not-msgpack", "wrong-shape"],
)
async def test_response_phase_without_valid_state_fails_closed(state, why, caplog):
    handler, _ = make(public=[entry(Remember())])
    status, reply, _ = await post(handler, as_json(response_headers(200), state=state))
    assert status == 200
    assert decode(reply).status == 500
    assert handler.processor.stats.state_failures == 1
    assert why in caplog.text


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"request_headers": 5}', b"{}", b'{"request_body": {"body": "YQ=="}}'],
    ids=["syntax", "wrong-type", "empty", "body-message"],
)
async def test_malformed_messages_are_protocol_errors(body):
    handler, processor = make(public=[])
    status, reply = await call(handler, body)
    assert status == 400
    assert "error" in json.loads(reply)
    assert processor.stats.protocol_errors == 1


@pytest.mark.parametrize("mode", ["SOMETIMES", "buffered", ""])
async def test_an_unknown_body_mode_is_a_protocol_error(mode):
    """protocol_config's modes are checked on the first message even where the chain never
    reads them (a static chain's request phase)."""
    handler, processor = make(public=[entry(Modify(RequestModifications(set_headers={"x": "1"})))])
    message = json.loads(as_json(request_headers(attributes=route("public"))))
    message["protocol_config"] = {"request_body_mode": mode}
    status, reply = await call(handler, json.dumps(message).encode())
    assert status == 400
    assert "unknown body mode" in json.loads(reply)["error"]
    assert processor.stats.protocol_errors == 1


async def test_static_replies_are_encoded_once_and_never_shared_with_state():
    handler, _ = make(public=[entry(Modify(RequestModifications(set_headers={"x": "1"})))])
    first = await call(handler, as_json(request_headers(attributes=route("public"))))
    second = await call(handler, as_json(request_headers(attributes=route("public"))))
    assert first == second


class Reader:
    """A request policy reading the client address and headers (sees what gRPC sees)."""

    def __init__(self) -> None:
        self.seen: list[RequestContext] = []

    def on_request(self, ctx: RequestContext) -> ImmediateResponse | None:
        self.seen.append(ctx)
        return None


async def test_request_context_matches_grpc():
    reader = Reader()
    handler, _ = make(public=[entry(reader)])
    message = request_headers(
        "/a?b=1", "PUT", [("x-r", "1"), ("x-r", "2")], attributes=route("public")
    )
    await call(handler, as_json(message))
    (ctx,) = reader.seen
    assert (ctx.path, ctx.method, ctx.route) == ("/a?b=1", "PUT", "public")
    assert ctx.headers.get_all("x-r") == ["1", "2"]
    assert ctx.client_address == "10.0.0.7"


async def test_generated_route_names_map_to_keys_as_over_grpc():
    """--route-name-pattern (Envoy Gateway, Istio) applies over HTTP too, body check included."""
    handler, processor = make(body=[entry(Upper(), requires_request_body=True)])
    processor.route_names = RouteNamePattern(r"httproute/default/(?P<key>[^/]+)/rule/0")
    generated = "httproute/default/body/rule/0"
    status, reply, _ = await post(handler, as_json(request_headers(attributes=route(generated))))
    assert (status, decode(reply).status) == (200, 500)
    assert handler.processor.stats.body_refusals == 1


class Static:
    """A policy with the same action for every request and response (static phases)."""

    REQUEST = RequestModifications(set_headers={"x-static": "1"})
    RESPONSE = ResponseModifications(set_headers={"x-served": "1"})

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        return self.REQUEST

    def on_response(self, ctx: ResponseContext) -> ResponseModifications:
        return self.RESPONSE


def static_entry(request: RequestModifications = Static.REQUEST) -> Any:
    return entry(Static(), static_request=request, static_response=Static.RESPONSE)


async def test_static_phases_answer_and_count_alike_from_their_kept_answers(tmp_path):
    """The first request of a static route goes through the stream machine; later ones are
    answered from the encoded answer it kept (http_service._static_answer): same bytes,
    same counters and metrics as the machine's."""
    handler, processor = make(public=[static_entry()])
    metrics.enable(str(tmp_path))
    try:
        first = [await call(handler, as_json(request_headers(attributes=route("public"))))]
        state = json.loads(first[0][1])["dynamic_metadata"][STATE_NAMESPACE]
        second = [await call(handler, as_json(response_headers(200), state=state))]
        for _ in range(2):
            first.append(await call(handler, as_json(request_headers(attributes=route("public")))))
            second.append(await call(handler, as_json(response_headers(200), state=state)))
        exposition = metrics.render().decode()
    finally:
        metrics.disable()
    assert first[0][0] == second[0][0] == 200
    assert first[1:] == [first[0]] * 2
    assert second[1:] == [second[0]] * 2
    assert decode(parsed(first[0][1])).set_headers == {"x-static": "1"}
    assert decode(parsed(second[0][1])).set_headers == {"x-served": "1"}
    stats = processor.stats
    assert stats.streams == 3
    assert stats.messages[("public", "request_headers")] == 3
    assert stats.messages[("public", "response_headers")] == 3
    counts = {
        line.partition("{")[0]: line.rpartition(" ")[2]
        for line in exposition.splitlines()
        if line.startswith(
            (
                "policy_engine_streams_total{",
                "policy_engine_requests_total{",
                "policy_engine_policy_duration_seconds_count{",
            )
        )
    }
    assert counts == {
        "policy_engine_streams_total": "3.0",
        "policy_engine_requests_total": "3.0",
        "policy_engine_policy_duration_seconds_count": "6.0",  # 3 requests x 2 phases
    }


async def test_a_new_configuration_is_not_answered_from_the_old_ones_kept_answers():
    handler, processor = make(public=[static_entry()])
    for _ in range(2):
        await call(handler, as_json(request_headers(attributes=route("public"))))
    changed = RequestModifications(set_headers={"x-static": "2"})
    processor.store.publish(snapshot(public=[static_entry(changed)]), "test")
    _, reply, _ = await post(handler, as_json(request_headers(attributes=route("public"))))
    assert decode(reply).set_headers == {"x-static": "2"}
    processor.store.publish(snapshot(other=[static_entry()]), "test")
    _, reply, _ = await post(handler, as_json(request_headers(attributes=route("public"))))
    assert decode(reply).status == 404, "the route is gone: unknownRoute, not a kept answer"


async def test_an_unknown_body_mode_is_a_protocol_error_on_a_kept_answer_too():
    handler, processor = make(public=[static_entry()])
    await call(handler, as_json(request_headers(attributes=route("public"))))
    message = json.loads(as_json(request_headers(attributes=route("public"))))
    message["protocol_config"] = {"response_body_mode": "SOMETIMES"}
    status, reply = await call(handler, json.dumps(message).encode())
    assert status == 400
    assert "unknown body mode" in json.loads(reply)["error"]
    assert processor.stats.protocol_errors == 1


async def test_secret_parameters_never_travel_in_the_carried_state():
    """A header or query holding a secret parameter's value (apiKey's key with stripKey:
    false) is kept out of the state the response phase gets back, like credential headers:
    dynamic metadata can end up in access logs."""
    token = "tok-3f9a1c77e2"
    document = {
        "routes": {
            "public": {
                "policies": [
                    {"name": "secretToken", "version": "v1.0.0", "parameters": {"token": token}},
                    {"name": "statusSetter", "version": "v1.0.0", "parameters": {"status": 203}},
                ]
            }
        }
    }
    registry = registry_from("secretToken", "statusSetter")
    processor = PolicyProcessor(ConfigStore(load_config(document, source="t", registry=registry)))
    handler = HttpExtProc(processor)
    message = request_headers(
        f"/p?key={token}&x=1",
        "GET",
        {"x-token": token, "x-token-quoted": f"Token {token}", "x-in": "a"},
        attributes=route("public"),
    )
    status, _, raw = await post(handler, as_json(message))
    assert status == 200
    state = raw["dynamic_metadata"][STATE_NAMESPACE]
    assert token.encode() not in base64.b64decode(state["s"])
    remember = Remember()
    processor.store.publish(snapshot(public=[entry(remember)]), "test")
    status, _, _ = await post(handler, as_json(response_headers(200), state=state))
    assert status == 200
    (ctx,) = remember.seen
    assert dict(ctx.request.headers) == {"x-in": "a"}
    assert ctx.request.path == "/p?key=<redacted>&x=1"


class Waits:
    """An async request policy that suspends, inside asyncio.timeout as policies may."""

    async def on_request(self, ctx: RequestContext) -> RequestModifications:
        async with asyncio.timeout(5):
            await asyncio.sleep(0.001)
        return RequestModifications(set_headers={"x-waited": "1"})


async def test_policies_that_suspend_run_in_a_task_over_the_http_server():
    """Through the real HTTP server: an entry with ``timeout:`` (the executor's
    asyncio.timeout) and a policy using asyncio.timeout itself. Before, the server ran the
    handler outside any task and both failed closed ("Timeout should be used inside a
    task"): rateLimit v2's Redis calls and every policy timeout over HTTP."""
    handler, _ = make(a=[entry(Waits(), timeout=2.0)], b=[entry(Waits())])
    server = await start_http_server("127.0.0.1:0", handler)
    try:
        for name in ("a", "b"):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            body = as_json(request_headers(attributes=route(name)))
            writer.write(b"POST / HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            reply = parsed(await reader.readexactly(length))
            writer.close()
            assert head.startswith(b"HTTP/1.1 200 ")
            assert decode(reply).set_headers == {"x-waited": "1"}, name
    finally:
        await server.close(1.0)
