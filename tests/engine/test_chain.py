"""Tests of engine.chain: the executor's order, short-circuit, failures and net changes."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from engine.chain import (
    Chain,
    ChainPolicy,
    RequestOutcome,
    ResponseOutcome,
    _apply_headers,
    _header_diff,
    check_static_request,
    run_request,
    run_response,
)
from engine.config import load_config
from engine.errors import PolicyError
from engine.policy import Headers, ImmediateResponse, RequestContext, RequestModifications
from engine.registry import PolicyRegistry
from engine.testing import make_request_context, make_response_context
from tests.support import registry_from, write_policy

TEST_POLICIES = (
    "addHeader",
    "bodyUpper",
    "deny",
    "metadataReader",
    "raiser",
    "recorder",
    "rewrite",
    "sleeper",
    "statusSetter",
)


@pytest.fixture(scope="module")
def registry() -> PolicyRegistry:
    return registry_from(*TEST_POLICIES)


@pytest.fixture
def calls(registry: PolicyRegistry) -> list[tuple[str, str, dict[str, str]]]:
    log: list[tuple[str, str, dict[str, str]]] = registry.get("recorder", "v1.0.0").factory.calls  # type: ignore[attr-defined]
    log.clear()
    return log


def chain_of(registry: PolicyRegistry, *entries: dict[str, Any]) -> Chain:
    policies = [{"version": "v1.0.0", **entry} for entry in entries]
    snapshot = load_config(
        {"routes": {"r": {"policies": policies}}}, source="test", registry=registry
    )
    chain = snapshot.chain_for("r")
    assert chain is not None
    return chain


def add(header: str, value: str, **params: Any) -> dict[str, Any]:
    return {"name": "addHeader", "parameters": {"header": header, "value": value, **params}}


def rec(label: str, **fields: Any) -> dict[str, Any]:
    return {"name": "recorder", "parameters": {"label": label}, **fields}


def failure_body(name: str) -> bytes:
    return json.dumps({"error": f"policy {name} v1.0.0 failed"}).encode()


# --------------------------------------------------------------------------- request phase


async def test_empty_chain_passes_through(registry: PolicyRegistry) -> None:
    ctx = make_request_context(headers={"a": "1"})
    assert await run_request(chain_of(registry), ctx) == RequestOutcome()
    assert await run_response(chain_of(registry), make_response_context(ctx)) == ResponseOutcome()


async def test_policies_run_in_order_and_see_earlier_changes(
    registry: PolicyRegistry, calls: list[Any]
) -> None:
    chain = chain_of(
        registry,
        rec("first"),
        add("x-a", "1", metadataKey="user"),
        rec("second"),
        {"name": "metadataReader", "parameters": {"key": "user"}},
    )
    outcome = await run_request(chain, make_request_context(headers={"host": "h"}))
    assert [(label, headers) for label, _, headers in calls] == [
        ("first", {"host": "h"}),
        ("second", {"host": "h", "x-a": "1"}),
    ]
    assert outcome == RequestOutcome(set_headers={"x-a": "1", "x-meta-user": "1"})


async def test_outcome_is_the_net_change(registry: PolicyRegistry) -> None:
    chain = chain_of(
        registry,
        add("x-same", "s"),  # rewrites an identical value: no net change
        add("x-temp", "t"),
        add("x-keep", "2", append=True),
        {"name": "rewrite", "parameters": {"path": "/v2/x", "removeHeaders": ["x-drop", "x-temp"]}},
        {"name": "rewrite", "parameters": {"method": "GET"}},  # back to the original method
    )
    ctx = make_request_context(method="GET", headers={"x-same": "s", "x-keep": "1", "x-drop": "d"})
    outcome = await run_request(chain, ctx)
    # The appended value is a separate header line (append=true), not a rewrite of x-keep.
    assert outcome == RequestOutcome(
        append_headers=(("x-keep", "2"),), remove_headers=("x-drop",), path="/v2/x"
    )
    assert ctx.headers == {"x-same": "s", "x-keep": "1, 2"}
    assert ctx.headers.get_all("x-keep") == ["1", "2"]
    assert ctx.path == "/v2/x"


async def test_immediate_response_stops_the_chain(
    registry: PolicyRegistry, calls: list[Any]
) -> None:
    chain = chain_of(registry, add("x-a", "1"), {"name": "deny"}, rec("after"))
    outcome = await run_request(chain, make_request_context())
    assert outcome.immediate == ImmediateResponse(
        status=401, headers={"content-type": "application/json"}, body=b'{"error": "denied"}'
    )
    assert calls == []


async def test_conditions_skip_policies(
    registry: PolicyRegistry, calls: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    chain = chain_of(
        registry,
        add("x-a", "1", metadataKey="flag"),
        rec("api-only", condition='request.path.startsWith("/api/")'),
        rec("flagged", condition='metadata.flag == "1"'),
        {**rec("broken", condition='metadata.absent == "x"'), "onError": "failOpen"},
        rec("writes", condition='request.method in ["POST", "PUT", "DELETE"]'),
    )
    with caplog.at_level(logging.WARNING, logger="engine.chain"):
        outcome = await run_request(chain, make_request_context(path="/health", request_id="r-9"))
    assert outcome.immediate is None
    assert [label for label, _, _ in calls] == ["flagged"]
    [record] = caplog.records
    assert record.name == "engine.chain"
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        "request r-9: request policy recorder v1.0.0 failed: condition "
        "'metadata.absent == \"x\"' failed"
    )
    assert record.getMessage().endswith("(failOpen: continuing)")


@pytest.mark.parametrize("status", [500, 401])
async def test_a_condition_that_fails_at_request_time_fails_its_policy_closed(
    registry: PolicyRegistry, calls: list[Any], caplog: pytest.LogCaptureFixture, status: int
) -> None:
    # A guard that errors (the client left the header out) must not skip a guarded
    # policy: by default that is a silent bypass of e.g. jwtValidation.
    chain = chain_of(
        registry,
        {
            **rec("guarded", condition='request.headers["x-internal"] != "true"'),
            "errorStatus": status,
        },
        rec("after"),
    )
    with caplog.at_level(logging.WARNING, logger="engine.chain"):
        outcome = await run_request(chain, make_request_context(request_id="r-2"))
    assert outcome.immediate is not None
    assert outcome.immediate.status == status
    assert calls == []
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert "condition" in record.getMessage()
    assert record.getMessage().endswith("(failClosed: rejecting)")


@pytest.mark.parametrize("mode", ["raise", "timeout", "badReturn", "badHeader", "cancel"])
@pytest.mark.parametrize(
    ("on_error", "status"), [("failClosed", 500), ("failClosed", 503), ("failOpen", None)]
)
async def test_request_failures(
    registry: PolicyRegistry,
    calls: list[Any],
    caplog: pytest.LogCaptureFixture,
    *,
    mode: str,
    on_error: str,
    status: int | None,
) -> None:
    failing: dict[str, Any] = {"name": "raiser", "parameters": {"mode": mode}, "onError": on_error}
    if status is not None:
        failing["errorStatus"] = status
    chain = chain_of(registry, add("x-a", "1"), failing, rec("after"))
    with caplog.at_level(logging.WARNING, logger="engine.chain"):
        outcome = await run_request(chain, make_request_context(request_id="r-1"))
    [record] = caplog.records
    assert record.getMessage().startswith("request r-1: request policy raiser v1.0.0 ")
    if on_error == "failOpen":
        assert outcome == RequestOutcome(set_headers={"x-a": "1"})
        assert [label for label, _, _ in calls] == ["after"]
        assert record.levelno == logging.WARNING
    else:
        assert outcome.immediate == ImmediateResponse(
            status=status or 500,
            headers={"content-type": "application/json"},
            body=failure_body("raiser"),
        )
        assert calls == []
        assert record.levelno == logging.ERROR


@pytest.mark.parametrize("on_error", ["failClosed", "failOpen"])
async def test_timeout(
    registry: PolicyRegistry, caplog: pytest.LogCaptureFixture, on_error: str
) -> None:
    slow = {"name": "sleeper", "parameters": {"seconds": 5}, "timeout": "20ms", "onError": on_error}
    chain = chain_of(registry, slow, add("x-after", "1"))
    with caplog.at_level(logging.WARNING, logger="engine.chain"):
        outcome = await asyncio.wait_for(run_request(chain, make_request_context()), timeout=2)
    assert caplog.messages[0].startswith(
        "request req-1: request policy sleeper v1.0.0 failed: timed out after 0.02s"
    )
    assert caplog.records[0].exc_info is None
    if on_error == "failOpen":
        assert outcome == RequestOutcome(set_headers={"x-after": "1"})
    else:
        assert outcome.immediate is not None
        assert outcome.immediate.body == failure_body("sleeper")


async def test_fast_async_hook_within_timeout(registry: PolicyRegistry) -> None:
    chain = chain_of(registry, {"name": "sleeper", "parameters": {"seconds": 0}, "timeout": "1s"})
    outcome = await run_request(chain, make_request_context())
    assert outcome == RequestOutcome(set_headers={"x-slept": "yes"})


async def test_cancellation_of_the_request_propagates(registry: PolicyRegistry) -> None:
    chain = chain_of(registry, {"name": "sleeper", "parameters": {"seconds": 5}})
    task = asyncio.create_task(run_request(chain, make_request_context()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=2)


async def test_body_rewrite(registry: PolicyRegistry) -> None:
    chain = chain_of(registry, {"name": "bodyUpper"})
    assert (chain.requires_request_body, chain.requires_response_body) == (True, True)
    assert (await run_request(chain, make_request_context(body=b"abc"))).body == b"ABC"
    assert (await run_request(chain, make_request_context(body=None))).body is None


class FixedAction:
    """Returns one request action as is (``rewrite``'s definition pins path and method)."""

    def __init__(self, action: RequestModifications) -> None:
        self.action = action

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        return self.action


def fixed_chain(action: RequestModifications, *, fail_open: bool) -> Chain:
    entry = ChainPolicy(
        name="fixed",
        version="v1.0.0",
        instance=FixedAction(action),
        has_request=True,
        fail_open=fail_open,
        error_status=503,
    )
    return Chain(route="r", policies=(entry,))


@pytest.mark.parametrize(
    ("action", "problem"),
    [
        pytest.param(RequestModifications(path="v2/x"), "not an origin-form path", id="relative"),
        pytest.param(RequestModifications(path="*"), "not an origin-form path", id="asterisk"),
        pytest.param(
            RequestModifications(path="http://other.test/x"),
            "not an origin-form path",
            id="absolute-form",
        ),
        pytest.param(RequestModifications(path="/a b"), "whitespace or a control", id="space"),
        pytest.param(RequestModifications(path="/a\tb"), "whitespace or a control", id="tab"),
        pytest.param(RequestModifications(path="/a\x7f"), "whitespace or a control", id="del"),
        pytest.param(RequestModifications(method="GET /admin"), "not an RFC 9110 token", id="sp"),
        pytest.param(RequestModifications(method="PO:ST"), "not an RFC 9110 token", id="colon"),
        pytest.param(RequestModifications(method="(GET)"), "not an RFC 9110 token", id="delim"),
        pytest.param(RequestModifications(method="G\u00c9T"), "not an RFC 9110 token", id="latin1"),
    ],
)
@pytest.mark.parametrize("on_error", ["failClosed", "failOpen"])
async def test_a_path_or_method_that_is_not_a_request_line_is_a_bad_result(
    caplog: pytest.LogCaptureFixture, action: RequestModifications, problem: str, on_error: str
) -> None:
    # Issue 16 item 13. Before, only CR/LF/NUL/UTF-8 were checked: Envoy sent "v2/x" or
    # "GET /admin" upstream as the request line.
    ctx = make_request_context(path="/orig", method="GET")
    chain = fixed_chain(action, fail_open=on_error == "failOpen")
    with caplog.at_level(logging.WARNING, logger="engine.chain"):
        outcome = await run_request(chain, ctx)
    [record] = caplog.records
    assert problem in record.getMessage()
    assert (ctx.path, ctx.method) == ("/orig", "GET"), "nothing of a bad action is applied"
    if on_error == "failOpen":
        assert outcome == RequestOutcome()
    else:
        assert outcome.immediate is not None
        assert (outcome.immediate.status, outcome.immediate.body) == (503, failure_body("fixed"))


@pytest.mark.parametrize(
    ("path", "method"),
    [("/", None), ("/v2/x?q=a/b&c", None), ("//double", None), (None, "PATCH"), (None, "M-SEARCH")],
)
async def test_an_origin_form_path_and_a_token_method_apply(
    path: str | None, method: str | None
) -> None:
    action = RequestModifications(path=path, method=method)
    ctx = make_request_context(path="/orig", method="GET")
    outcome = await run_request(fixed_chain(action, fail_open=False), ctx)
    assert outcome == RequestOutcome(path=path, method=method)


def test_a_static_action_with_a_bad_path_fails_at_config_load() -> None:
    with pytest.raises(PolicyError, match="not an origin-form path"):
        check_static_request(RequestModifications(path="v2"))


# --------------------------------------------------------------------------- response phase


def test_chain_phase_split(registry: PolicyRegistry) -> None:
    chain = chain_of(
        registry,
        add("x-a", "1"),
        {"name": "statusSetter", "parameters": {"status": 201}},
        rec("both"),
        {**rec("disabled"), "enabled": False},
    )
    assert [p.name for p in chain.request_policies] == ["addHeader", "recorder"]
    assert [p.name for p in chain.response_policies] == ["statusSetter", "recorder"]
    assert chain.has_response_phase
    assert not chain.requires_request_body
    assert not chain_of(registry, add("x-a", "1")).has_response_phase


def test_needs_response_is_computed_once_per_chain() -> None:
    """Envoy must send the response for a response policy, or for any entry that reads
    the response body (whatever its phases): decided at config load, not per request."""
    request_only = ChainPolicy("a", "v1.0.0", object(), has_request=True)
    reads_response_body = ChainPolicy(
        "b", "v1.0.0", object(), has_request=True, requires_response_body=True
    )
    responder = ChainPolicy("c", "v1.0.0", object(), has_response=True)
    assert not Chain("r", (request_only,)).needs_response
    assert Chain("r", (request_only, reads_response_body)).needs_response
    assert Chain("r", (responder,)).needs_response


async def test_response_runs_in_configured_order_and_shares_metadata(
    registry: PolicyRegistry, calls: list[Any]
) -> None:
    chain = chain_of(
        registry,
        rec("a"),
        add("x-a", "1", metadataKey="user"),
        {"name": "statusSetter", "parameters": {"status": 201, "removeHeader": "server"}},
        {"name": "metadataReader", "parameters": {"key": "user"}},
        rec("b"),
    )
    request = make_request_context()
    await run_request(chain, request)
    response = make_response_context(request, status=200, headers={"server": "up", "x-u": "1"})
    outcome = await run_response(chain, response)
    assert [(label, phase) for label, phase, _ in calls] == [
        ("a", "request"),
        ("b", "request"),
        ("a", "response"),
        ("b", "response"),
    ]
    assert calls[-1][2] == {"x-u": "1", "x-meta-user": "1"}
    assert outcome == ResponseOutcome(
        set_headers={"x-meta-user": "1"}, remove_headers=("server",), status=201
    )


async def test_response_conditions_see_request_response_and_metadata(
    registry: PolicyRegistry,
) -> None:
    cond = 'response.status == 500 && request.path == "/rewritten" && metadata.m == "1"'
    chain = chain_of(
        registry,
        add("x-a", "1", metadataKey="m"),
        {"name": "rewrite", "parameters": {"path": "/rewritten"}},
        {"name": "statusSetter", "parameters": {"status": 502}, "condition": cond},
    )
    request = make_request_context(path="/orig")
    await run_request(chain, request)
    assert (await run_response(chain, make_response_context(request, status=500))).status == 502
    assert (await run_response(chain, make_response_context(request, status=200))).status is None


@pytest.mark.parametrize("on_error", ["failClosed", "failOpen"])
async def test_response_failures(registry: PolicyRegistry, on_error: str) -> None:
    chain = chain_of(
        registry,
        {"name": "raiser", "onError": on_error, "errorStatus": 502},
        {"name": "statusSetter", "parameters": {"status": 201}},
    )
    outcome = await run_response(chain, make_response_context())
    if on_error == "failOpen":
        assert outcome == ResponseOutcome(status=201)
    else:
        assert outcome == ResponseOutcome(
            immediate=ImmediateResponse(
                status=502,
                headers={"content-type": "application/json"},
                body=failure_body("raiser"),
            )
        )


async def test_response_body_and_timeout(registry: PolicyRegistry) -> None:
    chain = chain_of(
        registry,
        {"name": "bodyUpper"},
        {"name": "sleeper", "parameters": {"seconds": 5}, "timeout": "20ms", "onError": "failOpen"},
    )
    response = make_response_context(body=b"ok")
    outcome = await asyncio.wait_for(run_response(chain, response), timeout=2)
    assert outcome == ResponseOutcome(body=b"OK")


async def test_request_context_is_mutated_in_place(registry: PolicyRegistry) -> None:
    ctx: RequestContext = make_request_context(path="/a")
    await run_request(chain_of(registry, {"name": "rewrite", "parameters": {"path": "/b"}}), ctx)
    assert ctx.path == "/b"


def test_request_head_is_the_prefix_before_the_first_body_policy() -> None:
    def p(name: str, **flags: Any) -> ChainPolicy:
        return ChainPolicy(name, "v1.0.0", object(), has_request=True, **flags)

    auth, body, later = p("auth"), p("body", requires_request_body=True, error_status=503), p("x")
    chain = Chain("r", (auth, body, later))
    assert chain.request_head == (auth,)
    assert chain.request_rest == (body, later)
    assert chain.body_failure is not None
    assert chain.body_failure.status == 503
    plain = Chain("r", (auth, later))
    assert (plain.request_head, plain.request_rest, plain.body_failure) == ((auth, later), (), None)


@pytest.mark.parametrize(
    ("before", "change", "expected"),
    [
        pytest.param(
            [("set-cookie", "a=1"), ("set-cookie", "b=2")],
            {"append_headers": {"set-cookie": "c=3"}},
            ({}, (("set-cookie", "c=3"),), ()),
            id="append-to-repeated",
        ),
        pytest.param(
            [("set-cookie", "a=1"), ("set-cookie", "b=2"), ("x-a", "1")],
            {"set_headers": {"x-a": "2"}},
            ({"x-a": "2"}, (), ()),
            id="repeated-untouched",
        ),
        pytest.param(
            [("set-cookie", "a=1"), ("set-cookie", "b=2")],
            {"set_headers": {"set-cookie": "z=9"}, "append_headers": {"set-cookie": "y=8"}},
            ({"set-cookie": "z=9"}, (("set-cookie", "y=8"),), ()),
            id="replace-then-append",
        ),
        pytest.param(
            [("set-cookie", "a=1"), ("set-cookie", "b=2")],
            {"remove_headers": ("set-cookie",)},
            ({}, (), ("set-cookie",)),
            id="remove-all-values",
        ),
    ],
)
def test_header_diff_keeps_repeated_headers_apart(
    before: list[tuple[str, str]], change: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    # Before: repeated headers were joined into one value, so any append rewrote the
    # header as ONE line "a=1, b=2, c=3" (a corrupted set-cookie).
    headers = Headers(before)
    original = headers.snapshot()
    _apply_headers(
        headers,
        change.get("set_headers", {}),
        change.get("append_headers", {}),
        change.get("remove_headers", ()),
    )
    assert _header_diff(original, headers) == expected


# --------------------------------------------------------------------------- typed conditions

CLAIMS_WRITER = """
    from engine.policy import RequestContext

    class Policy:
        def __init__(self, params):
            pass

        def on_request(self, ctx: RequestContext) -> None:
            # JWT claims are attacker-chosen JSON: huge ints, lone surrogates; plus a tuple.
            ctx.metadata["jwt.claims"] = {"sub": "\\ud800", "n": 2**64, "t": (1, 2)}
            ctx.metadata["jwt.sub"] = "u1"
"""


async def test_spec_condition_spelling_guards_the_policy(registry: PolicyRegistry) -> None:
    # User story 4.1's own example. Before, every variable was map(string, dyn): this
    # compiled, then failed on every request (no key "Path"), so the guarded policy
    # never ran, /api/ included.
    chain = chain_of(registry, {"name": "deny", "condition": 'request.Path.startsWith("/api/")'})
    api = await run_request(chain, make_request_context(path="/api/users"))
    assert api.immediate is not None
    assert api.immediate.status == 401
    health = await run_request(chain, make_request_context(path="/health"))
    assert health.immediate is None


async def test_unrepresentable_metadata_no_longer_switches_policies_off(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    writer = write_policy(tmp_path, "claimsWriter", code=CLAIMS_WRITER)
    registry = registry_from(writer, "deny")
    chain = chain_of(
        registry,
        {"name": "claimsWriter"},
        {"name": "deny", "condition": 'metadata["jwt.sub"] == "u1"'},
    )
    with caplog.at_level(logging.WARNING):
        outcome = await run_request(chain, make_request_context())
    assert outcome.immediate is not None  # before: the condition failed, deny was skipped
    assert [r.getMessage() for r in caplog.records] == [
        "policy claimsWriter v1.0.0 wrote metadata 'jwt.claims' that CEL cannot represent: "
        "['sub']: lone surrogate replaced by U+FFFD; ['n']: integer outside int64/uint64 "
        "converted to double; ['t']: tuple converted to a list"
    ]
