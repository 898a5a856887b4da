"""Compiled policy chains and the executor that runs them for one request.

Reading order for one request: the ext_proc layer takes ``store.current`` once,
looks up ``snapshot.chain_for(route)``, then calls :func:`run_request` with the
request headers (and body, if the chain needs it) and later :func:`run_response`.
Each returns the *net* change against what Envoy sent, which the ext_proc layer
turns into one mutation.

Execution rules:

* Policies run in configured order. An entry whose condition is false is
  skipped. A condition that fails at runtime (a missing map key, a type error) is
  that entry's failure, logged (logger ``engine.chain``): ``failClosed`` answers
  ``errorStatus``, ``failOpen`` skips the entry. Never a silent skip of an auth policy.
* Each action is applied to the context before the next policy runs, so later
  policies (and their conditions) see earlier rewrites. Within one action:
  removals first, then sets, then appends (an appended value is a separate value of
  the header, see :class:`~engine.policy.Headers`). Header names are lower-cased.
* A request policy that did not process a request (condition false or failed,
  or it failed open) may still have headers removed from it: those its optional
  ``strip_request_headers(headers)`` names (e.g. jwtValidation v2's claim headers,
  which a client must never supply whether or not the policy ran).
* An :class:`~engine.policy.ImmediateResponse` ends the request phase: later
  policies never run and the upstream is not contacted.
* Header names must be RFC 9110 tokens; header values, path and method must not contain
  CR, LF or NUL and must encode as UTF-8. An action breaking that is the policy's failure
  (below), so the reply to Envoy can always be built.
* A hook that raises, times out (``timeout``, async hooks only) or returns the
  wrong type is a failure: ``failOpen`` logs and continues; ``failClosed`` answers
  ``errorStatus`` with ``{"error": "policy <name> <version> failed"}``. Nothing
  raised by a policy escapes (only the task's own cancellation propagates).
* A ``mode: shadow`` entry (``ChainPolicy.shadow``) runs (condition and ``timeout``
  apply) against a private copy of the context, and what it would have done is only
  recorded (:mod:`engine.shadow`): its immediate response does not end the chain, its
  changes and metadata writes are dropped, it strips nothing, and its failures never fail
  the request, whatever ``onError`` says. Later entries see the request as the enforced
  entries left it. A phase with a shadow entry is never answered from a static outcome
  (the decision is recorded per request); static actions of the phase's other entries
  still apply without a hook call.
* The response phase runs the *same configured order* as the request phase, not
  the reverse. That is our decision: one order is simpler to reason about and
  matches how operators read the config. ``metadata`` is the same mapping across
  both phases; the last writer of a key wins.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, TypeVar

from engine import metrics, shadow, timing
from engine.conditions import Condition
from engine.errors import ConditionEvaluationError, PolicyError
from engine.metadata import CURRENT_POLICY, RequestMetadata
from engine.policy import (
    Headers,
    ImmediateResponse,
    RequestContext,
    RequestModifications,
    ResponseContext,
    ResponseModifications,
)

__all__ = [
    "DENY_UNKNOWN_ROUTE",
    "SHORT_CIRCUIT_KEY",
    "Chain",
    "ChainPolicy",
    "RequestOutcome",
    "RequestState",
    "ResponseOutcome",
    "ResponseState",
    "Snapshot",
    "apply_request",
    "check_static_request",
    "check_static_response",
    "count_static_runs",
    "deny_unknown_route",
    "failure_response",
    "run_request",
    "run_response",
]

logger: Final = logging.getLogger("engine.chain")

SHORT_CIRCUIT_KEY: Final = "engine.shortCircuit"
"""Metadata key naming the policy (``name version``) whose immediate response ended the
request phase."""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, eq=False)
class ChainPolicy:
    """One enabled chain entry, ready to run. ``instance`` may be shared with
    other entries of the same route and with later snapshots that configure the same
    (route, name, version, params)."""

    name: str
    version: str
    instance: Any
    condition: Condition | None = None
    timeout: float | None = None
    fail_open: bool = False
    error_status: int = 500
    has_request: bool = False
    has_response: bool = False
    requires_request_body: bool = False
    requires_response_body: bool = False
    instance_key: str = ""
    static_request: RequestModifications | ImmediateResponse | None = None
    """The action the instance returns for every request (``static_request()``, validated at
    config load): the executor applies it without calling ``on_request``. None: call the hook."""
    static_response: ResponseModifications | None = None
    """Likewise for ``static_response()`` / ``on_response``."""
    shadow: bool = False
    """``mode: shadow``: run and record what it would do (engine/shadow.py), enforce nothing."""
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """The validated parameters (defaults filled in), read only by ``explain``
    (engine/explain.py); the instance has its own copy."""
    secrets: frozenset[str] = frozenset()
    """The secret strings of its parameters (those its definition marks ``secret``,
    engine/secrets.py): kept out of what the engine hands back to Envoy (the HTTP
    transport's carried request state)."""

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True, slots=True, eq=False)
class Chain:
    """The policies of one route. ``policies`` holds every enabled entry in order;
    the phase tuples are the subsets that declare that phase."""

    route: str
    policies: tuple[ChainPolicy, ...] = ()
    timing: bool = False
    """``debug: {timing: true}``: time each entry of each request (engine/timing.py). Such a
    chain is never answered from static outcomes, and asks for the response headers (the
    timing header goes there) whenever it has an entry."""

    request_policies: tuple[ChainPolicy, ...] = field(init=False)
    request_head: tuple[ChainPolicy, ...] = field(init=False)
    """The request policies before the first one that needs the request body: they run at
    ``request_headers`` (and may reject the request there, before any buffering)."""
    request_rest: tuple[ChainPolicy, ...] = field(init=False)
    """The request policies from the first one that needs the request body on."""
    body_failure: ImmediateResponse | None = field(init=False)
    """The answer when the request body the chain needs cannot be had (Envoy ignored the
    mode override, or the body is cut short): the failure of the first entry that needs
    the request body, always fail closed (nothing after it could run)."""
    response_policies: tuple[ChainPolicy, ...] = field(init=False)
    requires_request_body: bool = field(init=False)
    requires_response_body: bool = field(init=False)
    needs_response: bool = field(init=False)
    """Whether Envoy must send the response at all: a response policy, or an entry
    that reads the response body."""
    static_request_outcome: RequestOutcome | None = field(init=False)
    """The request phase's net change when it is the same for every request (every request
    policy static, unconditional, header/path/method changes only; no request body needed):
    computed here, at config load. None: the phase runs per request."""
    static_response_outcome: ResponseOutcome | None = field(init=False)
    """Likewise for the response phase (no response body needed)."""
    fully_static: bool = field(init=False)
    """Both phases static (or absent): a request needs no context at all, only the replies
    built from the static outcomes."""
    replies: dict[Any, Any] = field(init=False, default_factory=dict, repr=False)
    """The ext_proc layer's replies built from the static outcomes, memoized per chain
    (engine/transport/grpc_service.py): built once, shared by every request, never mutated."""
    untimed: Chain | None = field(init=False, default=None, repr=False)
    """For a timing chain: the same chain without timing, which the timed executor runs one
    entry at a time (so the untimed path checks a single flag and nothing more)."""
    secrets: frozenset[str] = field(init=False, repr=False)
    """The secret strings of every entry's parameters (:attr:`ChainPolicy.secrets`)."""

    def __post_init__(self) -> None:
        # Computed once here so the per-request path reads plain attributes.
        # A response policy may read the request body, so the body flags look at
        # every enabled entry, whatever its phases.
        set_ = object.__setattr__
        set_(self, "request_policies", tuple(p for p in self.policies if p.has_request))
        split = next(
            (i for i, p in enumerate(self.request_policies) if p.requires_request_body),
            len(self.request_policies),
        )
        set_(self, "request_head", self.request_policies[:split])
        set_(self, "request_rest", self.request_policies[split:])
        # An enforced entry's failure when there is one: the body that cannot be had is an
        # Envoy setting, not a shadow entry's fault, but the answer names who needed it.
        body_policies = [p for p in self.policies if p.requires_request_body]
        body_policy = next((p for p in body_policies if not p.shadow), None) or next(
            iter(body_policies), None
        )
        set_(self, "body_failure", None if body_policy is None else failure_response(body_policy))
        set_(self, "response_policies", tuple(p for p in self.policies if p.has_response))
        set_(self, "requires_request_body", any(p.requires_request_body for p in self.policies))
        set_(self, "requires_response_body", any(p.requires_response_body for p in self.policies))
        set_(self, "secrets", frozenset().union(*(p.secrets for p in self.policies)))
        timed = self.timing and bool(self.policies)
        set_(
            self,
            "needs_response",
            self.has_response_phase or self.requires_response_body or timed,
        )
        if timed:
            set_(self, "untimed", Chain(route=self.route, policies=self.policies))
        # A timed chain runs (and times) every request: nothing is answered from a static
        # outcome.
        request_outcome = None
        if not timed and not self.requires_request_body:
            request_outcome = _static_request_outcome(self.request_policies)
        response_outcome = None
        if not timed and not self.requires_response_body:
            response_outcome = _static_response_outcome(self.response_policies)
        set_(self, "static_request_outcome", request_outcome)
        set_(self, "static_response_outcome", response_outcome)
        set_(
            self,
            "fully_static",
            request_outcome is not None
            and (response_outcome is not None or not self.needs_response),
        )

    @property
    def has_response_phase(self) -> bool:
        """Whether the chain has response policies (see also :attr:`needs_response`)."""
        return bool(self.response_policies)


def deny_unknown_route(status: int) -> ImmediateResponse:
    """The answer to a request whose route key has no chain (``unknownRoute: deny``)."""
    body = json.dumps({"error": "no policy chain for this route"}).encode()
    return ImmediateResponse(status=status, headers={"content-type": "application/json"}, body=body)


DENY_UNKNOWN_ROUTE: Final = deny_unknown_route(404)
"""The default for unknown route keys: a missing chain is a deployment mismatch, and
passing such requests through would run them with no policy at all (fail closed)."""


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """One immutable, validated configuration: route key -> chain.

    ``version`` counts publications from one source lineage (previous + 1);
    ``content_hash`` is the sha256 of the canonical configuration document.
    ``unknown_route`` answers requests whose route key is unknown or missing; ``None``
    means they pass through unchanged (``unknownRoute: {action: allow}``).
    """

    routes: Mapping[str, Chain]
    source: str = "<empty>"
    version: int = 0
    content_hash: str = ""
    unknown_route: ImmediateResponse | None = DENY_UNKNOWN_ROUTE

    def chain_for(self, route: str) -> Chain | None:
        return self.routes.get(route)

    def instances(self) -> dict[str, Any]:
        """``instance_key`` -> policy instance, for reuse by the next snapshot."""
        return {
            p.instance_key: p.instance
            for chain in self.routes.values()
            for p in chain.policies
            if p.instance_key
        }


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """Net result of the request phase. ``None`` fields are unchanged.

    When ``immediate`` is set the other fields are irrelevant: answer the client.
    """

    immediate: ImmediateResponse | None = None
    set_headers: Mapping[str, str] = field(default_factory=dict)
    append_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    path: str | None = None
    method: str | None = None
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class ResponseOutcome:
    """Net result of the response phase. ``immediate`` replaces the whole response
    (only a failClosed failure produces it)."""

    immediate: ImmediateResponse | None = None
    set_headers: Mapping[str, str] = field(default_factory=dict)
    append_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    status: int | None = None
    body: bytes | None = None


# Shared by every pass-through request, so their mappings must be read-only.
_NO_CHANGE_REQUEST: Final = RequestOutcome(set_headers=MappingProxyType({}))
_NO_CHANGE_RESPONSE: Final = ResponseOutcome(set_headers=MappingProxyType({}))


# --------------------------------------------------------------------------- static actions


def check_static_request(action: object) -> None:
    """Validate what a policy's ``static_request()`` returned, once, at config load: the
    checks the executor would otherwise make on every request. Raises PolicyError."""
    if isinstance(action, ImmediateResponse):
        _check_immediate(action)
    elif isinstance(action, RequestModifications):
        _check_request(action)
    else:
        raise PolicyError(f"static_request() returned {type(action).__name__}, not a RequestAction")


def check_static_response(action: object) -> None:
    """Validate what ``static_response()`` returned (see :func:`check_static_request`)."""
    if not isinstance(action, ResponseModifications):
        raise PolicyError(
            f"static_response() returned {type(action).__name__}, not a ResponseModifications"
        )
    _check_response(action)


def _static_actions(
    policies: tuple[ChainPolicy, ...], attr: str
) -> list[RequestModifications | ResponseModifications] | None:
    """The static actions (``attr``: ``static_request`` / ``static_response``) of
    ``policies`` if the phase is the same for every request, else None: every policy
    unconditional and static with header (and path, method, status) changes only, the body
    left alone."""
    actions: list[RequestModifications | ResponseModifications] = []
    for policy in policies:
        action = getattr(policy, attr)
        if (
            policy.shadow  # its decision is recorded per request; its action never applies
            or policy.condition is not None
            or not isinstance(action, RequestModifications | ResponseModifications)
            or action.body is not None
        ):
            return None
        actions.append(action)
    return actions


def _net_headers(
    actions: list[RequestModifications | ResponseModifications],
) -> tuple[dict[str, str], tuple[tuple[str, str], ...], tuple[str, ...]]:
    """The net header change of ``actions`` applied in order, as the (set, append, remove)
    of an outcome (see :func:`_header_diff`). Within an action the executor's order:
    removals, then sets, then appends (:func:`_apply_headers`). Setting a header to a value
    it already has, or removing one that is absent, is then in the mutation where the
    per-request diff would leave it out; Envoy's result is the same."""
    net: dict[str, tuple[bool, list[str]]] = {}  # name -> (replaces the client's, values)
    for action in actions:
        for name in action.remove_headers:
            net[name.lower()] = (True, [])
        for name, value in action.set_headers.items():
            net[name.lower()] = (True, [value])
        for name, value in action.append_headers.items():
            replaces, values = net.get(name.lower(), (False, []))
            net[name.lower()] = (replaces, [*values, value])
    set_headers: dict[str, str] = {}
    appends: list[tuple[str, str]] = []
    removes: list[str] = []
    for name, (replaces, values) in net.items():
        if not replaces:
            appends.extend((name, value) for value in values)
        elif not values:
            removes.append(name)
        else:
            set_headers[name] = values[0]
            appends.extend((name, value) for value in values[1:])
    return set_headers, tuple(appends), tuple(removes)


def _last_set(values: Iterable[_T | None]) -> _T | None:
    """The last value that is not None (what a later action's path, method or status
    leaves after an earlier one's)."""
    last = None
    for value in values:
        if value is not None:
            last = value
    return last


def _static_request_outcome(policies: tuple[ChainPolicy, ...]) -> RequestOutcome | None:
    """The request phase's net change if it is the same for every request, else None."""
    actions = _static_actions(policies, "static_request")
    if actions is None:
        return None
    set_headers, appends, removes = _net_headers(actions)
    path = _last_set(getattr(a, "path", None) for a in actions)
    method = _last_set(getattr(a, "method", None) for a in actions)
    if not (set_headers or appends or removes) and path is None and method is None:
        return _NO_CHANGE_REQUEST
    return RequestOutcome(
        set_headers=MappingProxyType(set_headers),
        append_headers=appends,
        remove_headers=removes,
        path=path,
        method=method,
    )


def _static_response_outcome(policies: tuple[ChainPolicy, ...]) -> ResponseOutcome | None:
    """The response phase's net change if it is the same for every request, else None."""
    actions = _static_actions(policies, "static_response")
    if actions is None:
        return None
    set_headers, appends, removes = _net_headers(actions)
    status = _last_set(getattr(a, "status", None) for a in actions)
    if not (set_headers or appends or removes) and status is None:
        return _NO_CHANGE_RESPONSE
    return ResponseOutcome(
        set_headers=MappingProxyType(set_headers),
        append_headers=appends,
        remove_headers=removes,
        status=status,
    )


def _ran_static(route: str, policy: ChainPolicy) -> None:
    """Count one run of a static policy (metrics only: duration 0, as no hook ran)."""
    if metrics.enabled():
        metrics.policy_ran(route, policy.name, policy.version, 0.0)


def count_static_runs(chain: Chain, phase: str) -> None:
    """Count the runs of a static phase answered from its outcome (see :func:`_ran_static`)."""
    if not metrics.enabled():
        return
    for policy in chain.request_policies if phase == "request" else chain.response_policies:
        _ran_static(chain.route, policy)


# --------------------------------------------------------------------------- executor


@dataclass(frozen=True, slots=True)
class RequestState:
    """What a request looked like at one moment: the base a :class:`RequestOutcome` is
    computed against (see :func:`run_request`)."""

    headers: dict[str, tuple[str, ...]]
    path: str
    method: str
    body: bytes | None

    @classmethod
    def of(cls, ctx: RequestContext) -> RequestState:
        return cls(ctx.headers.snapshot(), ctx.path, ctx.method, ctx.body)


async def run_request(
    chain: Chain,
    ctx: RequestContext,
    *,
    policies: tuple[ChainPolicy, ...] | None = None,
    since: RequestState | None = None,
) -> RequestOutcome:
    """Run ``chain``'s request policies against ``ctx`` (mutated in place).

    ``policies`` runs only those (``chain.request_head`` at the headers, then
    ``chain.request_rest`` with the body); the outcome is the net change against ``since``
    (default: ``ctx`` as it was when called), so two parts can make one outcome.
    Never raises for a policy's fault; see the module docstring for the rules.
    """
    if chain.untimed is not None:
        return await _timed_request(chain, chain.untimed, ctx, policies, since)
    policies = chain.request_policies if policies is None else policies
    if not policies and since is None:
        return _NO_CHANGE_REQUEST
    before = since if since is not None else RequestState.of(ctx)
    for policy in policies:
        if policy.shadow:
            await _shadow_request(chain.route, policy, ctx)
            continue
        condition = policy.condition
        if condition is not None:
            runs = _runs(
                policy, ctx.request_id, "request", condition.evaluate_request, ctx, chain.route
            )
            if isinstance(runs, ImmediateResponse):
                return RequestOutcome(immediate=runs)
            if not runs:
                failure = _strip_unprocessed(policy, ctx)
                if failure is not None:
                    return RequestOutcome(immediate=failure)
                continue
        static = policy.static_request
        if static is not None:  # validated at config load; no hook to call
            _ran_static(chain.route, policy)
            if isinstance(static, ImmediateResponse):
                _short_circuited(policy, chain.route, ctx, static)
                return RequestOutcome(immediate=static)
            apply_request(ctx, static)
            continue
        try:
            action = await _call(policy, chain.route, policy.instance.on_request, ctx)
            if action is None:
                continue
            if isinstance(action, ImmediateResponse):
                _check_immediate(action)
                _short_circuited(policy, chain.route, ctx, action)
                return RequestOutcome(immediate=action)
            if not isinstance(action, RequestModifications):
                raise PolicyError(f"returned {type(action).__name__}, not a RequestAction")
            _check_request(action)
            apply_request(ctx, action)
        except asyncio.CancelledError:
            if _cancelling():
                raise
            failure = _failed(policy, ctx.request_id, "request", None, chain.route)
        except Exception as exc:
            failure = _failed(policy, ctx.request_id, "request", exc, chain.route)
        else:
            continue
        if failure is None:  # failed open: the request goes on without this policy
            failure = _strip_unprocessed(policy, ctx)
        if failure is not None:
            return RequestOutcome(immediate=failure)
    set_headers, append_headers, remove_headers = _header_diff(before.headers, ctx.headers)
    return RequestOutcome(
        set_headers=set_headers,
        append_headers=append_headers,
        remove_headers=remove_headers,
        path=ctx.path if ctx.path != before.path else None,
        method=ctx.method if ctx.method != before.method else None,
        body=ctx.body if ctx.body != before.body else None,
    )


async def run_response(
    chain: Chain,
    ctx: ResponseContext,
    *,
    policies: tuple[ChainPolicy, ...] | None = None,
    since: ResponseState | None = None,
) -> ResponseOutcome:
    """Run ``chain``'s response policies (same order as configured) against ``ctx``.

    ``policies`` and ``since`` as for :func:`run_request` (the timed executor runs one
    entry at a time)."""
    if chain.untimed is not None:
        return await _timed_response(chain, chain.untimed, ctx, policies, since)
    policies = chain.response_policies if policies is None else policies
    if not policies and since is None:
        return _NO_CHANGE_RESPONSE
    if since is None:
        original_headers, status, body = ctx.headers.snapshot(), ctx.status, ctx.body
    else:
        original_headers, status, body = since.headers, since.status, since.body
    request_id = ctx.request.request_id
    for policy in policies:
        if policy.shadow:
            await _shadow_response(chain.route, policy, ctx)
            continue
        condition = policy.condition
        if condition is not None:
            runs = _runs(
                policy, request_id, "response", condition.evaluate_response, ctx, chain.route
            )
            if isinstance(runs, ImmediateResponse):
                return ResponseOutcome(immediate=runs)
            if not runs:
                continue
        static = policy.static_response
        if static is not None:  # validated at config load; no hook to call
            _ran_static(chain.route, policy)
            _apply_response(ctx, static)
            continue
        try:
            action = await _call(policy, chain.route, policy.instance.on_response, ctx)
            if action is None:
                continue
            if not isinstance(action, ResponseModifications):
                raise PolicyError(f"returned {type(action).__name__}, not a ResponseAction")
            _check_response(action)
            _apply_response(ctx, action)
        except asyncio.CancelledError:
            if _cancelling():
                raise
            failure = _failed(policy, request_id, "response", None, chain.route)
        except Exception as exc:
            failure = _failed(policy, request_id, "response", exc, chain.route)
        else:
            continue
        if failure is not None:
            return ResponseOutcome(immediate=failure)
    set_headers, append_headers, remove_headers = _header_diff(original_headers, ctx.headers)
    return ResponseOutcome(
        set_headers=set_headers,
        append_headers=append_headers,
        remove_headers=remove_headers,
        status=ctx.status if ctx.status != status else None,
        body=ctx.body if ctx.body != body else None,
    )


@dataclass(frozen=True, slots=True)
class ResponseState:
    """What a response looked like at one moment (see :func:`run_response`)."""

    headers: dict[str, tuple[str, ...]]
    status: int
    body: bytes | None

    @classmethod
    def of(cls, ctx: ResponseContext) -> ResponseState:
        return cls(ctx.headers.snapshot(), ctx.status, ctx.body)


async def _timed_request(
    chain: Chain,
    untimed: Chain,
    ctx: RequestContext,
    policies: tuple[ChainPolicy, ...] | None,
    since: RequestState | None,
) -> RequestOutcome:
    """:func:`run_request` of a ``debug: {timing: true}`` chain: each entry run alone (on
    ``untimed``) and timed into ``engine.timing`` (engine/timing.py); an immediate response
    carries the timing header."""
    before = since if since is not None else RequestState.of(ctx)
    for policy in chain.request_policies if policies is None else policies:
        started = time.perf_counter_ns()
        outcome = await run_request(untimed, ctx, policies=(policy,), since=before)
        timing.record(
            ctx.metadata, policy.name, time.perf_counter_ns() - started, shadow=policy.shadow
        )
        if outcome.immediate is not None:
            return replace(outcome, immediate=timing.with_header(outcome.immediate, ctx.metadata))
    return await run_request(untimed, ctx, policies=(), since=before)


async def _timed_response(
    chain: Chain,
    untimed: Chain,
    ctx: ResponseContext,
    policies: tuple[ChainPolicy, ...] | None,
    since: ResponseState | None,
) -> ResponseOutcome:
    """:func:`run_response` of a timing chain: each entry timed, then the timing header
    (request and response entries) set on the response."""
    before = since if since is not None else ResponseState.of(ctx)
    for policy in chain.response_policies if policies is None else policies:
        started = time.perf_counter_ns()
        outcome = await run_response(untimed, ctx, policies=(policy,), since=before)
        timing.record(
            ctx.metadata,
            policy.name,
            time.perf_counter_ns() - started,
            response=True,
            shadow=policy.shadow,
        )
        if outcome.immediate is not None:
            return replace(outcome, immediate=timing.with_header(outcome.immediate, ctx.metadata))
    text = timing.value(ctx.metadata)
    if text is not None:
        ctx.headers[timing.TIMING_HEADER] = text
    return await run_response(untimed, ctx, policies=(), since=before)


async def _shadow_request(route: str, policy: ChainPolicy, ctx: RequestContext) -> None:
    """Run shadow entry ``policy`` on a copy of ``ctx`` and record what it would have done
    (engine/shadow.py). Changes nothing in ``ctx`` but the ``engine.shadow`` metadata; never
    raises for the policy's fault."""
    request_id = ctx.request_id
    decision: shadow.ShadowDecision
    condition = policy.condition
    if condition is not None:
        runs = _shadow_runs(policy, request_id, "request", condition.evaluate_request, ctx, route)
        if runs is not True:
            if runs is not False:
                shadow.record(route, policy.name, policy.version, request_id, ctx.metadata, runs)
            return
    static = policy.static_request
    if static is not None:  # validated at config load
        _ran_static(route, policy)
        decision = shadow.request_decision(static)
    else:
        copy = RequestContext(
            headers=ctx.headers.copy(),
            path=ctx.path,
            method=ctx.method,
            request_id=request_id,
            route=ctx.route,
            metadata=RequestMetadata(dict(ctx.metadata)),
            body=ctx.body,
            client_address=ctx.client_address,
        )
        try:
            action = await _call(policy, route, policy.instance.on_request, copy)
            if isinstance(action, ImmediateResponse):
                _check_immediate(action)
            elif isinstance(action, RequestModifications):
                _check_request(action)
            elif action is not None:
                raise PolicyError(f"returned {type(action).__name__}, not a RequestAction")
            decision = shadow.request_decision(action)
        except asyncio.CancelledError:
            if _cancelling():
                raise
            decision = _shadow_failed(policy, request_id, "request", None, route)
        except Exception as exc:
            decision = _shadow_failed(policy, request_id, "request", exc, route)
    shadow.record(route, policy.name, policy.version, request_id, ctx.metadata, decision)


async def _shadow_response(route: str, policy: ChainPolicy, ctx: ResponseContext) -> None:
    """:func:`_shadow_request` for the response phase."""
    request_id = ctx.request.request_id
    decision: shadow.ShadowDecision
    condition = policy.condition
    if condition is not None:
        runs = _shadow_runs(policy, request_id, "response", condition.evaluate_response, ctx, route)
        if runs is not True:
            if runs is not False:
                shadow.record(route, policy.name, policy.version, request_id, ctx.metadata, runs)
            return
    static = policy.static_response
    if static is not None:
        _ran_static(route, policy)
        decision = shadow.response_decision(static)
    else:
        copy = ResponseContext(
            request=ctx.request,
            status=ctx.status,
            headers=ctx.headers.copy(),
            metadata=RequestMetadata(dict(ctx.metadata)),
            body=ctx.body,
        )
        try:
            action = await _call(policy, route, policy.instance.on_response, copy)
            if isinstance(action, ResponseModifications):
                _check_response(action)
            elif action is not None:
                raise PolicyError(f"returned {type(action).__name__}, not a ResponseAction")
            decision = shadow.response_decision(action)
        except asyncio.CancelledError:
            if _cancelling():
                raise
            decision = _shadow_failed(policy, request_id, "response", None, route)
        except Exception as exc:
            decision = _shadow_failed(policy, request_id, "response", exc, route)
    shadow.record(route, policy.name, policy.version, request_id, ctx.metadata, decision)


def _strip_unprocessed(policy: ChainPolicy, ctx: RequestContext) -> ImmediateResponse | None:
    """Remove the headers a policy asks to strip from requests it did not process
    (its condition was false or failed, or it failed open); see
    :class:`~engine.policy.StripsRequestHeaders`. A stripper that fails is a policy
    failure (``onError`` applies)."""
    strip = getattr(policy.instance, "strip_request_headers", None)
    if strip is None:
        return None
    try:
        names = tuple(strip(ctx.headers))
        _check_names(names)
        _apply_headers(ctx.headers, {}, {}, names)
    except Exception as exc:
        return _failed(policy, ctx.request_id, "request", exc, ctx.route)
    return None


def _runs(  # noqa: PLR0917 - one call site per phase; keywords would only add noise
    policy: ChainPolicy,
    request_id: str,
    phase: str,
    check: Callable[[_T], bool],
    ctx: _T,
    route: str,
) -> bool | ImmediateResponse:
    """Whether ``policy``'s condition holds. A condition that fails at request time (a
    missing map key, a type error) is that policy's failure, not a silent skip: a guarded
    auth policy must never be bypassed because a client left a header out. failClosed
    answers ``errorStatus`` (returned here); failOpen logs and skips the policy. Counted:
    a false condition as a skip, a failing one as a failure of kind ``condition_error``."""
    try:
        held = check(ctx)
    except ConditionEvaluationError as exc:
        failure = _failed(
            policy, request_id, phase, PolicyError(str(exc)), route, kind="condition_error"
        )
        return False if failure is None else failure
    if not held:
        metrics.policy_skipped(route, policy.name, policy.version, "condition")
    return held


_ACTIONS: Final = (RequestModifications, ImmediateResponse, ResponseModifications)
"""What a plain (not async) hook returns: checked before the slower ``isawaitable``."""


async def _call(policy: ChainPolicy, route: str, hook: Callable[[_T], Any], ctx: _T) -> object:
    # Names the policy in the log line when a metadata value it writes is converted.
    writer = CURRENT_POLICY.set(policy.label)
    started = time.perf_counter() if metrics.enabled() else 0.0
    try:
        result = hook(ctx)
        if result is None or isinstance(result, _ACTIONS) or not inspect.isawaitable(result):
            return result
        awaitable: Awaitable[object] = result
        if policy.timeout is None:
            return await awaitable
        deadline = asyncio.timeout(policy.timeout)
        try:
            async with deadline:
                return await awaitable
        except TimeoutError:
            if deadline.expired():  # ours, not a TimeoutError raised inside the policy
                raise PolicyError(f"timed out after {policy.timeout:g}s") from None
            raise
    finally:
        CURRENT_POLICY.reset(writer)
        if started:
            metrics.policy_ran(route, policy.name, policy.version, time.perf_counter() - started)


def _cancelling() -> bool:
    """True when the running task itself is being cancelled (client went away,
    server shutting down): that cancellation must propagate. A CancelledError
    raised by policy code on its own is just a policy failure."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _failed(
    policy: ChainPolicy,
    request_id: str,
    phase: str,
    exc: BaseException | None,
    route: str = "",
    *,
    kind: str | None = None,
) -> ImmediateResponse | None:
    """Log (and count) a policy failure; return the response to send if it fails closed.
    ``kind`` overrides the failure kind the exception implies (metrics label)."""
    reason, implied, exc_info = _failure_reason(exc)
    metrics.policy_failed(route, policy.name, policy.version, kind or implied)
    mode = "failOpen: continuing" if policy.fail_open else "failClosed: rejecting"
    log = logger.warning if policy.fail_open else logger.error
    log(
        "request %s: %s policy %s %s (%s)",
        request_id,
        phase,
        policy.label,
        reason,
        mode,
        exc_info=exc_info,
    )
    if policy.fail_open:
        return None
    return failure_response(policy)


def _failure_reason(exc: BaseException | None) -> tuple[str, str, BaseException | None]:
    """``(reason, kind, exc_info)`` of a failure: the log text, the metrics kind and the
    exception whose traceback is worth logging (None for our own diagnoses)."""
    if exc is None:
        return "was cancelled", "cancelled", None
    if isinstance(exc, PolicyError):  # our own diagnosis: no traceback needed
        kind = "timeout" if str(exc).startswith("timed out") else "bad_result"
        return f"failed: {exc}", kind, None
    try:
        reason = f"failed: {type(exc).__name__}: {exc}"
    except Exception:  # a broken __str__ must not turn a failure into a crash
        reason = f"failed: {type(exc).__name__}"
    return reason, "exception", exc


def _shadow_failed(
    policy: ChainPolicy,
    request_id: str,
    phase: str,
    exc: BaseException | None,
    route: str,
    *,
    kind: str | None = None,
) -> shadow.ShadowDecision:
    """A shadow entry's failure: counted like any failure, never a response. Its INFO line
    is :func:`engine.shadow.record`'s (rate-limited); the traceback goes to DEBUG."""
    reason, implied, exc_info = _failure_reason(exc)
    metrics.policy_failed(route, policy.name, policy.version, kind or implied)
    logger.debug(
        "request %s: %s shadow policy %s %s",
        request_id,
        phase,
        policy.label,
        reason,
        exc_info=exc_info,
    )
    return shadow.failed(kind or implied, f"{phase} {reason}")


def _shadow_runs(  # noqa: PLR0917 - as _runs: one call site per phase
    policy: ChainPolicy,
    request_id: str,
    phase: str,
    check: Callable[[_T], bool],
    ctx: _T,
    route: str,
) -> bool | shadow.ShadowDecision:
    """Whether shadow entry ``policy``'s condition holds, or the failed decision when it
    cannot be evaluated (see :func:`_runs`)."""
    try:
        held = check(ctx)
    except ConditionEvaluationError as exc:
        return _shadow_failed(
            policy, request_id, phase, PolicyError(str(exc)), route, kind="condition_error"
        )
    if not held:
        metrics.policy_skipped(route, policy.name, policy.version, "condition")
    return held


def _short_circuited(
    policy: ChainPolicy, route: str, ctx: RequestContext, action: ImmediateResponse
) -> None:
    """Count the immediate response and name its policy in the metadata (which Envoy can
    log: see engine/transport/grpc_service.py, dynamic metadata)."""
    metrics.policy_short_circuit(route, policy.name, policy.version, action.status)
    ctx.metadata[SHORT_CIRCUIT_KEY] = policy.label


def failure_response(policy: ChainPolicy) -> ImmediateResponse:
    """What a failClosed failure of ``policy`` answers: ``errorStatus`` and a JSON body."""
    body = json.dumps({"error": f"policy {policy.label} failed"}).encode()
    return ImmediateResponse(
        status=policy.error_status,
        headers={"content-type": "application/json"},
        body=body,
    )


# --------------------------------------------------------------------------- applying actions


# An RFC 9110 token (section 5.6.2): a header name (section 5.1) or a method (section 9.1).
# Anything else (space, ':', CR, LF, NUL, non-ASCII) is not a name Envoy accepts;
# pseudo-headers change through path/method/status instead.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_CHARS: Final = re.compile("[\r\n\x00]")
# No request target has whitespace or a control character (RFC 9112 section 3.2, RFC 3986):
# a space would end the request line Envoy writes to an HTTP/1 upstream.
_BAD_PATH_CHARS: Final = re.compile("[\x00-\x20\x7f]")


def _check_text(what: str, text: object) -> None:
    """Reject a header value (or path, method) Envoy could not carry unchanged.

    CR/LF/NUL would split or truncate the header; a lone surrogate cannot be encoded as
    UTF-8, so the reply to Envoy could not even be built. Checking here, where the action
    is applied, names the policy and makes it that policy's failure (failOpen/failClosed).
    """
    if not isinstance(text, str):
        raise PolicyError(f"{what}: must be str, got {type(text).__name__}")
    if _BAD_CHARS.search(text):
        raise PolicyError(f"{what}: {text!r} contains CR, LF or NUL")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PolicyError(f"{what}: {text!r} cannot be encoded as UTF-8") from None


def _check_name(what: str, name: object) -> None:
    if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
        raise PolicyError(f"{what}: {name!r} is not a valid header name")


def _check_headers(what: str, headers: Mapping[str, str]) -> None:
    if not isinstance(headers, Mapping):
        raise PolicyError(f"{what}: must be a mapping, got {type(headers).__name__}")
    for name, value in headers.items():
        _check_name(what, name)
        _check_text(f"{what}[{name}]", value)


def _check_names(names: tuple[str, ...]) -> None:
    if not isinstance(names, tuple | list):
        raise PolicyError(f"remove_headers must be a tuple of str, got {names!r}")
    for name in names:
        _check_name("remove_headers", name)


def _check_body(body: object) -> None:
    if body is not None and not isinstance(body, bytes):
        raise PolicyError(f"body must be bytes, got {type(body).__name__}")


def _check_immediate(action: ImmediateResponse) -> None:
    if isinstance(action.status, bool) or not isinstance(action.status, int):
        raise PolicyError(f"ImmediateResponse.status must be int, got {action.status!r}")
    if not 200 <= action.status <= 599:
        raise PolicyError(f"ImmediateResponse.status {action.status} is not in 200-599")
    _check_headers("ImmediateResponse.headers", action.headers)
    if not isinstance(action.body, bytes):
        raise PolicyError(f"ImmediateResponse.body must be bytes, got {type(action.body).__name__}")


def _check_changes(action: RequestModifications | ResponseModifications) -> None:
    _check_body(action.body)
    _check_headers("set_headers", action.set_headers)
    _check_headers("append_headers", action.append_headers)
    _check_names(action.remove_headers)


def _check_request(action: RequestModifications) -> None:
    """Validate a request action before anything is applied, so a bad action never leaves
    the context half-changed (the policy's failure instead).

    A new ``path`` must be an origin-form request target (RFC 9112 section 3.2.1: it starts
    with ``/``, as the ``:path`` of an ``http``/``https`` request does, RFC 9113 section
    8.3.1) without whitespace or control characters. The asterisk form (``*``, a server-wide
    OPTIONS) and absolute or authority forms are refused: Envoy has already routed the request
    by its path, and ``:authority`` is a header of its own. A new ``method`` must be an
    RFC 9110 token (section 9.1)."""
    _check_changes(action)
    for attr in ("path", "method"):
        value = getattr(action, attr)
        if value is not None:
            if not isinstance(value, str) or not value:
                raise PolicyError(f"{attr} must be a non-empty str, got {value!r}")
            _check_text(attr, value)
    path, method = action.path, action.method
    if path is not None:
        if not path.startswith("/"):
            raise PolicyError(f"path {path!r} is not an origin-form path (must start with '/')")
        if _BAD_PATH_CHARS.search(path):
            raise PolicyError(f"path {path!r} contains whitespace or a control character")
    if method is not None and _TOKEN.fullmatch(method) is None:
        raise PolicyError(f"method {method!r} is not an RFC 9110 token")


def _check_response(action: ResponseModifications) -> None:
    _check_changes(action)
    status = action.status
    if status is not None and (
        isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599
    ):
        raise PolicyError(f"status must be an int in 200-599, got {status!r}")


def _apply_headers(
    headers: Headers,
    set_headers: Mapping[str, str],
    append_headers: Mapping[str, str],
    remove_headers: tuple[str, ...],
) -> None:
    """Apply validated changes: removals first, then sets, then appends."""
    for name in remove_headers:
        headers.pop(name.lower(), None)
    for name, value in set_headers.items():
        headers[name.lower()] = value
    for name, value in append_headers.items():
        headers.add(name.lower(), value)


def apply_request(ctx: RequestContext, action: RequestModifications) -> None:
    """Apply a validated request action (see :func:`_check_request`): removals, sets,
    appends, then path, method, body. ``engine.explain`` applies static actions with it."""
    _apply_headers(ctx.headers, action.set_headers, action.append_headers, action.remove_headers)
    if action.path is not None:
        ctx.path = action.path
    if action.method is not None:
        ctx.method = action.method
    if action.body is not None:
        ctx.body = action.body


def _apply_response(ctx: ResponseContext, action: ResponseModifications) -> None:
    """Apply a validated response action (see :func:`_check_response`)."""
    _apply_headers(ctx.headers, action.set_headers, action.append_headers, action.remove_headers)
    if action.status is not None:
        ctx.status = action.status
    if action.body is not None:
        ctx.body = action.body


def _header_diff(
    before: Mapping[str, tuple[str, ...]], after: Headers
) -> tuple[dict[str, str], tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Net header change as (set, append, remove).

    A header whose values are unchanged is left out (repeated ``set-cookie`` lines stay
    exactly as Envoy sent them). Values added after the existing ones are appends; any
    other change sets the first value (replacing all) and appends the rest.
    """
    set_headers: dict[str, str] = {}
    appends: list[tuple[str, str]] = []
    for name, values in after.snapshot().items():
        old = before.get(name)
        if old == values:
            continue
        if old is not None and values[: len(old)] == old:
            appends.extend((name, value) for value in values[len(old) :])
        else:
            set_headers[name] = values[0]
            appends.extend((name, value) for value in values[1:])
    removed = tuple(name for name in before if name not in after)
    return set_headers, tuple(appends), removed
