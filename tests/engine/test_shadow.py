"""Shadow mode (engine/shadow.py) through the chain executor: each decision is recorded
(metric, ``engine.shadow`` metadata, log) and nothing is enforced or changed."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import metrics, shadow
from engine.chain import Chain, ChainPolicy, run_request, run_response
from engine.config import load_config
from engine.errors import ConfigError
from engine.policy import ImmediateResponse, RequestModifications
from engine.registry import PolicyRegistry
from engine.testing import make_request_context, make_response_context
from tests.support import registry_from

TEST_POLICIES = ("addHeader", "deny", "metadataReader", "raiser", "sleeper", "statusSetter")
DECISIONS = "policy_engine_shadow_decisions_total"


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as (name, sorted labels without pid) -> value."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            found[(sample.name, labels)] = found.get((sample.name, labels), 0.0) + sample.value
    return found


@pytest.fixture(scope="module")
def registry() -> PolicyRegistry:
    return registry_from(*TEST_POLICIES)


@pytest.fixture
def counted(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Metrics on; yields a dict whose ``found()`` scrapes them."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    metrics.enable(str(directory))
    try:
        yield {"found": lambda: samples(metrics.render())}
    finally:
        metrics.disable()


def chain_of(registry: PolicyRegistry, *entries: dict[str, Any]) -> Chain:
    policies = [{"version": "v1.0.0", **entry} for entry in entries]
    snapshot = load_config(
        {"routes": {"r": {"policies": policies}}}, source="test", registry=registry
    )
    chain = snapshot.chain_for("r")
    assert chain is not None
    return chain


def shadowed(name: str, **fields: Any) -> dict[str, Any]:
    params = fields.pop("parameters", {})
    return {"name": name, "mode": "shadow", "parameters": params, **fields}


def add(header: str, value: str, **fields: Any) -> dict[str, Any]:
    return {"name": "addHeader", "parameters": {"header": header, "value": value}, **fields}


def decision_count(found: dict[Any, float], name: str, decision: str) -> float:
    labels = {"route": "r", "name": name, "version": "v1.0.0", "decision": decision}
    return found.get((DECISIONS, tuple(sorted(labels.items()))), 0.0)


# --------------------------------------------------------------------------- request phase


@pytest.mark.parametrize(
    ("entry", "decision", "note"),
    [
        pytest.param(shadowed("deny"), "would_reject", "deny v1.0.0: would 401", id="reject"),
        pytest.param(
            shadowed("addHeader", parameters={"header": "x-new", "value": "1"}),
            "would_modify",
            "addHeader v1.0.0: would set x-new",
            id="modify",
        ),
        pytest.param(
            shadowed("raiser", parameters={"mode": "raise"}),
            "failed",
            "raiser v1.0.0: failed (exception)",
            id="raises",
        ),
        pytest.param(
            shadowed("raiser", parameters={"mode": "badHeader"}),
            "failed",
            "raiser v1.0.0: failed (bad_result)",
            id="invalid-action",
        ),
        pytest.param(
            shadowed("sleeper", parameters={"seconds": 5}, timeout="20ms"),
            "failed",
            "sleeper v1.0.0: failed (timeout)",
            id="timeout",
        ),
        pytest.param(
            shadowed("deny", condition='request.headers["x-missing"] == "1"'),
            "failed",
            "deny v1.0.0: failed (condition_error)",
            id="condition-error",
        ),
    ],
)
async def test_a_shadow_entry_is_recorded_and_nothing_is_enforced(
    registry: PolicyRegistry,
    counted: dict[str, Any],
    entry: dict[str, Any],
    decision: str,
    note: str,
) -> None:
    # failClosed with its own status: a shadow entry ignores onError whatever it says.
    entry = {**entry, "onError": "failClosed", "errorStatus": 503}
    chain = chain_of(registry, entry, add("x-after", "yes"))
    ctx = make_request_context(headers={"x-in": "1"})
    outcome = await run_request(chain, ctx)
    # The chain went on (an immediate response or a failure did not end it) and only the
    # enforced entry changed the request.
    assert outcome.immediate is None
    assert dict(outcome.set_headers) == {"x-after": "yes"}
    assert (outcome.append_headers, outcome.remove_headers) == ((), ())
    assert ctx.metadata[shadow.SHADOW_KEY] == note
    found = counted["found"]()
    assert decision_count(found, entry["name"], decision) == 1
    others = set(shadow.DECISIONS) - {decision}
    assert all(decision_count(found, entry["name"], d) == 0 for d in others)
    short = "policy_engine_policy_short_circuits_total"
    assert not any(key[0] == short for key in found)


async def test_a_shadow_entry_that_returns_nothing_allows(
    registry: PolicyRegistry, counted: dict[str, Any]
) -> None:
    # Returning None is "allow"; the hook's in-place change to its context is on a copy.
    chain = Chain(
        "r",
        (ChainPolicy("quiet", "v1.0.0", _Quiet(), has_request=True, shadow=True),),
    )
    ctx = make_request_context()
    outcome = await run_request(chain, ctx)
    assert outcome.immediate is None
    assert ctx.metadata[shadow.SHADOW_KEY] == "quiet v1.0.0: allow"
    labels = {"route": "r", "name": "quiet", "version": "v1.0.0", "decision": "allow"}
    assert counted["found"]()[(DECISIONS, tuple(sorted(labels.items())))] == 1


class _Quiet:
    def on_request(self, ctx: Any) -> None:
        ctx.headers["x-sneaky"] = "mutated in place"  # on the copy: never seen


async def test_a_false_condition_skips_the_shadow_entry_unrecorded(
    registry: PolicyRegistry, counted: dict[str, Any]
) -> None:
    chain = chain_of(registry, shadowed("deny", condition='"x-go" in request.headers'))
    ctx = make_request_context()
    outcome = await run_request(chain, ctx)
    assert outcome.immediate is None
    assert shadow.SHADOW_KEY not in ctx.metadata
    found = counted["found"]()
    assert not any(key[0] == DECISIONS for key in found)
    skips = {"route": "r", "name": "deny", "version": "v1.0.0", "reason": "condition"}
    assert found[("policy_engine_policy_skips_total", tuple(sorted(skips.items())))] == 1
    # With the condition true it runs and would reject.
    ctx = make_request_context(headers={"x-go": "1"})
    assert (await run_request(chain, ctx)).immediate is None
    assert ctx.metadata[shadow.SHADOW_KEY] == "deny v1.0.0: would 401"


async def test_shadow_metadata_writes_and_in_place_changes_stay_private(
    registry: PolicyRegistry,
) -> None:
    # The shadow addHeader writes metadata key "k"; the enforced reader after it must not
    # see it, and the in-place header change of _Quiet never reaches the outcome.
    chain = Chain(
        "r",
        (
            *chain_of(
                registry,
                shadowed(
                    "addHeader", parameters={"header": "x-s", "value": "v", "metadataKey": "k"}
                ),
                {"name": "metadataReader", "parameters": {"key": "k"}},
            ).policies,
            ChainPolicy("quiet", "v1.0.0", _Quiet(), has_request=True, shadow=True),
        ),
    )
    ctx = make_request_context()
    outcome = await run_request(chain, ctx)
    assert dict(outcome.set_headers) == {"x-meta-k": "<none>"}
    assert "k" not in ctx.metadata
    assert "x-sneaky" not in ctx.headers
    assert ctx.metadata[shadow.SHADOW_KEY] == (
        "addHeader v1.0.0: would set x-s; quiet v1.0.0: allow"
    )


async def test_a_shadow_entry_sees_earlier_enforced_changes_but_not_earlier_shadow_ones(
    registry: PolicyRegistry,
) -> None:
    chain = chain_of(
        registry,
        add("x-a", "1"),
        shadowed("addHeader", parameters={"header": "x-b", "value": "1", "metadataKey": "b"}),
        shadowed("metadataReader", parameters={"key": "b"}),
    )
    ctx = make_request_context()
    outcome = await run_request(chain, ctx)
    assert dict(outcome.set_headers) == {"x-a": "1"}
    assert "b" not in ctx.metadata


async def test_a_shadow_entry_never_strips_headers(registry: PolicyRegistry) -> None:
    class Stripper:
        def on_request(self, ctx: Any) -> None:
            return None

        def strip_request_headers(self, headers: Any) -> list[str]:
            return ["x-claim"]

    entry = ChainPolicy(
        "s",
        "v1.0.0",
        Stripper(),
        has_request=True,
        shadow=True,
        condition=chain_of(registry, shadowed("deny", condition="false")).policies[0].condition,
    )
    ctx = make_request_context(headers={"x-claim": "spoof"})
    outcome = await run_request(Chain("r", (entry,)), ctx)
    assert outcome.remove_headers == ()
    assert ctx.headers["x-claim"] == "spoof"


async def test_cancellation_of_the_task_still_propagates_through_a_shadow_entry(
    registry: PolicyRegistry,
) -> None:
    import asyncio

    chain = chain_of(registry, shadowed("sleeper", parameters={"seconds": 5}))
    task = asyncio.ensure_future(run_request(chain, make_request_context()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --------------------------------------------------------------------------- static actions


async def test_static_actions_exclude_shadow_entries(counted: dict[str, Any]) -> None:
    enforced = ChainPolicy(
        "set",
        "v1.0.0",
        object(),
        has_request=True,
        static_request=RequestModifications(set_headers={"x-enforced": "1"}),
    )
    shadow_set = ChainPolicy(
        "shadowSet",
        "v1.0.0",
        object(),
        has_request=True,
        shadow=True,
        static_request=RequestModifications(set_headers={"x-shadow": "1"}, path="/elsewhere"),
    )
    shadow_deny = ChainPolicy(
        "shadowDeny",
        "v1.0.0",
        object(),
        has_request=True,
        shadow=True,
        static_request=ImmediateResponse(status=403),
    )
    chain = Chain("r", (shadow_deny, enforced, shadow_set))
    # The shadow entries' decisions are recorded per request, so the phase is not answered
    # from a precomputed outcome; the enforced static action still applies without a hook.
    assert chain.static_request_outcome is None
    assert not chain.fully_static
    ctx = make_request_context()
    outcome = await run_request(chain, ctx)
    assert outcome.immediate is None
    assert dict(outcome.set_headers) == {"x-enforced": "1"}
    assert outcome.path is None
    assert ctx.metadata[shadow.SHADOW_KEY] == (
        "shadowDeny v1.0.0: would 403; shadowSet v1.0.0: would set x-shadow; path"
    )
    # Without the shadow entries the same chain is static.
    assert Chain("r", (enforced,)).static_request_outcome is not None


# --------------------------------------------------------------------------- response phase


async def test_a_shadow_response_entry_changes_nothing(
    registry: PolicyRegistry, counted: dict[str, Any]
) -> None:
    chain = chain_of(
        registry,
        shadowed("statusSetter", parameters={"status": 403, "removeHeader": "server"}),
        shadowed("raiser", parameters={"mode": "raise"}),
    )
    response = make_response_context(status=200, headers={"server": "up"})
    outcome = await run_response(chain, response)
    assert outcome.immediate is None
    assert outcome.status is None
    assert outcome.remove_headers == ()
    assert response.status == 200
    assert response.metadata[shadow.SHADOW_KEY] == (
        "statusSetter v1.0.0: would status 403; remove server; raiser v1.0.0: failed (exception)"
    )
    found = counted["found"]()
    assert decision_count(found, "statusSetter", "would_modify") == 1
    assert decision_count(found, "raiser", "failed") == 1


# --------------------------------------------------------------------------- logging


async def test_would_reject_is_logged_at_info_and_rate_limited(
    registry: PolicyRegistry, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(shadow, "_limiter", shadow._LogLimiter(clock=lambda: clock[0]))
    chain = chain_of(registry, shadowed("deny"))
    with caplog.at_level(logging.INFO, logger="engine.shadow"):
        for _ in range(5):
            await run_request(chain, make_request_context())
        clock[0] += shadow.LOG_INTERVAL
        await run_request(chain, make_request_context())
    lines = [r.getMessage() for r in caplog.records if r.name == "engine.shadow"]
    assert len(lines) == 2, lines
    assert "shadow policy deny v1.0.0: would 401 (not enforced)" in lines[0]
    assert lines[1].endswith("; 4 more like this not logged")
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "engine.shadow")


# --------------------------------------------------------------------------- config


def test_mode_is_validated_with_route_entry_and_field(registry: PolicyRegistry) -> None:
    with pytest.raises(ConfigError) as raised:
        chain_of(registry, {"name": "deny", "mode": "dry-run"})
    assert "routes[r].policies[0] deny v1.0.0: mode: 'dry-run' is not one of enforce, shadow" in (
        str(raised.value)
    )
    assert chain_of(registry, {"name": "deny", "mode": "enforce"}).policies[0].shadow is False


def test_a_shadow_entry_never_shares_an_instance_with_an_enforced_one(
    registry: PolicyRegistry,
) -> None:
    chain = chain_of(registry, add("x-a", "1"), {**add("x-a", "1"), "mode": "shadow"})
    enforced, shadow_entry = chain.policies
    assert (enforced.shadow, shadow_entry.shadow) == (False, True)
    assert enforced.instance is not shadow_entry.instance
