"""Decisions visible to Envoy: selected request metadata sent as ext_proc dynamic metadata.

Policies share per-request metadata (``ctx.metadata``: ``jwt.sub``, ``apiKey.consumer``,
``rateLimit.decision``, and ``engine.shortCircuit``, which the chain executor writes when
a policy answers the request itself, and ``engine.shadow``, what ``mode: shadow`` entries
would have done: engine/shadow.py, and ``engine.timing``, each policy's time on routes with
``debug: {timing: true}``: engine/timing.py). :class:`EnvoyMetadata` copies the configured keys
whose values are scalars (str, int, float, bool) into
``ProcessingResponse.dynamic_metadata`` under one namespace, on every reply after a
policy phase ran. Envoy keeps them as the request's dynamic metadata when the ext_proc
filter lists the namespace::

    metadata_options:
      receiving_namespaces: {untyped: [policy_engine]}

and then an access log can print them, e.g.
``%DYNAMIC_METADATA(policy_engine:jwt.sub)% %DYNAMIC_METADATA(policy_engine:rateLimit.decision)%``
(RBAC, Lua and later filters can read them too). Only listed keys leave the engine: a
policy's other metadata (claims, internal state) stays private. Values that are not
scalars are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

__all__ = ["DEFAULT_KEYS", "DEFAULT_NAMESPACE", "EnvoyMetadata"]

DEFAULT_NAMESPACE: Final = "policy_engine"
DEFAULT_KEYS: Final = (
    "jwt.sub",
    "apiKey.consumer",
    "rateLimit.decision",
    "rateLimit.remaining",
    "engine.shortCircuit",
    "engine.shadow",
    "engine.timing",
)
# A type tuple, not ``str | int | float | bool``: that union would be built anew on every
# call (once per listed key per request).
_SCALARS: Final = (str, int, float, bool)


class EnvoyMetadata:
    """Which metadata keys go to Envoy, under which namespace."""

    __slots__ = ("keys", "namespace")

    def __init__(self, namespace: str = DEFAULT_NAMESPACE, keys: Sequence[str] = DEFAULT_KEYS):
        if not namespace:
            raise ValueError("the dynamic metadata namespace must not be empty")
        self.namespace = namespace
        self.keys = tuple(dict.fromkeys(k for k in keys if k))

    def fields(self, metadata: Mapping[str, Any]) -> dict[str, str | int | float | bool]:
        """The listed keys of ``metadata`` whose values are scalars."""
        found: dict[str, str | int | float | bool] = {}
        for key in self.keys:
            value = metadata.get(key)
            if isinstance(value, _SCALARS):
                found[key] = value
        return found

    def attach(self, reply: Any, metadata: Mapping[str, Any]) -> Any:
        """``reply`` (a ``ProcessingResponse``) with the fields added, if there are any.

        Returns a copy then: replies may be shared by many requests (the prebuilt
        pass-through, error and static-chain replies), so one request's metadata must
        never be written into them."""
        fields = self.fields(metadata)
        if not fields:
            return reply
        copy = type(reply)()
        copy.CopyFrom(reply)
        copy.dynamic_metadata.fields[self.namespace].struct_value.update(fields)
        return copy
