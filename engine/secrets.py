"""Secret parameters: which values are secret, and how they are kept out of every output.

A policy definition marks a parameter, or any schema nested in one (``properties``,
``additionalProperties``, ``items``), with ``secret``:

* ``secret: true``: the whole value is secret (apiKey's ``keys[].key``). Shown as
  :data:`MARKER`.
* ``secret: urlCredentials``: a URL string whose userinfo is secret (rateLimit v2's
  ``redisUrl``). Shown with the password replaced by :data:`MARKER`
  (``redis://user:<redacted>@host:6379/0``): scheme, user, host, port and path stay
  visible because operators need them to tell which backend an entry uses. A userinfo
  without a colon (``redis://token@host``) is redacted whole (``<redacted>@host``): many
  clients take a lone userinfo as the password.

:func:`secret_tree` turns a parameter spec into a :class:`SecretSpec` (None when nothing
in it is secret); :class:`engine.definition.PolicyDefinition` holds one per parameter
(``definition.secrets``). Everything else here works on those trees:

* :func:`redact_value` / :func:`redact_parameters` / :func:`redact_document`: a copy
  with every secret replaced, for anything that shows configuration (the control
  plane's ``GET /routes``).
* :func:`secret_strings` / :func:`document_secrets`: the secret strings a value or a
  document holds, for :func:`scrub`, which removes them from free text (a policy
  constructor's error, an engine's NACK, a log line) where their position is unknown.
* :func:`restore_document`: the round trip. A document read from the admin API and sent
  back carries :data:`MARKER` in secret fields; the marker means "keep the value this
  field has now", so an operator can change a route without knowing its keys. It is
  kept only where it cannot be taken for another field's value (same route, same entry
  index, same policy name and version, and, inside an array, the redacted array item
  unchanged, so two reordered keys never swap consumers); anywhere else it is an error
  naming the field.

Consequence: :data:`MARKER` itself can never be a secret's value through the admin API.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import SplitResult, unquote, urlsplit

from engine.errors import RegistryError

if TYPE_CHECKING:
    from engine.registry import PolicyRegistry

__all__ = [
    "MARKER",
    "MIN_BARE_SCRUB",
    "SECRET_SHOWN_AS",
    "SecretSpec",
    "document_secrets",
    "parameter_secrets",
    "parameters_secrets",
    "redact_document",
    "redact_message",
    "redact_parameters",
    "redact_url",
    "redact_value",
    "restore_document",
    "scrub",
    "secret_at",
    "secret_strings",
    "secret_tree",
]

MARKER: Final = "<redacted>"
"""What a secret (or a URL's password) is shown as."""

SECRET_SHOWN_AS: Final = "(secret, not shown)"
"""What a validation message says instead of quoting a secret value."""

MIN_BARE_SCRUB: Final = 6
""":func:`scrub` replaces a secret's quoted form (``'abc'``) whatever its length, its
bare form only from this length on: a three-letter key would otherwise be cut out of
every word of an error message that contains it, and the route and field names
errors must keep would become unreadable."""

SecretKind = Literal["value", "urlCredentials"]

_EMPTY: Final[Mapping[str, Any]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class SecretSpec:
    """Where the secrets are in one parameter's value: a tree shaped like its schema,
    holding only the branches that lead to a secret.

    ``kind`` is set when this value itself is secret; ``properties`` /
    ``additional`` / ``items`` are the subtrees of an object's named properties, its
    other properties, and an array's items.
    """

    kind: SecretKind | None = None
    properties: Mapping[str, SecretSpec] = field(default_factory=lambda: _EMPTY)
    additional: SecretSpec | None = None
    items: SecretSpec | None = None

    def child(self, part: str | int) -> SecretSpec | None:
        """The subtree of one step into the value (a property name or an array index)."""
        if isinstance(part, int):
            return self.items
        if part in self.properties:
            return self.properties[part]
        return self.additional  # JSON schema: only names `properties` does not list


def secret_tree(schema: Mapping[str, Any]) -> SecretSpec | None:
    """The :class:`SecretSpec` of a (meta-schema-valid) parameter spec; None when no
    part of it is marked ``secret``."""
    mark = schema.get("secret")
    kind: SecretKind | None = (
        "urlCredentials" if mark == "urlCredentials" else "value" if mark is True else None
    )
    properties: dict[str, SecretSpec] = {}
    for name, sub in (schema.get("properties") or {}).items():
        tree = secret_tree(sub)
        if tree is not None:
            properties[name] = tree
    extra = schema.get("additionalProperties")
    additional = secret_tree(extra) if isinstance(extra, Mapping) else None
    items_schema = schema.get("items")
    items = secret_tree(items_schema) if isinstance(items_schema, Mapping) else None
    if kind is None and not properties and additional is None and items is None:
        return None
    return SecretSpec(kind, MappingProxyType(properties), additional, items)


def parameter_secrets(specs: Mapping[str, Mapping[str, Any]]) -> Mapping[str, SecretSpec]:
    """Parameter name -> :class:`SecretSpec`, for the parameters that hold a secret."""
    trees = {name: secret_tree(spec) for name, spec in specs.items()}
    return MappingProxyType({name: tree for name, tree in trees.items() if tree is not None})


def secret_at(spec: SecretSpec | None, path: Iterable[str | int]) -> SecretSpec | None:
    """The subtree at ``path`` inside a value; a secret's own tree covers everything
    below it (a part of a secret is secret)."""
    for part in path:
        if spec is None or spec.kind is not None:
            return spec
        spec = spec.child(part)
    return spec


# --------------------------------------------------------------------------- URLs


def _url_parts(url: str) -> tuple[SplitResult, str, str] | None:
    """(parts, userinfo, host part) of ``url``; None when it does not parse."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    userinfo, at, host = parts.netloc.rpartition("@")
    return parts, (userinfo if at else ""), host


def redact_url(url: str) -> str:
    """``url`` with its credentials replaced: ``redis://u:pw@h:1/0`` ->
    ``redis://u:<redacted>@h:1/0``, ``redis://token@h`` -> ``redis://<redacted>@h``;
    a URL without userinfo is returned as is, one that does not parse as :data:`MARKER`."""
    split = _url_parts(url)
    if split is None:
        return MARKER
    parts, userinfo, host = split
    if not userinfo:
        return url
    return parts._replace(netloc=f"{_shown_userinfo(userinfo)}@{host}").geturl()


def _shown_userinfo(userinfo: str) -> str:
    user, colon, _ = userinfo.partition(":")
    return f"{user}:{MARKER}" if colon else MARKER


def _url_secrets(url: str) -> Iterator[str]:
    split = _url_parts(url)
    if split is None:
        yield url
        return
    _, userinfo, _ = split
    if not userinfo:
        return
    # The URL as written too: a short password (under MIN_BARE_SCRUB) quoted bare inside
    # it is still scrubbed with the URL around it.
    yield url
    user, colon, password = userinfo.partition(":")
    secret = password if colon else user
    if secret:
        yield secret
        yield unquote(secret)


# --------------------------------------------------------------------------- values


def redact_value(value: Any, spec: SecretSpec | None) -> Any:
    """A copy of ``value`` with every secret ``spec`` marks replaced.

    A value whose shape does not fit the tree (a string where an object holding a
    secret was expected) is replaced whole: it may well be the secret, misplaced.
    """
    if spec is None:
        return copy.deepcopy(value)
    if spec.kind == "urlCredentials":
        return redact_url(value) if isinstance(value, str) else MARKER
    if spec.kind == "value":
        return MARKER
    if isinstance(value, Mapping) and (spec.properties or spec.additional is not None):
        return {key: redact_value(child, spec.child(key)) for key, child in value.items()}
    if isinstance(value, list) and spec.items is not None:
        return [redact_value(child, spec.items) for child in value]
    return MARKER


def redact_parameters(
    params: Mapping[str, Any], secrets: Mapping[str, SecretSpec]
) -> dict[str, Any]:
    """A copy of one entry's ``parameters`` with its secrets replaced."""
    return {name: redact_value(value, secrets.get(name)) for name, value in params.items()}


def secret_strings(value: Any, spec: SecretSpec | None) -> Iterator[str]:
    """Every secret text inside ``value``: whole secrets' string and number leaves,
    a URL's password (raw and percent-decoded)."""
    if spec is None:
        return
    if spec.kind == "urlCredentials":
        if isinstance(value, str):
            yield from _url_secrets(value)
        else:
            yield from _leaves(value)
        return
    if spec.kind == "value":
        yield from _leaves(value)
        return
    if isinstance(value, Mapping) and (spec.properties or spec.additional is not None):
        for key, child in value.items():
            yield from secret_strings(child, spec.child(key))
    elif isinstance(value, list) and spec.items is not None:
        for child in value:
            yield from secret_strings(child, spec.items)
    else:
        yield from _leaves(value)  # misplaced: see redact_value


def _leaves(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int | float):
            yield str(item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def parameters_secrets(params: Any, secrets: Mapping[str, SecretSpec]) -> set[str]:
    """The secret strings of one entry's ``parameters`` (any parsed value)."""
    if not isinstance(params, Mapping) or not secrets:
        return set()
    found: set[str] = set()
    for name, tree in secrets.items():
        if name in params:
            found.update(secret_strings(params[name], tree))
    return found


# --------------------------------------------------------------------------- text


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret replaced by :data:`MARKER`: its
    ``repr`` always, the bare text from :data:`MIN_BARE_SCRUB` characters on.

    For free text whose origin cannot be traced to a field (a policy's own error
    message, a log line); where the field is known, redact the value instead.
    """
    values = sorted({s for s in secrets if s}, key=len, reverse=True)
    for value in values:
        text = text.replace(repr(value), repr(MARKER))
        if len(value) >= MIN_BARE_SCRUB:
            text = text.replace(value, MARKER)
    return text


def redact_message(message: str, instance: Any, spec: SecretSpec | None) -> str:
    """A validation message about ``instance`` (at a position whose tree is ``spec``),
    without the secrets it holds.

    jsonschema quotes the failing value as its ``repr`` (``'abc' is too short``): that
    quotation becomes :data:`SECRET_SHOWN_AS` for a value that is secret as a whole
    (``(secret, not shown) is too short``), else the redacted value's repr. Should a
    secret still show (a message quoting part of the value), the message is scrubbed.
    """
    if spec is None:
        return message
    redacted = redact_value(instance, spec)
    if redacted != instance:
        shown = SECRET_SHOWN_AS if redacted == MARKER else repr(redacted)
        message = message.replace(repr(instance), shown)
    return scrub(message, secret_strings(instance, spec))


# --------------------------------------------------------------------------- documents


def _entries(document: Any) -> Iterator[tuple[str, int, Mapping[str, Any]]]:
    """(route, index, entry) of every mapping entry of ``document["routes"]``."""
    routes = document.get("routes") if isinstance(document, Mapping) else None
    if not isinstance(routes, Mapping):
        return
    for route, spec in routes.items():
        policies = spec.get("policies") if isinstance(spec, Mapping) else None
        if not isinstance(policies, list):
            continue
        for index, entry in enumerate(policies):
            if isinstance(entry, Mapping):
                yield str(route), index, entry


def _secrets_of(entry: Mapping[str, Any], registry: PolicyRegistry) -> Mapping[str, SecretSpec]:
    name, version = entry.get("name"), entry.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        return _EMPTY
    try:
        return registry.get(name, version).definition.secrets
    except RegistryError:
        return _EMPTY


def redact_document(document: Mapping[str, Any], registry: PolicyRegistry) -> dict[str, Any]:
    """A deep copy of a route document (``{"routes": {key: {"policies": [...]}}}``, the
    config format) with the secret parameters of every entry replaced. Entries whose
    policy ``registry`` does not know are copied as they are."""
    out = copy.deepcopy(dict(document))
    for _, _, entry in _entries(out):
        secrets = _secrets_of(entry, registry)
        params = entry.get("parameters")
        if secrets and isinstance(params, Mapping):
            entry["parameters"] = redact_parameters(params, secrets)  # type: ignore[index]
    return out


def document_secrets(document: Any, registry: PolicyRegistry) -> frozenset[str]:
    """Every secret string a route document holds (for :func:`scrub`)."""
    found: set[str] = set()
    for _, _, entry in _entries(document):
        found |= parameters_secrets(entry.get("parameters"), _secrets_of(entry, registry))
    return frozenset(found)


def restore_document(
    submitted: Any, current: Mapping[str, Any] | None, registry: PolicyRegistry
) -> tuple[Any, list[str]]:
    """``submitted`` with each :data:`MARKER` in a secret field replaced by the value
    that field has in ``current``; returns (document, errors).

    Errors name route, entry, policy and field for each marker that has no value to
    keep (see the module docstring for when a value is kept); with ``current`` None
    nothing is kept and every marker in a secret field is an error (a document that
    must stand on its own, such as a watched config file). ``submitted`` is not
    changed; a document without markers comes back equal.
    """
    out = copy.deepcopy(submitted)
    errors: list[str] = []
    for route, index, entry in _entries(out):
        secrets = _secrets_of(entry, registry)
        params = entry.get("parameters")
        if not secrets or not isinstance(params, Mapping):
            continue
        key = (entry["name"], entry["version"])
        old = _entry_at(current, route, index) if current is not None else None
        old_params = old.get("parameters") if old is not None else None
        if old is None or (old.get("name"), old.get("version")) != key:
            old_params = None  # another policy there now: nothing of it to keep
        restorer = _Restorer(
            f"routes[{route}].policies[{index}] {key[0]} {key[1]}", current is not None, errors
        )
        for name, tree in secrets.items():
            if name in params:
                previous = (
                    old_params.get(name, _MISSING) if isinstance(old_params, Mapping) else _MISSING
                )
                params[name] = restorer.restore(params[name], previous, tree, name)  # type: ignore[index]
    return out, errors


class _Missing:
    """No current value at this position."""


_MISSING: Final = _Missing()


def _entry_at(document: Mapping[str, Any], route: str, index: int) -> Mapping[str, Any] | None:
    spec = (document.get("routes") or {}).get(route)
    policies = spec.get("policies") if isinstance(spec, Mapping) else None
    if isinstance(policies, list) and index < len(policies):
        entry = policies[index]
        return entry if isinstance(entry, Mapping) else None
    return None


@dataclass(slots=True)
class _Restorer:
    """Puts current values back in place of markers inside one entry's parameters."""

    prefix: str
    keeping: bool
    errors: list[str]

    def _missing(self, path: str, shown: str, instead: str) -> None:
        if self.keeping:
            reason = "this entry has no current value there to keep"
        else:
            reason = "no current value is kept here"
        self.errors.append(f"{self.prefix}: {path}: {shown} but {reason}; send {instead}")

    def restore(self, value: Any, old: Any, spec: SecretSpec, path: str) -> Any:
        """``value`` with its markers replaced from ``old`` (the same position now)."""
        if spec.kind == "value":
            if value != MARKER:
                return value
            if isinstance(old, _Missing):
                self._missing(path, f"is {MARKER!r} (how secrets are shown)", "the value itself")
                return value
            return old
        if spec.kind == "urlCredentials":
            return self._restore_url(value, old, path)
        if isinstance(value, Mapping) and (spec.properties or spec.additional is not None):
            old_map = old if isinstance(old, Mapping) else {}
            out: dict[str, Any] = {}
            for key, child in value.items():
                sub = spec.child(key)
                out[key] = (
                    child
                    if sub is None
                    else self.restore(child, old_map.get(key, _MISSING), sub, f"{path}.{key}")
                )
            return out
        if isinstance(value, list) and spec.items is not None:
            old_list = old if isinstance(old, list) else []
            restored: list[Any] = []
            for i, child in enumerate(value):
                previous: Any = old_list[i] if i < len(old_list) else _MISSING
                if not isinstance(previous, _Missing) and redact_value(previous, spec.items) != (
                    redact_value(child, spec.items)
                ):
                    # Kept values are taken by position, and only where the visible rest
                    # of the item is unchanged: a reordered list must never pair a kept
                    # key with another item's consumer.
                    previous = _MISSING
                restored.append(self.restore(child, previous, spec.items, f"{path}[{i}]"))
            return restored
        return value

    def _restore_url(self, value: Any, old: Any, path: str) -> Any:
        split = _url_parts(value) if isinstance(value, str) else None
        if split is None or MARKER not in split[1]:
            return value  # no marker where credentials go: the URL as written
        old_split = _url_parts(old) if isinstance(old, str) else None
        if old_split is None or not old_split[1] or _shown_userinfo(old_split[1]) != split[1]:
            self._missing(
                path,
                f"has {MARKER!r} as credentials (how they are shown; the user must be the "
                "current one)",
                "the URL with its credentials",
            )
            return value
        parts, _, host = split
        return parts._replace(netloc=f"{old_split[1]}@{host}").geturl()
