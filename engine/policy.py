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
  read them: a :class:`~engine.metadata.RequestMetadata` converts or drops (and
  logs) what CEL cannot represent when it is written, so write values whole
  rather than mutating them after storing.
* A chain entry may be configured ``mode: shadow`` (docs/shadow-mode.md): the hook then
  runs on a private copy of the context (headers and metadata), and what its action would
  have done is recorded, never applied. Nothing in a policy changes for it: write hooks as
  usual, never detect the mode.
* Header names are lower-case everywhere (Envoy sends and expects them so).
* Repeated headers stay separate values (:class:`Headers`): ``ctx.headers[name]``
  reads them joined with ``", "`` (the RFC 9110 combination, right for every header but
  ``set-cookie``), ``ctx.headers.get_all(name)`` gives each value. ``set_headers``
  replaces every value of a header, ``append_headers`` adds one more separate header
  line, and headers no policy touched reach Envoy exactly as they came.
* Optional, request policies: ``strip_request_headers(headers) -> names`` (see
  :class:`StripsRequestHeaders`) names request headers to remove when the chain
  does not run the policy for a request (its condition is false or fails) or the
  policy fails open, so headers only the policy may set (claim headers) never
  reach the upstream from the client. It must be quick; if it raises, that is a
  failure of the policy (``onError`` applies).
* Optional, streaming bodies: ``on_request_chunk(ctx, chunk)`` / ``on_response_chunk(ctx,
  chunk)`` (with ``request_framing(ctx)`` / ``response_framing(ctx)``) take the body one
  whole unit at a time as it flows (SSE events, NDJSON lines, pieces of an upload), instead
  of ``ctx.body`` whole. A phase streams when every body policy in it has the hook; the
  header hook then runs at the headers with ``ctx.body`` None. The contract, the results
  (``Hold``, ``EndStream``) and the framing are in :mod:`engine.streaming`.
* Optional, at config load (called once per chain entry, right after ``__init__``; a
  wrong answer or an exception rejects the config, naming the entry):

  - ``phases() -> Iterable[str]``: the phases THIS configuration uses, a subset of the
    definition's ``phases`` (see :class:`NarrowsPhases`). Envoy is then not asked for the
    others on its account: a jsonTransform configured for requests only does not make
    Envoy buffer and send every response body. A body the definition requires comes
    only with the phase that reads it.
  - ``bodies() -> Iterable[str]``: the bodies THIS configuration reads (``"request"``,
    ``"response"``), a subset of those the definition requires (``requiresRequestBody``,
    ``requiresResponseBody``; see :class:`NarrowsBodies`). A phase the policy keeps for
    its headers only then runs without Envoy buffering its body: jsonTransform keeps
    the request phase on routes that transform responses, to ask the upstream not to
    compress, without buffering request bodies it does not transform. Without the
    method, a used phase brings the body the definition requires.
  - ``static_request()`` / ``static_response()``: the action the hook returns for EVERY
    request, whatever the context (see :class:`StaticPolicy`). The engine validates it
    once and never calls the hook; ``None`` means the policy does nothing in that phase
    (the phase is dropped, as with ``phases()``). A route whose policies are all static
    and unconditional is answered from replies built once per configuration: the net
    header change is computed at load, not per request. Only declare it for actions that
    truly never depend on the request; a static action must not be mutated afterwards.
* Optional, a static method ``explain(params) -> Mapping[str, Any]`` (see
  :class:`Explains`): given the validated parameters (defaults filled in), a JSON-like
  description of what this configuration does, for ``<engine> explain`` and the control
  plane's ``POST /explain`` (engine/explain.py): the headers it sets, the answer it gives,
  what a request must carry to pass. It must be pure (no I/O, no clock, no randomness):
  it is called on the control plane too, without constructing the policy. Never put a
  secret in it (an API key, a password in a URL): the engine also removes the values of
  parameters the definition marks ``secret``, but only those. Without the method the
  entry reads "no static explanation".
* Optional, a class attribute: ``pure_constructor = True`` declares that ``__init__`` (and
  the config-load methods above) read nothing from the host they run on (no file, no
  environment variable, no network, no installed certificate), start nothing and hold
  nothing that needs closing. The control plane built into the engine binary
  (``<engine> controlplane``) then constructs such policies for every submitted entry,
  so a :class:`ParameterError` is refused at submission (the admin API's 400) instead of
  NACKed by every engine (:func:`controlplane.definitions.checking_registry`). Leave it
  out when in doubt (``jwtValidation`` reads ``caFile``, ``rateLimit`` v2 reads
  ``redisUrlEnv``): the engine still runs the constructor and NACKs what it rejects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, runtime_checkable

from engine.metadata import RequestMetadata

__all__ = [
    "Explains",
    "Headers",
    "ImmediateResponse",
    "Metadata",
    "NarrowsBodies",
    "NarrowsPhases",
    "ParameterError",
    "RequestAction",
    "RequestContext",
    "RequestMetadata",
    "RequestModifications",
    "RequestPolicy",
    "ResponseAction",
    "ResponseContext",
    "ResponseModifications",
    "ResponsePolicy",
    "StaticPolicy",
    "StripsRequestHeaders",
]


class Headers(MutableMapping[str, str]):
    """Lower-case header name -> value, keeping repeated headers as separate values.

    As a mapping it reads like ``dict[str, str]``: a repeated header's values joined with
    ``", "``. :meth:`get_all` returns the separate values (``set-cookie`` must be read so:
    its values may contain commas). ``headers[name] = value`` replaces all values,
    :meth:`add` appends one. Built from a mapping or from ``(name, value)`` pairs (repeats
    allowed). Keys are used as given: the engine and Envoy use lower-case names.
    """

    __slots__ = ("_values",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._values: dict[str, list[str]] = {}
        pairs = items.items() if isinstance(items, Mapping) else items
        for name, value in pairs:
            self.add(name, value)

    def __getitem__(self, name: str) -> str:
        values = self._values[name]
        return values[0] if len(values) == 1 else ", ".join(values)

    def __setitem__(self, name: str, value: str) -> None:
        self._values[name] = [value]

    def __delitem__(self, name: str) -> None:
        del self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __repr__(self) -> str:
        return f"Headers({self.pairs()!r})"

    @classmethod
    def adopt(cls, values: dict[str, list[str]]) -> Headers:
        """Headers holding ``values`` (name -> non-empty list of values) as they are, not
        copied: the caller hands them over (the engine's message reader)."""
        headers = cls()
        headers._values = values
        return headers

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name`` in order (a copy; ``[]`` if absent)."""
        return list(self._values.get(name, ()))

    def add(self, name: str, value: str) -> None:
        """Add one more value for ``name`` (a separate header line)."""
        values = self._values.get(name)
        if values is None:
            self._values[name] = [value]
        else:
            values.append(value)

    def pairs(self) -> list[tuple[str, str]]:
        """Every ``(name, value)``, repeated names once per value."""
        return [(name, value) for name, values in self._values.items() for value in values]

    def snapshot(self) -> dict[str, tuple[str, ...]]:
        """name -> values, frozen (what the engine diffs a chain's changes against)."""
        return {name: tuple(values) for name, values in self._values.items()}

    def copy(self) -> Headers:
        copied = Headers()
        copied._values = {name: list(values) for name, values in self._values.items()}
        return copied


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
    client wrote into ``x-forwarded-for``; empty when unknown (Envoy did not send the
    ``source.address`` request attribute: see ``engine.transport.messages.client_address``).
    """

    headers: Headers
    path: str
    method: str
    request_id: str
    route: str
    metadata: Metadata = field(default_factory=RequestMetadata)
    body: bytes | None = None
    client_address: str = ""

    def __post_init__(self) -> None:
        headers: object = self.headers
        if not isinstance(headers, Headers):  # a plain dict (tests, tools)
            self.headers = Headers(self.headers)
        # A plain dict (tests, tools) is wrapped in place: CEL can always read metadata.
        if type(self.metadata) is not RequestMetadata:
            self.metadata = RequestMetadata(self.metadata)


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

    def __post_init__(self) -> None:
        headers: object = self.headers
        if not isinstance(headers, Headers):  # a plain dict (tests, tools)
            self.headers = Headers(self.headers)
        if type(self.metadata) is not RequestMetadata:
            self.metadata = RequestMetadata(self.metadata)


@dataclass(frozen=True, slots=True)
class RequestModifications:
    """Changes to the request before it goes upstream. Unset fields mean "unchanged".

    ``set_headers`` replaces every value, ``append_headers`` adds one more value as a
    separate header line, ``remove_headers`` drops every value. ``body`` replaces the
    whole body.
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


@runtime_checkable
class StripsRequestHeaders(Protocol):
    """A request policy whose headers must be removed even from requests it does not
    process (condition false or failed, or it failed open). ``enabled: false``
    entries are not part of the chain, so they strip nothing."""

    def strip_request_headers(self, headers: Mapping[str, str]) -> Iterable[str]:
        """Names of headers in ``headers`` to remove (lower-case)."""
        ...


@runtime_checkable
class NarrowsPhases(Protocol):
    """A policy whose configuration may use fewer phases than its definition declares."""

    def phases(self) -> Iterable[str]:
        """``"request"`` and/or ``"response"``: the phases this instance acts in."""
        ...


@runtime_checkable
class NarrowsBodies(Protocol):
    """A policy whose configuration reads fewer bodies than its definition requires."""

    def bodies(self) -> Iterable[str]:
        """``"request"`` and/or ``"response"``: the bodies this instance reads."""
        ...


@runtime_checkable
class StaticPolicy(Protocol):
    """A policy whose action is the same for every request. Implement the method of each
    declared phase; it is called once, at config load."""

    def static_request(self) -> RequestAction | None:
        """What ``on_request`` returns for every request (None: nothing, ever)."""
        ...

    def static_response(self) -> ResponseAction | None:
        """What ``on_response`` returns for every request (None: nothing, ever)."""
        ...


@runtime_checkable
class Explains(Protocol):
    """A policy that says what a configuration of it does (``<engine> explain``)."""

    @staticmethod
    def explain(params: Mapping[str, Any]) -> Mapping[str, Any]:
        """A JSON-like description of what ``params`` make the policy do; pure, no secret."""
        ...
