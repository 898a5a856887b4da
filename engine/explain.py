"""What a route's chain would do for one request, worked out without running a hook.

``engine explain --config FILE`` (engine/explain_cli.py) and the control plane's
``POST /explain`` (controlplane/admin.py) describe a request (method, path, headers,
metadata, route key) and get back, for the route's chain in order, each entry:

* whether it would run in each phase, and why not: its CEL condition's value and, when
  false or failing, the expression and every value it read (``request.headers["x-env"]
  = "dev"``); an entry after one that answers the request is "not reached";
* its ``mode`` (enforce / shadow), ``onError``, ``errorStatus``, ``timeout``;
* its static action (``static_request()`` / ``static_response()``, computed at config
  load), which is applied to the request here as the executor would, so later conditions
  see it;
* what its optional ``explain(params)`` hook says the configuration does (engine/policy.py;
  "no static explanation" without one), with the values of parameters the definition marks
  ``secret`` removed (engine/secrets.py) whatever the hook returns.

What it never does: call ``on_request`` / ``on_response`` (they may do I/O: a JWKS fetch,
a Redis call). An entry that runs a hook is "runs (hook decides at run time)": its
changes and the metadata it writes are unknown here, so a later condition that reads
such metadata is shown failing ("missing key") unless the description gives the value.
Headers named by ``strip_request_headers`` (quick and pure by contract) are shown and
removed for entries that would not run. A condition that reads the response is
"decided per response". Disabled entries are not part of the chain and are not listed.

The result is JSON-ready (:func:`explain`); :func:`engine.explain_cli.render` prints it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from engine.chain import ChainPolicy, Snapshot, apply_request
from engine.conditions import read_paths, request_data
from engine.errors import ConditionEvaluationError, ExplainError, RegistryError
from engine.policy import (
    Headers,
    ImmediateResponse,
    RequestContext,
    RequestModifications,
    ResponseContext,
    ResponseModifications,
)
from engine.registry import PolicyRegistry
from engine.secrets import parameters_secrets, scrub

__all__ = ["ABSENT", "NO_EXPLANATION", "ExplainRequest", "describe_action", "explain"]

NO_EXPLANATION: Final = "no static explanation"
ABSENT: Final = "(absent)"
"""How a value a condition reads is shown when the request does not have it."""

_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BODY_SHOWN: Final = 200
_MAX_ROUTES_LISTED: Final = 20
_REQUEST_FIELDS: Final = frozenset({"method", "path", "headers", "metadata", "route"})


@dataclass(frozen=True, slots=True)
class ExplainRequest:
    """The request to explain. ``route`` None: the configuration's only route."""

    method: str = "GET"
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    route: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not _TOKEN.fullmatch(self.method):
            raise ExplainError("method", f"{self.method!r} is not an HTTP method")
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ExplainError("path", f"{self.path!r} must start with '/'")
        for name, value in self.headers:
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                raise ExplainError("headers", f"{name!r} is not a header name")
            if not isinstance(value, str):
                raise ExplainError("headers", f"{name}: value must be a string, got {value!r}")
        if not isinstance(self.metadata, Mapping) or not all(
            isinstance(k, str) for k in self.metadata
        ):
            raise ExplainError("metadata", "must be a mapping with string keys")
        if self.route is not None and (not isinstance(self.route, str) or not self.route):
            raise ExplainError("route", "must be a non-empty string")

    @classmethod
    def from_json(cls, data: Any) -> ExplainRequest:
        """From ``{"method", "path", "headers": {name: value} or [[name, value], ...],
        "metadata": {...}, "route"}`` (all optional); ExplainError names a wrong field."""
        if not isinstance(data, Mapping):
            raise ExplainError("body", 'must be a JSON object such as {"path": "/"}')
        unknown = sorted(str(k) for k in data if k not in _REQUEST_FIELDS)
        if unknown:
            raise ExplainError(
                unknown[0], f"unknown field (known: {', '.join(sorted(_REQUEST_FIELDS))})"
            )
        raw = data.get("headers") or {}
        if isinstance(raw, Mapping):
            pairs = list(raw.items())
        elif isinstance(raw, list) and all(
            isinstance(p, list | tuple) and len(p) == 2 for p in raw
        ):
            pairs = [(p[0], p[1]) for p in raw]
        else:
            raise ExplainError("headers", "must be {name: value} or [[name, value], ...]")
        return cls(
            method=data.get("method", "GET"),
            path=data.get("path", "/"),
            headers=tuple((n.lower() if isinstance(n, str) else n, v) for n, v in pairs),
            metadata=data.get("metadata") or {},
            route=data.get("route"),
        )


def _route_key(snapshot: Snapshot, request: ExplainRequest) -> tuple[str, str]:
    if request.route is not None:
        return request.route, "given"
    if len(snapshot.routes) == 1:
        return next(iter(snapshot.routes)), "the configuration's only route"
    keys = sorted(snapshot.routes)
    shown = ", ".join(keys[:_MAX_ROUTES_LISTED]) + (
        ", ..." if len(keys) > _MAX_ROUTES_LISTED else ""
    )
    raise ExplainError(
        "route", f"which route? the configuration has {len(keys)}: {shown or '(none)'}"
    )


def explain(
    snapshot: Snapshot, request: ExplainRequest, registry: PolicyRegistry | None = None
) -> dict[str, Any]:
    """The explanation of ``request`` against ``snapshot`` (JSON-ready). ``registry`` gives
    the definitions whose ``secret`` marks say what to remove from each entry's text.
    Raises ExplainError when the route cannot be chosen."""
    key, how = _route_key(snapshot, request)
    result: dict[str, Any] = {
        "config": {
            "source": snapshot.source,
            "version": snapshot.version,
            "contentHash": snapshot.content_hash,
        },
        "request": {
            "method": request.method,
            "path": request.path,
            "headers": [list(pair) for pair in request.headers],
            "metadata": dict(request.metadata),
        },
        "route": {"key": key, "resolvedFrom": how},
    }
    chain = snapshot.chain_for(key)
    if chain is None:
        answer = snapshot.unknown_route
        result["route"]["known"] = False
        result["result"] = {
            "request": "passes through unchanged (unknownRoute: allow)"
            if answer is None
            else f"is answered {answer.status} (no chain for this route key: unknownRoute)",
        }
        result["entries"] = []
        return result
    result["route"]["known"] = True
    result["debug"] = {"timing": chain.timing}
    ctx = RequestContext(
        headers=Headers(request.headers),
        path=request.path,
        method=request.method,
        request_id="explain",
        route=key,
        metadata=dict(request.metadata),
    )
    before = (ctx.headers.snapshot(), ctx.path, ctx.method)
    state = _State()
    entries = []
    for index, policy in enumerate(chain.policies):
        entry = _entry(index, policy, ctx, state)
        entries.append(_scrubbed(entry, _secrets(policy, registry)))
    result["entries"] = entries
    result["result"] = _result(state, ctx, before)
    return result


@dataclass(slots=True)
class _State:
    answered: str | None = None
    dynamic: list[str] = field(default_factory=list)
    shadow: list[str] = field(default_factory=list)


def _secrets(policy: ChainPolicy, registry: PolicyRegistry | None) -> set[str]:
    if registry is None:
        return set()
    try:
        definition = registry.get(policy.name, policy.version).definition
    except RegistryError:
        return set()
    return parameters_secrets(dict(policy.params), definition.secrets)


def _scrubbed(value: Any, secrets: set[str]) -> Any:
    if not secrets:
        return value
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, Mapping):
        return {_scrubbed(k, secrets): _scrubbed(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(v, secrets) for v in value]
    return value


def _entry(index: int, policy: ChainPolicy, ctx: RequestContext, state: _State) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "index": index,
        "name": policy.name,
        "version": policy.version,
        "mode": "shadow" if policy.shadow else "enforce",
        "onError": "failOpen" if policy.fail_open else "failClosed",
        "errorStatus": policy.error_status,
        "timeout": policy.timeout,
        "phases": [
            p
            for p, on in (("request", policy.has_request), ("response", policy.has_response))
            if on
        ],
        "bodies": [
            b
            for b, on in (
                ("request", policy.requires_request_body),
                ("response", policy.requires_response_body),
            )
            if on
        ],
    }
    if policy.condition is not None:
        entry["condition"] = policy.condition.expression
    if policy.has_request:
        entry["request"] = _request_phase(policy, ctx, state)
    if policy.has_response:
        entry["response"] = _response_phase(policy, ctx, state)
    entry["explanation"] = _hook_explanation(policy)
    return entry


def _condition(policy: ChainPolicy, ctx: RequestContext, response: bool) -> dict[str, Any]:
    """The condition's value for ``ctx``, and what it read when it is not true."""
    condition = policy.condition
    assert condition is not None
    out: dict[str, Any] = {"expression": condition.expression}
    if response and condition.reads_response:
        out["value"] = None
        out["why"] = "reads the response: decided per response"
        return out
    try:
        if response:
            held = condition.evaluate_response(
                ResponseContext(request=ctx, status=200, headers=Headers(), metadata=ctx.metadata)
            )
        else:
            held = condition.evaluate_request(ctx)
    except ConditionEvaluationError as exc:
        out["value"] = None
        out["error"] = str(exc)
    else:
        out["value"] = held
        if held:
            return out
    out["reads"] = _reads(condition.expression, ctx)
    return out


def _reads(expression: str, ctx: RequestContext) -> dict[str, Any]:
    data = request_data(ctx)
    shown: dict[str, Any] = {}
    for path in read_paths(expression):
        # metadata (top level or request.metadata) is a map: its keys read as indexes.
        split = 1 if path[0] == "metadata" else 2
        name = ".".join(path[:split]) + "".join(f"[{json.dumps(p)}]" for p in path[split:])
        if path[0] == "response":
            shown[name] = "(the response)"
            continue
        value: Any = data
        for part in path:
            if not isinstance(value, Mapping) or part not in value:
                value = ABSENT
                break
            value = value[part]
        shown[name] = json.loads(json.dumps(value, default=str))
    return shown


def _request_phase(policy: ChainPolicy, ctx: RequestContext, state: _State) -> dict[str, Any]:
    phase: dict[str, Any] = {}
    if state.answered is not None:
        phase["runs"] = "not reached"
        phase["why"] = f"the request is answered by {state.answered} first"
        return phase
    if policy.condition is not None:
        condition = _condition(policy, ctx, response=False)
        phase["condition"] = condition
        if condition["value"] is not True:
            return _not_run(policy, ctx, state, phase, condition)
    static = policy.static_request
    if policy.shadow:
        phase["runs"] = "runs in shadow mode (recorded, nothing enforced)"
        state.shadow.append(policy.label)
        if static is not None:
            phase["wouldApply"] = describe_action(static)
        return phase
    if static is None:
        phase["runs"] = "runs (its hook decides at run time; not called here)"
        state.dynamic.append(policy.label)
        return phase
    phase["runs"] = "runs (static action)"
    phase["applies"] = describe_action(static)
    if isinstance(static, ImmediateResponse):
        state.answered = f"{policy.label} ({static.status})"
    else:
        apply_request(ctx, static)
    return phase


def _not_run(
    policy: ChainPolicy,
    ctx: RequestContext,
    state: _State,
    phase: dict[str, Any],
    condition: Mapping[str, Any],
) -> dict[str, Any]:
    """An entry whose condition is false or fails: skipped, or its failure."""
    if "error" in condition and state.dynamic:
        # A missing metadata key is what a condition on an earlier hook's metadata meets
        # here: that hook is not called, so the failure says nothing about run time.
        phase["runs"] = (
            "unknown: the condition fails on this description, but "
            f"{', '.join(state.dynamic)} runs first and may write what it reads "
            "(give it as metadata to see)"
        )
        return phase
    if "error" in condition and not policy.shadow and not policy.fail_open:
        phase["runs"] = f"fails: condition error, failClosed answers {policy.error_status}"
        state.answered = f"{policy.label} (condition error: {policy.error_status})"
        return phase
    if "error" in condition:
        mode = "shadow: never fails the request" if policy.shadow else "failOpen"
        phase["runs"] = f"skipped (condition error; {mode})"
    else:
        phase["runs"] = "skipped (condition false)"
    strip = getattr(policy.instance, "strip_request_headers", None)
    if strip is not None and not policy.shadow:
        try:
            names = [n for n in strip(ctx.headers) if isinstance(n, str)]
        except Exception as exc:
            phase["strips"] = f"strip_request_headers() failed: {type(exc).__name__}"
        else:
            if names:
                phase["strips"] = names
                apply_request(ctx, RequestModifications(remove_headers=tuple(names)))
    return phase


def _response_phase(policy: ChainPolicy, ctx: RequestContext, state: _State) -> dict[str, Any]:
    phase: dict[str, Any] = {}
    if state.answered is not None:
        phase["runs"] = "not reached"
        phase["why"] = f"the request is answered by {state.answered}"
        return phase
    if policy.condition is not None:
        condition = _condition(policy, ctx, response=True)
        phase["condition"] = condition
        if condition["value"] is False:
            phase["runs"] = "skipped (condition false)"
            return phase
        if "error" in condition:
            fails = (
                "skipped (condition error)"
                if policy.shadow or policy.fail_open
                else (f"fails: condition error, failClosed answers {policy.error_status}")
            )
            phase["runs"] = fails
            return phase
    static = policy.static_response
    decided = policy.condition is not None and phase["condition"]["value"] is None
    prefix = "runs if its condition holds for the response" if decided else "runs"
    if policy.shadow:
        phase["runs"] = f"{prefix} in shadow mode (recorded, nothing enforced)"
        if static is not None:
            phase["wouldApply"] = describe_action(static)
    elif static is None:
        phase["runs"] = f"{prefix} (its hook decides at run time; not called here)"
    else:
        phase["runs"] = f"{prefix} (static action)"
        phase["applies"] = describe_action(static)
    return phase


def describe_action(action: object) -> dict[str, Any]:
    """A static action as JSON: what it sets, appends, removes, answers."""
    if isinstance(action, ImmediateResponse):
        body = action.body.decode("utf-8", "replace")
        shown = body if len(body) <= _BODY_SHOWN else body[:_BODY_SHOWN] + "..."
        return {"answers": action.status, "headers": dict(action.headers), "body": shown}
    out: dict[str, Any] = {}
    if isinstance(action, RequestModifications | ResponseModifications):
        for key, value in (
            ("setHeaders", dict(action.set_headers)),
            ("appendHeaders", dict(action.append_headers)),
            ("removeHeaders", list(action.remove_headers)),
        ):
            if value:
                out[key] = value
        if action.body is not None:
            out["body"] = f"replaced ({len(action.body)} bytes)"
    if isinstance(action, RequestModifications):
        if action.path is not None:
            out["path"] = action.path
        if action.method is not None:
            out["method"] = action.method
    if isinstance(action, ResponseModifications) and action.status is not None:
        out["status"] = action.status
    return out


def _hook_explanation(policy: ChainPolicy) -> Any:
    """What the policy's ``explain(params)`` says, JSON-ready; NO_EXPLANATION without one."""
    hook = getattr(policy.instance, "explain", None)
    if hook is None:
        return NO_EXPLANATION
    try:
        said = hook(dict(policy.params))
        return json.loads(json.dumps(said, default=str))
    except Exception as exc:  # a broken hook explains nothing; the rest still does
        return f"explain() failed: {type(exc).__name__}"


def _result(
    state: _State, ctx: RequestContext, before: tuple[dict[str, tuple[str, ...]], str, str]
) -> dict[str, Any]:
    headers, path, method = before
    after = ctx.headers.snapshot()
    result: dict[str, Any] = {}
    if state.answered is not None:
        result["request"] = f"is answered by {state.answered}"
    else:
        result["request"] = "goes upstream"
        changes: dict[str, Any] = {}
        changed = {n: ", ".join(v) for n, v in after.items() if headers.get(n) != v}
        removed = [n for n in headers if n not in after]
        if changed:
            changes["headers"] = changed
        if removed:
            changes["removedHeaders"] = removed
        if ctx.path != path:
            changes["path"] = ctx.path
        if ctx.method != method:
            changes["method"] = ctx.method
        result["staticChanges"] = changes
    if state.dynamic:
        result["decidedAtRunTime"] = state.dynamic
    if state.shadow:
        result["shadow"] = state.shadow
    return result
