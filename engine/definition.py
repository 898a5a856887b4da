"""Policy definitions: the ``policy-definition.yaml`` beside each policy's code.

A definition is pure data. :func:`load_definition` reads one, validates it against
the meta-schema in ``definition_schema.json`` (every violation is reported at
once, each naming the file and the field path) and checks that each parameter's
``default`` satisfies its own spec. The result is a frozen
:class:`PolicyDefinition` holding one precompiled validator per parameter, so
:meth:`PolicyDefinition.validate_parameters` costs no schema compilation at
config time.

Parameter specs are a restricted JSON-schema (Draft 2020-12) fragment plus three
extensions: ``required: true|false`` on top-level parameters, ``errorMessage``
(replaces the validator's message for any failure of that parameter) and ``secret``
(``true`` or ``urlCredentials``, at any level: the value, or a URL's credentials, is
never shown; see :mod:`engine.secrets`). Validation messages about a secret value name
the field but show the value redacted. Supported
formats are ``uri`` (needs a scheme and a host) and ``duration`` (``250ms``,
``1.5s``, ``2m``, ``1h``).

YAML is read by :func:`engine.yamlsafe.load_yaml` (re-exported here), shared by
definitions, configuration and manifests.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError, best_match

from engine.errors import DefinitionError
from engine.secrets import (
    SecretSpec,
    parameter_secrets,
    parameters_secrets,
    redact_message,
    scrub,
    secret_at,
)
from engine.yamlsafe import MAX_DEPTH, YamlError, load_yaml

__all__ = [
    "DEFINITION_FILE",
    "PHASES",
    "PolicyDefinition",
    "YamlError",
    "data_problems",
    "example_failures",
    "format_path",
    "load_definition",
    "load_yaml",
    "parse_definition",
    "parse_duration",
    "version_key",
]

DEFINITION_FILE: Final = "policy-definition.yaml"
PHASES: Final = ("request", "response")

_DURATION_RE: Final = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_DURATION_UNITS: Final[Mapping[str, float]] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**63 - 1


# --------------------------------------------------------------------------- formats


def parse_duration(text: str) -> float:
    """``"250ms"`` -> 0.25, ``"1.5s"`` -> 1.5, ``"2m"`` -> 120.0, ``"1h"`` -> 3600.0.

    Raises :class:`ValueError` for anything else (no sign, no spaces, one unit).
    """
    match = _DURATION_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a duration (expected e.g. '250ms', '1s', '2m', '1h')")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):  # 400 nines overflow a float
        raise ValueError(f"{text[:40]!r}... is too long to be a duration")
    return seconds


def data_problems(
    value: Any, path: Sequence[str | int] = (), *, numbers: bool = True, budget: int = 1_000_000
) -> list[str]:
    """Problems that make ``value`` unfit as JSON-like data, one line each, naming the
    path (``limits.rate: must be a finite number, got nan``).

    YAML (and a parsed document handed over by a source) can carry ``.nan`` and
    ``.inf``, which JSON Schema's comparisons let through (every comparison with NaN is
    false, so ``exclusiveMinimum: 0`` accepts it): a rate limit of NaN never limits.
    Integers must fit in a signed 64-bit integer (what JSON, protobuf and CEL carry);
    a 4,000-digit one otherwise reaches a policy constructor as an ``OverflowError``.
    Also rejected: nesting deeper than :data:`engine.yamlsafe.MAX_DEPTH` (later stages
    recurse), mapping keys that are not strings, and more than ``budget`` values in all
    (a parsed document can share one list many times over, as a YAML alias bomb does).
    ``numbers=False`` checks only the structure. Stops after 20 problems.
    """
    problems: list[str] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, tuple(path))]
    base = len(path)
    while stack and len(problems) < 20:
        item, where = stack.pop()
        budget -= 1
        if budget < 0:
            problems.append("too many values (is some part shared many times over?)")
            break
        if numbers and isinstance(item, float) and not math.isfinite(item):
            problems.append(f"{_prefix(where)}must be a finite number, got {item}")
        elif numbers and isinstance(item, int) and not _INT_MIN <= item <= _INT_MAX:
            shown = (
                str(item) if item.bit_length() < 96 else f"an integer of {item.bit_length()} bits"
            )
            problems.append(f"{_prefix(where)}must fit in 64 bits, got {shown}")
        elif isinstance(item, Mapping | list | tuple):
            if len(where) - base >= MAX_DEPTH:
                problems.append(f"{_prefix(where)}nested more than {MAX_DEPTH} levels deep")
                continue
            if isinstance(item, Mapping):
                for key, child in item.items():
                    if not isinstance(key, str):
                        problems.append(f"{_prefix(where)}keys must be strings, got {key!r:.40}")
                    else:
                        stack.append((child, (*where, key)))
            else:
                stack.extend((child, (*where, i)) for i, child in enumerate(item))
    return sorted(problems)


def _prefix(path: Sequence[str | int]) -> str:
    name = format_path(path)
    return f"{name}: " if name else ""


def version_key(version: str) -> tuple[int, ...]:
    """Sort key of a meta-schema-valid version: ``"v1.10.0"`` -> ``(1, 10, 0)``."""
    return tuple(int(part) for part in version[1:].split("."))


_FORMATS = FormatChecker(formats=())


@_FORMATS.checks("uri")
def _is_uri(value: object) -> bool:
    if not isinstance(value, str):
        return True  # formats only constrain strings; `type` covers the rest
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return bool(parts.scheme and parts.netloc) and not any(c.isspace() for c in value)


@_FORMATS.checks("duration")
def _is_duration(value: object) -> bool:
    return not isinstance(value, str) or _DURATION_RE.match(value) is not None


def _end_anchored(pattern: str) -> str:
    """``pattern`` with each ``$`` anchor (outside a character class) made ``\\Z``.

    JSON Schema patterns are ECMA-262 regular expressions, where ``$`` matches only at
    the end of the input. Python's ``$`` also matches before a final newline, so
    ``^[a-z]+$`` would accept ``"token\\n"``: exactly the header-injection input a
    parameter pattern is meant to stop.
    """
    out: list[str] = []
    in_class = escaped = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[" and not in_class:
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        elif char == "$" and not in_class:
            out.append(r"\Z")
            continue
        out.append(char)
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def _compiled_pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(_end_anchored(pattern))


def _pattern_keyword(
    validator: Any, pattern: str, instance: Any, schema: Mapping[str, Any]
) -> Iterator[ValidationError]:
    if isinstance(instance, str) and _compiled_pattern(pattern).search(instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


# Parameter schemas: Draft 2020-12 with ECMA-262 semantics for `$` in `pattern`.
# (jsonschema's `extend` is unannotated; the result is a Draft 2020-12 validator class.)
_ParameterValidator: Final[type[Draft202012Validator]] = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, {"pattern": _pattern_keyword}
)


# The meta-schema only needs `regex` (is each `pattern` a valid regular expression).
_META_FORMATS = FormatChecker(formats=("regex",))


def _load_meta_validator() -> Draft202012Validator:
    text = resources.files("engine").joinpath("definition_schema.json").read_text("utf-8")
    schema = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=_META_FORMATS)


_META_VALIDATOR: Final = _load_meta_validator()


# --------------------------------------------------------------------------- errors


def format_path(parts: Iterable[str | int]) -> str:
    """``["phases", 0]`` -> ``phases[0]``; ``["limits", "burst"]`` -> ``limits.burst``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _leaf(error: ValidationError) -> ValidationError:
    """For anyOf/oneOf failures report the most relevant branch, not "is not valid
    under any of the given schemas"."""
    while error.validator in ("anyOf", "oneOf") and error.context:
        error = best_match(error.context)
    return error


def _error_lines(
    errors: Iterable[ValidationError],
    prefix: Iterable[str | int] = (),
    secret: SecretSpec | None = None,
) -> list[str]:
    """One line per error, ``path: message``; with ``secret`` (the tree of the value
    validated) a message never shows the secrets of the value it is about."""
    lines: list[tuple[str, str]] = []
    base = list(prefix)
    for error in errors:
        leaf = _leaf(error)
        path = format_path([*base, *leaf.absolute_path])
        message = leaf.message
        if secret is not None:
            message = redact_message(message, leaf.instance, secret_at(secret, leaf.absolute_path))
        lines.append((path, f"{path}: {message}" if path else message))
    # Sorted by path so that a definition's report is stable between runs.
    return [line for _, line in sorted(lines, key=lambda item: item[0])]


# --------------------------------------------------------------------------- definition


@dataclass(frozen=True, eq=False)
class PolicyDefinition:
    """One validated ``policy-definition.yaml``.

    Build it with :func:`load_definition` or :func:`parse_definition`, never
    directly. ``parameters`` holds the raw specs as written; ``parameters_schema``
    is the equivalent JSON schema of the whole parameter object (for tools and
    documentation); ``secrets`` maps each parameter holding a secret to where it is
    (:mod:`engine.secrets`). Treat every mapping here as read-only.
    """

    name: str
    version: str
    description: str
    phases: frozenset[str]
    requires_request_body: bool
    requires_response_body: bool
    parameters: Mapping[str, Mapping[str, Any]]
    examples: tuple[Mapping[str, Any], ...]
    source: str
    parameters_schema: Mapping[str, Any]
    secrets: Mapping[str, SecretSpec]
    _validators: Mapping[str, Draft202012Validator] = field(repr=False)

    @property
    def has_request_phase(self) -> bool:
        return "request" in self.phases

    @property
    def has_response_phase(self) -> bool:
        return "response" in self.phases

    @property
    def key(self) -> tuple[str, str]:
        """``(name, version)``: the registry key."""
        return (self.name, self.version)

    def validate_parameters(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Validate configured parameters against this definition.

        Returns ``(normalised, errors)``. ``normalised`` is a deep copy of
        ``params`` with top-level defaults filled in (it is only meaningful when
        ``errors`` is empty). ``errors`` lists every problem, each starting with
        the parameter path: ``jwksUrl must be HTTPS`` (the spec's
        ``errorMessage``), ``rate: -1 is less than the minimum of 0``,
        ``missing required parameter(s): a, b``, ``unknown parameter 'foo'``.
        No error shows a secret parameter's value (``keys[0].key: '<redacted>' is
        too short``).
        """
        given: object = params  # callers may pass any parsed YAML/JSON
        if not isinstance(given, Mapping):
            return {}, [f"parameters must be a mapping, not {type(given).__name__}"]
        errors: list[str] = []
        missing = sorted(
            name
            for name, spec in self.parameters.items()
            if _is_required(spec) and name not in params
        )
        if missing:
            errors.append(f"missing required parameter(s): {', '.join(missing)}")
        normalised: dict[str, Any] = {}
        for name in sorted(params, key=str):
            value = params[name]
            validator = self._validators.get(name) if isinstance(name, str) else None
            if validator is None:
                errors.append(f"unknown parameter {name!r}")
                continue
            unfit = data_problems(value, [name])
            if unfit:
                # These lines quote numbers and keys; a secret's are scrubbed.
                shown = parameters_secrets({name: value}, self.secrets)
                errors.extend(scrub(line, shown) for line in unfit)
                continue
            problems = list(validator.iter_errors(value))
            if problems:
                custom = self.parameters[name].get("errorMessage")
                if custom is not None:
                    errors.append(f"{name} {custom}")
                else:
                    errors.extend(
                        _error_lines(problems, prefix=[name], secret=self.secrets.get(name))
                    )
                continue
            normalised[name] = copy.deepcopy(value)
        for name, spec in self.parameters.items():
            if name not in normalised and name not in params and "default" in spec:
                normalised[name] = copy.deepcopy(spec["default"])
        return normalised, errors

    def check_examples(self) -> list[str]:
        """Run the definition's ``examples`` against the parameter schema; return one
        line per example that does not behave as declared (empty when all pass).

        Schema only: :meth:`engine.registry.RegisteredPolicy.check_examples` also runs
        the policy's constructor, which may reject what a schema cannot express.
        """
        failures: list[str] = []
        for index, example in enumerate(self.examples):
            _, errors = self.validate_parameters(example["parameters"])
            failures += example_failures(index, example, errors)
        return failures


def example_failures(index: int, example: Mapping[str, Any], errors: Sequence[str]) -> list[str]:
    """The verdict on one example, given the errors its parameters produced."""
    label = f"examples[{index}] ({example['description']})"
    if example["valid"] and errors:
        return [f"{label}: expected valid, got: {'; '.join(errors)}"]
    if not example["valid"] and not errors:
        return [f"{label}: expected an error, got none"]
    expected = example.get("error")
    if (
        not example["valid"]
        and expected is not None
        and not any(expected in error for error in errors)
    ):
        return [f"{label}: expected an error containing {expected!r}, got: {'; '.join(errors)}"]
    return []


def _is_required(spec: Mapping[str, Any]) -> bool:
    # `required: [...]` (the JSON-schema list form on an object-typed parameter)
    # constrains the object's properties, not whether the parameter is given.
    return spec.get("required") is True


def _value_schema(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON schema of one parameter's value: the spec minus our extensions."""
    return {
        k: v
        for k, v in spec.items()
        if k != "errorMessage" and not (k == "required" and isinstance(v, bool))
    }


def parse_definition(data: Any, source: str) -> PolicyDefinition:
    """Validate already-parsed definition data; ``source`` names it in every error.

    Raises :class:`DefinitionError` listing every meta-schema violation and every
    parameter ``default`` that fails its own spec.
    """
    if not isinstance(data, Mapping):
        kind = "empty" if data is None else type(data).__name__
        message = f"{source}: expected a mapping at the top level, got {kind}"
        raise DefinitionError(message, [message])
    errors = data_problems(data) or _error_lines(_META_VALIDATOR.iter_errors(data))
    if errors:
        lines = [f"{source}: {line}" for line in errors]
        raise DefinitionError("\n".join(lines), lines)

    specs: dict[str, Mapping[str, Any]] = dict(data.get("parameters") or {})
    validators: dict[str, Draft202012Validator] = {}
    problems: list[str] = []
    for name, spec in specs.items():
        schema = _value_schema(spec)
        validator = _ParameterValidator(schema, format_checker=_FORMATS)
        validators[name] = validator
        if "default" in spec:
            if _is_required(spec):
                problems.append(f"parameters.{name}: a required parameter cannot have a default")
            problems.extend(
                _error_lines(
                    validator.iter_errors(spec["default"]), ["parameters", name, "default"]
                )
            )
    if problems:
        lines = [f"{source}: {line}" for line in problems]
        raise DefinitionError("\n".join(lines), lines)

    parameters_schema = {
        "type": "object",
        "properties": {name: _value_schema(spec) for name, spec in specs.items()},
        "required": sorted(n for n, s in specs.items() if _is_required(s)),
        "additionalProperties": False,
    }
    return PolicyDefinition(
        name=data["name"],
        version=data["version"],
        description=data["description"],
        phases=frozenset(data["phases"]),
        requires_request_body=bool(data.get("requiresRequestBody", False)),
        requires_response_body=bool(data.get("requiresResponseBody", False)),
        parameters=MappingProxyType(specs),
        examples=tuple(data.get("examples") or ()),
        source=source,
        parameters_schema=MappingProxyType(parameters_schema),
        secrets=parameter_secrets(specs),
        _validators=MappingProxyType(validators),
    )


def load_definition(path: str | Path) -> PolicyDefinition:
    """Read and validate ``path`` (a ``policy-definition.yaml``).

    Raises :class:`DefinitionError` naming the file for an unreadable file, a YAML
    error (with line and column) or any validation problem.
    """
    source = str(path)
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        message = f"{source}: cannot read: {exc.strerror or exc}"
        raise DefinitionError(message, [message]) from exc
    except UnicodeDecodeError as exc:
        message = f"{source}: cannot read: not UTF-8: {exc}"
        raise DefinitionError(message, [message]) from exc
    try:
        data = load_yaml(text)
    except YamlError as exc:
        message = f"{source}: {exc}"
        raise DefinitionError(message, [message]) from exc
    return parse_definition(data, source)
