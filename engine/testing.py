"""Builders and fakes shared by the engine's tests and by policy tests.

Policy authors use these to call their hooks without Envoy::

    POLICY = load_policy(Path(__file__).resolve().parents[1])
    ctx = make_request_context(path="/api/x", headers={"authorization": "Bearer t"})
    action = await construct(POLICY, {"issuer": "https://idp.test/"}).on_request(ctx)

and to test the definition's own examples::

    @pytest.mark.parametrize("example", valid_examples(POLICY), ids=example_id)
    def test_valid_examples_construct(example: Mapping[str, Any]) -> None:
        construct(POLICY, example["parameters"])

To run whole chains, build a registry with :func:`engine.registry.load_policy`
and a snapshot with :func:`engine.config.load_config`, as the engine does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from engine.policy import Headers, Metadata, RequestContext, ResponseContext
from engine.registry import RegisteredPolicy

__all__ = [
    "FakeClock",
    "construct",
    "example_id",
    "make_request_context",
    "make_response_context",
    "valid_examples",
]


def make_request_context(
    *,
    path: str = "/",
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    route: str = "test",
    request_id: str = "req-1",
    metadata: Metadata | None = None,
    body: bytes | None = None,
    client_address: str = "127.0.0.1",
) -> RequestContext:
    """A request context with lower-cased header names and fresh mutable containers."""
    return RequestContext(
        headers=Headers((name.lower(), value) for name, value in (headers or {}).items()),
        path=path,
        method=method,
        request_id=request_id,
        route=route,
        metadata={} if metadata is None else metadata,
        body=body,
        client_address=client_address,
    )


def make_response_context(
    request: RequestContext | None = None,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    metadata: Metadata | None = None,
    **request_fields: Any,
) -> ResponseContext:
    """A response context. Without ``request`` one is built from ``request_fields``
    (see :func:`make_request_context`). ``metadata`` defaults to the request's own
    mapping, as in the engine, where both phases share it."""
    if request is None:
        request = make_request_context(**request_fields)
    elif request_fields:
        raise TypeError("pass either request or request fields, not both")
    return ResponseContext(
        request=request,
        status=status,
        headers=Headers((name.lower(), value) for name, value in (headers or {}).items()),
        metadata=request.metadata if metadata is None else metadata,
        body=body,
    )


def construct(policy: RegisteredPolicy, params: Mapping[str, Any], **options: Any) -> Any:
    """The instance of ``policy`` for ``params``, built as the configuration loader
    builds it: ``params`` are validated against the definition (defaults filled in)
    and the result is passed to ``policy.factory``, with ``options`` as keyword
    arguments (e.g. ``clock=FakeClock()``).

    Raises ``AssertionError`` listing the problems when ``params`` do not validate,
    so a test with a bad fixture fails instead of testing a constructor call the
    engine never makes. A :class:`~engine.policy.ParameterError` (or any other
    error) from the factory propagates. Typed ``Any`` so tests call hooks directly.
    """
    normalised, errors = policy.definition.validate_parameters(params)
    if errors:
        raise AssertionError(f"parameters of {policy.name} {policy.version} invalid: {errors}")
    factory: Callable[..., Any] = policy.factory
    return factory(normalised, **options)


def valid_examples(policy: RegisteredPolicy) -> list[Mapping[str, Any]]:
    """The definition's examples declared ``valid: true``, in definition order, to
    parametrize over (with ``ids=example_id``)."""
    return [example for example in policy.definition.examples if example["valid"]]


def example_id(example: Mapping[str, Any]) -> str:
    """A definition example's test id: its ``description``."""
    return str(example["description"])


class FakeClock:
    """A monotonic clock (``() -> float`` seconds) for policies that take ``clock=``:
    it moves only when :meth:`advance` is called, so pacing, refill and expiry are
    tested without sleeping. ``start`` is arbitrary but not zero, so code that
    mistakes 0 for "never" is caught."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``."""
        self.now += seconds
