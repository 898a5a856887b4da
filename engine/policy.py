"""The policy contract: what every policy implements and what it may return.

A policy is a class in a ``policy.py`` module next to its ``policy-definition.yaml``.
The engine constructs it once per configured chain entry, when configuration
loads, with the parameters already validated against the definition's schema
(defaults filled in)::

    class Policy:
        def __init__(self, params: Mapping[str, Any]) -> None: ...

        # implement the hook(s) for the phases the definition declares
        async def on_request(self, ctx: RequestContext) -> RequestAction | None: ...
        async def on_response(self, ctx: ResponseContext) -> ResponseAction | None: ...

Rules of the contract:

* ``__init__`` runs at config time. It may reject parameters that the JSON
  schema cannot express by raising :class:`ParameterError`; the message becomes
  a config error that names the route, the policy and the field.
* Hooks may be ``async def`` or plain ``def``. Plain hooks run inline on the
  event loop, so they must be quick and never do I/O; anything that waits
  (network, files) must be ``async``. Only async hooks can be cut short by the
  per-policy ``timeout``.
* Per-request state lives in the context (``ctx.metadata``), never on ``self``
  or in module globals: one instance serves many concurrent requests. State that
  belongs to the policy instance (a JWKS cache, rate-limit buckets) is fine.
* Returning ``None`` means "no change, continue".
* ``ctx.metadata`` is shared by every policy of the request, from the request
  phase into the response phase; the last writer of a key wins. Keep values
  JSON-like (str, int, float, bool, None, lists, dicts) so CEL conditions can
  read them.
* Header names are lower-case everywhere (Envoy sends and expects them so).
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, runtime_checkable

__all__ = [
    "Headers",
    "ImmediateResponse",
    "Metadata",
    "ParameterError",
    "RequestAction",
    "RequestContext",
    "RequestModifications",
    "RequestPolicy",
    "ResponseAction",
    "ResponseContext",
    "ResponseModifications",
    "ResponsePolicy",
]

Headers: TypeAlias = dict[str, str]
"""Lower-case header name -> value. Repeated headers are joined with ``", "``."""

Metadata: TypeAlias = MutableMapping[str, Any]
"""Per-request metadata shared by all policies of one request (last writer wins)."""


class ParameterError(ValueError):
    """Raised by a policy's ``__init__`` for a parameter the schema cannot check.

    ``field`` names the parameter (dotted path for nested ones) so the config
    error reads ``...: <field>: <message>``.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(slots=True)
class RequestContext:
    """What a request-phase policy sees.

    The engine applies each policy's modifications to this context before the
    next policy runs, so later policies see earlier rewrites.
    ``body`` is ``None`` unless the chain declared that it needs the request body
    (``requiresRequestBody``) and the request has one. ``client_address`` is the
    client's IP as Envoy established it (its ``source.address``), never a value the
    client wrote into ``x-forwarded-for``; empty when unknown.
    """

    headers: Headers
    path: str
    method: str
    request_id: str
    route: str
    metadata: Metadata = field(default_factory=dict)
    body: bytes | None = None
    client_address: str = ""


@dataclass(slots=True)
class ResponseContext:
    """What a response-phase policy sees.

    ``request`` is the request as it was sent upstream (after request-phase
    rewrites); treat it as read-only. ``body`` is ``None`` unless the chain needs
    the response body. ``metadata`` is the same mapping the request phase used.
    """

    request: RequestContext
    status: int
    headers: Headers
    metadata: Metadata
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class RequestModifications:
    """Changes to the request before it goes upstream. Unset fields mean "unchanged".

    ``set_headers`` overwrites, ``append_headers`` adds a value after any existing
    one, ``remove_headers`` drops the header. ``body`` replaces the whole body.
    """

    set_headers: Mapping[str, str] = field(default_factory=dict)
    append_headers: Mapping[str, str] = field(default_factory=dict)
    remove_headers: tuple[str, ...] = ()
    body: bytes | None = None
    path: str | None = None
    method: str | None = None


@dataclass(frozen=True, slots=True)
class ImmediateResponse:
    """Answer the client now. In the request phase the chain stops and the upstream
    is never contacted."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class ResponseModifications:
    """Changes to the response before it goes back to the client."""

    set_headers: Mapping[str, str] = field(default_factory=dict)
    append_headers: Mapping[str, str] = field(default_factory=dict)
    remove_headers: tuple[str, ...] = ()
    body: bytes | None = None
    status: int | None = None


RequestAction: TypeAlias = RequestModifications | ImmediateResponse
ResponseAction: TypeAlias = ResponseModifications


@runtime_checkable
class RequestPolicy(Protocol):
    """A policy that declares the ``request`` phase."""

    def on_request(
        self, ctx: RequestContext
    ) -> RequestAction | Awaitable[RequestAction | None] | None: ...


@runtime_checkable
class ResponsePolicy(Protocol):
    """A policy that declares the ``response`` phase."""

    def on_response(
        self, ctx: ResponseContext
    ) -> ResponseAction | Awaitable[ResponseAction | None] | None: ...
