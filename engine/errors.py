"""Errors raised by the policy engine runtime.

Hierarchy::

    EngineError
    ├── DefinitionError   a policy-definition.yaml is malformed or fails the meta-schema
    ├── ConfigError       a route/chain configuration is invalid (carries every problem found)
    ├── RegistryError     a name + version is unknown, or registered twice
    ├── ConditionError    a CEL condition does not compile (config time)
    │   └── ConditionEvaluationError  a condition failed at request time (policy is skipped)
    ├── PolicyError       a policy raised or timed out while handling a request
    ├── ProtocolError     an ext_proc message is malformed or arrives out of order
    ├── ExplainError      a request description given to ``explain`` is invalid (names the field)
    └── TlsError          a certificate, key or CA file is missing, unreadable or mismatched

Every message names the file, route, policy and field involved so that an
operator can fix the input without reading engine code.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ConditionError",
    "ConditionEvaluationError",
    "ConfigError",
    "DefinitionError",
    "EngineError",
    "ExplainError",
    "PolicyError",
    "ProtocolError",
    "RegistryError",
    "TlsError",
]


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class DefinitionError(EngineError):
    """A policy definition is invalid; the message names the file and the field.

    ``errors`` holds every problem found, one self-contained line each (such as
    ``policies/x/v1.0.0/policy-definition.yaml: phases[0]: 'both' is not one of
    ['request', 'response']``); the message is those lines joined by newlines.
    Raising it with a message only is still fine: ``errors`` is then that message.
    """

    def __init__(self, message: str, errors: Sequence[str] = ()) -> None:
        self.errors = tuple(errors) if errors else (message,)
        super().__init__(message)


class ConfigError(EngineError):
    """A configuration is invalid.

    ``errors`` holds every problem found (validation never stops at the first),
    each a self-contained line such as
    ``routes[private].policies[0] jwtValidation v1.0.0: jwksUrl must be HTTPS``.
    """

    def __init__(self, source: str, errors: Sequence[str]) -> None:
        self.source = source
        self.errors = tuple(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} configuration error(s):\n{lines}")

    def lines(self) -> list[str]:
        """Each error prefixed with the source (the file): what operators are shown."""
        return [f"{self.source}: {error}" for error in self.errors]


class RegistryError(EngineError):
    """A policy name + version is missing from, or duplicated in, the registry."""


class ConditionError(EngineError):
    """A CEL condition failed to compile."""


class ConditionEvaluationError(ConditionError):
    """A compiled condition failed at request time: a missing key, a wrong type, or a
    result that is not a bool. The executor logs it and skips that policy."""


class PolicyError(EngineError):
    """A policy failed while handling a request (raised, timed out, bad return value)."""


class ProtocolError(EngineError):
    """An ext_proc message was malformed or arrived out of order."""


class ExplainError(EngineError):
    """A request description for ``explain`` (engine/explain.py) is invalid. ``field`` names
    the field (``headers``, ``route``, ...); the message reads ``<field>: <problem>``."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class TlsError(EngineError):
    """A TLS file (certificate, private key, CA) is missing, unreadable, not PEM, or the
    key does not match the certificate. The message names the file and the flag that
    gave it, never the key's content."""
