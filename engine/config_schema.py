"""The JSON Schema (Draft 2020-12) of an engine's route configuration.

:func:`config_schema` turns the definitions compiled into an engine into one schema of the
file :mod:`engine.config` reads, for editors (``# yaml-language-server: $schema=...``)
and other tools: every top-level, route and chain-entry field, and each entry's
``parameters`` checked against its policy's parameter schema
(:attr:`~engine.definition.PolicyDefinition.parameters_schema`), chosen by the entry's
``name`` + ``version`` (one ``if``/``then`` per policy, which editors use to complete
parameters too). The builder writes it next to the engine as
``<engine>_config.schema.json``.

It is a subset of what the engine checks. Not expressible in JSON Schema, and so
accepted here but rejected by the engine:

* ``condition``: CEL syntax and type checking (:mod:`engine.conditions`, regular
  expressions in ``matches`` included), and a condition that reads the response on a
  request-only policy (a non-empty string is expressed);
* ``timeout``: a duration too long for a float (``999...9s``); the format and "greater than
  0" are expressed (a pattern);
* limits on the data itself (:func:`engine.definition.data_problems`): integers beyond
  64 bits, NaN and infinities, nesting depth, shared (alias) values, non-string keys;
* pattern semantics: the engine anchors ``$`` at the very end, as ECMA-262 does; a Python
  validator of this schema lets ``$`` match before a final newline;
* what a policy's constructor or its ``phases()`` / ``bodies()`` reject (pass 2 of
  :func:`engine.config.load_config`);
* an integer written as a float (``404.0``): JSON Schema's ``integer`` accepts it, the
  engine does not for ``errorStatus`` and ``unknownRoute.status``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from engine.definition import PolicyDefinition, version_key

__all__ = ["SCHEMA_DIALECT", "config_schema"]

SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"

# A duration greater than zero (engine.definition.parse_duration; the lookahead wants a
# non-zero digit).
_TIMEOUT_PATTERN: Final = r"^(?=[0-9.]*[1-9])[0-9]+(\.[0-9]+)?(ms|s|m|h)$"
_STATUS: Final = {"type": "integer", "minimum": 400, "maximum": 599}


def _entry_then(definition: PolicyDefinition) -> dict[str, Any]:
    parameters = dict(definition.parameters_schema)
    if definition.parameters_schema.get("required"):
        return {"required": ["parameters"], "properties": {"parameters": parameters}}
    # `parameters: null` (or none) is `{}` for a policy without required parameters.
    return {"properties": {"parameters": {"anyOf": [{"type": "null"}, parameters]}}}


def _entry(definitions: list[PolicyDefinition]) -> dict[str, Any]:
    names = sorted({d.name for d in definitions})
    keyed = [
        {
            "if": {
                "properties": {"name": {"const": d.name}, "version": {"const": d.version}},
                "required": ["name", "version"],
            },
            "then": _entry_then(d),
        }
        for d in definitions
    ]
    versions = {
        name: sorted((d.version for d in definitions if d.name == name), key=version_key)
        for name in names
    }
    known = [
        {
            "properties": {"name": {"const": name}, "version": {"enum": versions[name]}},
        }
        for name in names
    ]
    return {
        "type": "object",
        "description": "One policy of the chain, run in list order.",
        "required": ["name", "version"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "enum": names, "description": "the policy's name"},
            "version": {"type": "string", "description": "one compiled-in version of it"},
            "enabled": {"type": "boolean", "default": True},
            "condition": {
                "type": ["string", "null"],
                "pattern": r"\S",  # the engine wants a non-empty expression
                "description": "CEL expression; the policy runs only where it is true",
            },
            "timeout": {
                "type": ["string", "null"],
                "pattern": _TIMEOUT_PATTERN,
                "description": "async hooks only, e.g. 250ms, 1.5s, 2m, 1h",
            },
            "onError": {"enum": ["failOpen", "failClosed"], "default": "failClosed"},
            "errorStatus": {**_STATUS, "default": 500, "description": "status of failClosed"},
            "mode": {
                "enum": ["enforce", "shadow"],
                "default": "enforce",
                "description": "shadow: run and record what it would do, enforce nothing",
            },
            "parameters": {"type": ["object", "null"]},
        },
        # Only compiled-in name + version pairs (an unknown one has no parameter schema).
        "anyOf": known or [False],
        "allOf": keyed,
    }


def config_schema(
    definitions: Iterable[PolicyDefinition], *, title: str = "Policy engine route configuration"
) -> dict[str, Any]:
    """The schema of a route configuration for an engine with ``definitions``.

    Deterministic: definitions sorted by name and version, no timestamps.
    """
    ordered = sorted(definitions, key=lambda d: (d.name, version_key(d.version)))
    unknown_route: Mapping[str, Any] = {
        "type": ["object", "null"],
        "description": "requests whose route key has no chain",
        "additionalProperties": False,
        "properties": {
            "action": {"enum": ["deny", "allow"], "default": "deny"},
            "status": {**_STATUS, "default": 404, "description": "deny only"},
        },
        "if": {"required": ["action"], "properties": {"action": {"const": "allow"}}},
        "then": {"not": {"required": ["status"]}},
    }
    return {
        "$schema": SCHEMA_DIALECT,
        "title": title,
        "type": "object",
        "required": ["routes"],
        "additionalProperties": False,
        "properties": {
            "routes": {
                "type": "object",
                "description": "route key (as Envoy sends it) -> its policy chain",
                "propertyNames": {"minLength": 1},
                "additionalProperties": {"$ref": "#/$defs/route"},
            },
            "unknownRoute": dict(unknown_route),
        },
        "$defs": {
            "route": {
                "type": "object",
                "required": ["policies"],
                "additionalProperties": False,
                "properties": {
                    "policies": {
                        "type": "array",
                        "description": "ordered; [] is a pass-through route",
                        "items": {"$ref": "#/$defs/entry"},
                    },
                    "debug": {
                        "type": ["object", "null"],
                        "additionalProperties": False,
                        "properties": {
                            "timing": {
                                "type": "boolean",
                                "default": False,
                                "description": "per-policy time in the x-policy-engine-timing "
                                "response header and the engine.timing metadata",
                            }
                        },
                    },
                },
            },
            "entry": _entry(ordered),
        },
    }
