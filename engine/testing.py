"""Builders and fakes shared by the engine's tests and by policy tests.

Policy authors use these to call their hooks without Envoy::

    ctx = make_request_context(path="/api/x", headers={"authorization": "Bearer t"})
    action = await Policy(params).on_request(ctx)

To run whole chains, build a registry with :func:`engine.registry.load_policy`
and a snapshot with :func:`engine.config.load_config`, as the engine does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.policy import Metadata, RequestContext, ResponseContext

__all__ = ["make_request_context", "make_response_context"]


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
        headers={name.lower(): value for name, value in (headers or {}).items()},
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
        headers={name.lower(): value for name, value in (headers or {}).items()},
        metadata=request.metadata if metadata is None else metadata,
        body=body,
    )
