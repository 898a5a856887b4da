"""Route configuration: YAML (or an already-parsed mapping) -> validated :class:`Snapshot`.

Format::

    routes:
      <route key>:                 # the key Envoy sends for the route
        debug: {timing: false}     # optional; timing: per-policy time (engine/timing.py)
        policies:                  # ordered; [] is a pass-through route
          - name: setHeader
            version: v1.0.0
            enabled: true          # default true
            condition: 'request.path.startsWith("/api/")'   # optional CEL (engine/conditions.py)
            timeout: 500ms         # optional; async hooks only
            onError: failClosed    # failOpen | failClosed (default)
            errorStatus: 500       # failClosed status, 400-599 (default 500)
            mode: enforce          # enforce (default) | shadow: run, record, enforce nothing
            parameters: {...}      # validated against the policy definition
    unknownRoute:                  # optional: requests whose route key has no chain
      action: deny                 # deny (default) | allow (pass through unchanged)
      status: 404                  # deny only: 400-599 (default 404)

Loading happens in two passes, and nothing is published unless both pass:

1. Validate every route and entry (structure, registry lookup, parameters,
   CEL conditions, durations), collecting *all* errors.
2. Construct the policy instances. A :class:`~engine.policy.ParameterError` or
   ``ValueError`` from a constructor, or any other exception, is one more error.

Every error line names route, index, policy and field, e.g.
``routes[private].policies[0] jwtValidation v1.0.0: jwksUrl must be HTTPS``, and none
shows the value of a parameter its definition marks ``secret`` (:mod:`engine.secrets`):
schema messages show it redacted, a policy's own messages are scrubbed.
They are raised together as one :class:`~engine.errors.ConfigError`.

Instance identity: an instance is keyed by (route, name, version, canonical JSON
of the normalised parameters). Entries with the same key share one instance (two
routes never do: rate-limit buckets are per route), and with ``previous`` given an
instance with the same key is reused, so stateful policies (rate-limit buckets,
JWKS caches) survive hot reloads. Disabled entries are validated but not constructed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from engine.chain import (
    DENY_UNKNOWN_ROUTE,
    Chain,
    ChainPolicy,
    Snapshot,
    check_static_request,
    check_static_response,
    deny_unknown_route,
)
from engine.conditions import Condition, compile_condition
from engine.definition import data_problems, parse_duration
from engine.errors import ConditionError, ConfigError, PolicyError, RegistryError
from engine.policy import ImmediateResponse
from engine.registry import PolicyRegistry, RegisteredPolicy, instantiate
from engine.secrets import parameters_secrets, scrub
from engine.settle import checked_stat
from engine.yamlsafe import YamlError, load_yaml

__all__ = [
    "ENTRY_FIELDS",
    "canonical_json",
    "load_config",
    "load_config_file",
]

logger: Final = logging.getLogger("engine.config")

ENTRY_FIELDS: Final = frozenset(
    {
        "name",
        "version",
        "enabled",
        "condition",
        "timeout",
        "onError",
        "errorStatus",
        "mode",
        "parameters",
    }
)
_TOP_FIELDS: Final = frozenset({"routes", "unknownRoute"})
_UNKNOWN_ROUTE_FIELDS: Final = frozenset({"action", "status"})
_ROUTE_FIELDS: Final = frozenset({"policies", "debug"})
_DEBUG_FIELDS: Final = frozenset({"timing"})
_ON_ERROR: Final = {"failOpen": True, "failClosed": False}
_MODES: Final = {"enforce": False, "shadow": True}  # -> shadow


def canonical_json(value: Any) -> str:
    """Stable JSON text of ``value`` (sorted keys, no spaces); non-JSON values use repr.

    Only called on documents that passed :func:`~engine.definition.data_problems`
    (string keys, bounded depth and size), so sorting and recursion cannot fail.
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr
    )


_SHOW: Final = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 40
_SHOW.maxlist = _SHOW.maxdict = _SHOW.maxtuple = _SHOW.maxset = 4


def _show(value: Any) -> str:
    """A bounded repr for error lines: a 10 MB list is not an error message."""
    return _SHOW.repr(value)


@dataclass(slots=True)
class _Entry:
    """A chain entry that passed validation, not yet constructed."""

    route: str
    prefix: str
    policy: RegisteredPolicy
    params: dict[str, Any]
    enabled: bool
    condition: Condition | None
    timeout: float | None
    fail_open: bool
    error_status: int
    shadow: bool = False

    @property
    def key(self) -> str:
        """Identity of the policy instance this entry gets.

        Per route: two routes with identical rate-limit parameters must not share
        buckets. Stable across reloads, so an unchanged entry keeps its instance
        (and its state: buckets, JWKS cache) when the file is edited elsewhere.
        """
        params = canonical_json(self.params)
        # A shadow entry never shares an instance (rate-limit buckets) with an enforced one:
        # its runs must not change what is enforced.
        mode = " shadow" if self.shadow else ""
        return f"{self.route} {self.policy.name} {self.policy.version}{mode} {params}"


def _unknown(prefix: str, data: Mapping[Any, Any], allowed: frozenset[str]) -> list[str]:
    where = f"{prefix}: " if prefix else ""
    return [f"{where}unknown field {key!r}" for key in data if key not in allowed]


def _validate_entry(
    route: str, index: int, raw: Any, registry: PolicyRegistry, errors: list[str]
) -> _Entry | None:
    base = f"routes[{route}].policies[{index}]"
    if not isinstance(raw, Mapping):
        errors.append(f"{base}: must be a mapping with 'name' and 'version'")
        return None
    errors.extend(_unknown(base, raw, ENTRY_FIELDS))
    name, version = raw.get("name"), raw.get("version")
    prefix = base
    for field_name, value in (("name", name), ("version", version)):
        if value is None:
            errors.append(f"{base}: missing field {field_name!r}")
        elif not isinstance(value, str):
            errors.append(f"{base}: {field_name}: must be a string, got {_show(value)}")
    if isinstance(name, str) and isinstance(version, str):
        prefix = f"{base} {name} {version}"
    before = len(errors)

    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        errors.append(f"{prefix}: enabled: must be true or false, got {_show(enabled)}")

    condition: Condition | None = None
    if raw.get("condition") is not None:
        try:
            condition = compile_condition(raw["condition"])
        except ConditionError as exc:
            errors.append(f"{prefix}: condition: {exc}")

    timeout: float | None = None
    if raw.get("timeout") is not None:
        try:
            timeout = parse_duration(raw["timeout"])
        except ValueError as exc:
            errors.append(f"{prefix}: timeout: {exc}")
        else:
            if timeout <= 0:
                errors.append(f"{prefix}: timeout: must be greater than 0")

    on_error = raw.get("onError", "failClosed")
    if not isinstance(on_error, str) or on_error not in _ON_ERROR:  # a list is unhashable
        errors.append(f"{prefix}: onError: {_show(on_error)} is not one of failOpen, failClosed")

    status = raw.get("errorStatus", 500)
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        errors.append(f"{prefix}: errorStatus: must be an integer in 400-599, got {_show(status)}")

    mode = raw.get("mode", "enforce")
    if not isinstance(mode, str) or mode not in _MODES:
        errors.append(f"{prefix}: mode: {_show(mode)} is not one of enforce, shadow")

    params = raw.get("parameters")
    if params is None:
        params = {}
    elif not isinstance(params, Mapping):
        errors.append(f"{prefix}: parameters: must be a mapping, got {type(params).__name__}")

    if prefix == base:
        return None  # without a name and version there is no policy to check against
    try:
        policy = registry.get(name, version)  # type: ignore[arg-type]  # both str here
    except RegistryError as exc:
        errors.append(f"{prefix}: {exc}")
        return None
    definition = policy.definition
    if condition is not None and condition.reads_response and not definition.has_response_phase:
        errors.append(
            f"{prefix}: condition: reads response, but {name} runs only in the request "
            "phase, where there is no response yet"
        )
    normalised: dict[str, Any] = {}
    if isinstance(params, Mapping):
        normalised, problems = policy.definition.validate_parameters(params)
        errors.extend(f"{prefix}: {problem}" for problem in problems)
    if len(errors) != before:
        return None
    return _Entry(
        route=route,
        prefix=prefix,
        policy=policy,
        params=normalised,
        enabled=enabled,
        condition=condition,
        timeout=timeout,
        fail_open=_ON_ERROR[on_error],
        error_status=status,
        shadow=_MODES[mode],
    )


def _debug(where: str, spec: Mapping[str, Any], errors: list[str]) -> bool:
    """The route's ``debug`` setting: whether its requests are timed (engine/timing.py)."""
    raw = spec.get("debug")
    if raw is None:
        return False
    if not isinstance(raw, Mapping):
        errors.append(
            f"{where}.debug: must be a mapping such as {{timing: true}}, got {_show(raw)}"
        )
        return False
    errors.extend(_unknown(f"{where}.debug", raw, _DEBUG_FIELDS))
    timed = raw.get("timing", False)
    if not isinstance(timed, bool):
        errors.append(f"{where}.debug.timing: must be true or false, got {_show(timed)}")
        return False
    return timed


def _validate(
    document: Any, registry: PolicyRegistry, errors: list[str], timed: set[str]
) -> dict[str, list[_Entry]]:
    """The validated entries of each route; adds the routes with ``debug.timing`` to
    ``timed``."""
    if document is None:
        errors.append("configuration is empty (expected a mapping with 'routes')")
        return {}
    if not isinstance(document, Mapping):
        errors.append(f"expected a mapping with 'routes', got {type(document).__name__}")
        return {}
    errors.extend(_unknown("", document, _TOP_FIELDS))
    routes = document.get("routes")
    if routes is None:
        errors.append("missing field 'routes'")
        return {}
    if not isinstance(routes, Mapping):
        errors.append(f"routes: must be a mapping of route key -> route, got {_show(routes)}")
        return {}
    chains: dict[str, list[_Entry]] = {}
    for route, spec in routes.items():
        if not isinstance(route, str) or not route:
            errors.append(f"routes[{_show(route)}]: route key must be a non-empty string")
            continue
        where = f"routes[{route}]"
        if not isinstance(spec, Mapping):
            errors.append(f"{where}: must be a mapping with a 'policies' list")
            continue
        errors.extend(_unknown(where, spec, _ROUTE_FIELDS))
        if _debug(where, spec, errors):
            timed.add(route)
        policies = spec.get("policies")
        if policies is None:
            errors.append(f"{where}: missing field 'policies' (use [] for a pass-through route)")
            continue
        if not isinstance(policies, list):
            errors.append(f"{where}.policies: must be a list, got {type(policies).__name__}")
            continue
        entries = [
            _validate_entry(route, i, raw, registry, errors) for i, raw in enumerate(policies)
        ]
        chains[route] = [entry for entry in entries if entry is not None]
    return chains


def _unknown_route(document: Any, errors: list[str]) -> ImmediateResponse | None:
    """The ``unknownRoute`` setting: the deny response, or None for ``action: allow``."""
    raw = document.get("unknownRoute") if isinstance(document, Mapping) else None
    if raw is None:
        return DENY_UNKNOWN_ROUTE
    if not isinstance(raw, Mapping):
        errors.append(f"unknownRoute: must be a mapping with 'action', got {_show(raw)}")
        return DENY_UNKNOWN_ROUTE
    errors.extend(_unknown("unknownRoute", raw, _UNKNOWN_ROUTE_FIELDS))
    action = raw.get("action", "deny")
    status = raw.get("status", 404)
    if action == "allow":
        if "status" in raw:
            errors.append("unknownRoute: status: only allowed with action: deny")
        return None
    if action != "deny":
        errors.append(f"unknownRoute: action: {_show(action)} is not one of deny, allow")
    elif isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        errors.append(f"unknownRoute: status: must be an integer in 400-599, got {_show(status)}")
    else:
        return deny_unknown_route(status)
    return DENY_UNKNOWN_ROUTE


def _scrubbed(entry: _Entry, text: str) -> str:
    """``text`` (words of the policy's code, which may quote an answer built from the
    parameters) without the entry's secret values."""
    return scrub(text, parameters_secrets(entry.params, entry.policy.definition.secrets))


def _construct(entry: _Entry, errors: list[str]) -> object | None:
    instance, error = instantiate(entry.policy, entry.params)
    if error:
        errors.append(f"{entry.prefix}: {error}")
    return instance


@dataclass(frozen=True, slots=True)
class _Plan:
    """How one constructed instance runs: the phases its configuration uses and the
    actions it returns for every request (see engine/policy.py, "Optional, at config load")."""

    has_request: bool
    has_response: bool
    requires_request_body: bool
    requires_response_body: bool
    static_request: Any = None
    static_response: Any = None


def _plan(entry: _Entry, instance: object, errors: list[str]) -> _Plan | None:
    """Ask ``instance`` which phases it uses (``phases()``) and what its static actions are
    (``static_request()`` / ``static_response()``); None (and an error naming the entry)
    when it answers wrongly or raises."""
    definition = entry.policy.definition
    declared = {
        phase
        for phase, has in (
            ("request", definition.has_request_phase),
            ("response", definition.has_response_phase),
        )
        if has
    }
    try:
        used = set(declared)
        phases = getattr(instance, "phases", None)
        if phases is not None:
            answer = phases()
            if isinstance(answer, str) or not all(isinstance(p, str) for p in answer):
                raise PolicyError(f"phases() must return phase names, got {answer!r}")
            used = set(answer)
            if not used <= declared:
                raise PolicyError(
                    f"phases() returned {sorted(used - declared)}, not among the phases the "
                    f"definition declares ({sorted(declared)})"
                )
        bodies = _bodies(instance, definition)
        statics: dict[str, Any] = {}
        for phase, check in (
            ("request", check_static_request),
            ("response", check_static_response),
        ):
            method = getattr(instance, f"static_{phase}", None)
            if method is None or phase not in used:
                continue
            action = method()
            if action is None:
                used.discard(phase)  # does nothing in this phase for this configuration
                continue
            check(action)
            statics[phase] = action
    except PolicyError as exc:  # our own diagnosis of the answer
        errors.append(f"{entry.prefix}: {_scrubbed(entry, str(exc))}")
        return None
    except Exception as exc:  # the policy's method raised: its bug rejects this config
        errors.append(f"{entry.prefix}: {_scrubbed(entry, f'{type(exc).__name__}: {exc}')}")
        return None
    has_request, has_response = "request" in used, "response" in used
    return _Plan(
        has_request=has_request,
        has_response=has_response,
        # A response policy may read the request body: the flag goes only with the request
        # phase when the definition has one and this configuration dropped it.
        requires_request_body=definition.requires_request_body
        and (has_request or not definition.has_request_phase)
        and (bodies is None or "request" in bodies),
        requires_response_body=definition.requires_response_body
        and (has_response or not definition.has_response_phase)
        and (bodies is None or "response" in bodies),
        static_request=statics.get("request"),
        static_response=statics.get("response"),
    )


def _bodies(instance: object, definition: Any) -> set[str] | None:
    """The bodies ``instance`` says this configuration reads (``bodies()``), or None when
    it does not say (then the definition's ``requires*Body`` flags decide). Raises
    PolicyError for an answer that is not a subset of the bodies the definition requires."""
    method = getattr(instance, "bodies", None)
    if method is None:
        return None
    answer = method()
    if isinstance(answer, str) or not all(isinstance(b, str) for b in answer):
        raise PolicyError(f"bodies() must return body names, got {answer!r}")
    required = {
        body
        for body, needed in (
            ("request", definition.requires_request_body),
            ("response", definition.requires_response_body),
        )
        if needed
    }
    bodies = set(answer)
    if not bodies <= required:
        raise PolicyError(
            f"bodies() returned {sorted(bodies - required)}, not among the bodies the "
            f"definition requires ({sorted(required)})"
        )
    return bodies


def load_config(
    document: str | bytes | Mapping[str, Any],
    *,
    source: str,
    registry: PolicyRegistry,
    previous: Snapshot | None = None,
) -> Snapshot:
    """Validate ``document`` (YAML text or a parsed mapping) and build a :class:`Snapshot`.

    Raises :class:`ConfigError` (named ``source``) carrying every problem found.
    With ``previous``, instances with the same identity are reused and the new
    snapshot's ``version`` is ``previous.version + 1``.
    """
    if isinstance(document, str | bytes):
        try:
            document = load_yaml(document)
        except YamlError as exc:
            raise ConfigError(source, [f"YAML: {exc}"]) from exc
    # A parsed document (from a source other than YAML) gets the same structural
    # limits the YAML reader applies: string keys, bounded depth and size.
    problems = data_problems(document, numbers=False)
    if problems:
        raise ConfigError(source, problems)
    errors: list[str] = []
    timed: set[str] = set()
    validated = _validate(document, registry, errors, timed)
    unknown_route = _unknown_route(document, errors)
    if errors:
        raise ConfigError(source, errors)

    reusable = previous.instances() if previous is not None else {}
    built: dict[str, object] = {}
    routes: dict[str, Chain] = {}
    for route, entries in validated.items():
        compiled: list[ChainPolicy] = []
        for entry in entries:
            if not entry.enabled:
                continue
            key = entry.key
            instance = built.get(key, reusable.get(key))
            if instance is None:
                instance = _construct(entry, errors)
                if instance is None:
                    continue
            built[key] = instance
            plan = _plan(entry, instance, errors)
            if plan is None:
                continue
            if not plan.has_request and not plan.has_response:
                continue  # this configuration of the policy does nothing in either phase
            definition = entry.policy.definition
            compiled.append(
                ChainPolicy(
                    name=definition.name,
                    version=definition.version,
                    instance=instance,
                    condition=entry.condition,
                    timeout=entry.timeout,
                    fail_open=entry.fail_open,
                    error_status=entry.error_status,
                    has_request=plan.has_request,
                    has_response=plan.has_response,
                    requires_request_body=plan.requires_request_body,
                    requires_response_body=plan.requires_response_body,
                    instance_key=key,
                    static_request=plan.static_request,
                    static_response=plan.static_response,
                    shadow=entry.shadow,
                    params=MappingProxyType(entry.params),
                    secrets=frozenset(parameters_secrets(entry.params, definition.secrets)),
                )
            )
        routes[route] = Chain(route=route, policies=tuple(compiled), timing=route in timed)
    if errors:
        raise ConfigError(source, errors)
    digest = hashlib.sha256(canonical_json(document).encode()).hexdigest()
    return Snapshot(
        routes=MappingProxyType(routes),
        source=source,
        version=(previous.version + 1) if previous is not None else 1,
        content_hash=digest,
        unknown_route=unknown_route,
    )


def load_config_file(
    path: str | Path, registry: PolicyRegistry, previous: Snapshot | None = None
) -> Snapshot:
    """Read ``path`` and :func:`load_config` it; an unreadable file is a ConfigError too."""
    source = str(path)
    try:
        checked_stat(path)  # not a FIFO or device, not over MAX_FILE_BYTES
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror or exc}"]) from exc
    return load_config(text, source=source, registry=registry, previous=previous)
