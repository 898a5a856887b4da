"""Chains built straight from policy instances, for the ext_proc tests: no registry, no
configuration document, one snapshot of the given routes; and the two policies both
transports' tests use (:class:`Modify`, :class:`Deny`)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from engine.chain import Chain, ChainPolicy, Snapshot
from engine.policy import ImmediateResponse, RequestContext, RequestModifications

__all__ = ["Deny", "Modify", "entry", "snapshot"]


def entry(instance: object, **flags: Any) -> ChainPolicy:
    """A chain entry running ``instance``: its phases from the hooks it has (``has_request``
    / ``has_response`` in ``flags`` override them), other ``flags`` as ChainPolicy fields."""
    has_request = hasattr(instance, "on_request")
    has_response = hasattr(instance, "on_response")
    return ChainPolicy(
        name=type(instance).__name__,
        version="v1.0.0",
        instance=instance,
        has_request=flags.pop("has_request", has_request),
        has_response=flags.pop("has_response", has_response),
        **flags,
    )


def snapshot(**routes: list[ChainPolicy]) -> Snapshot:
    """Version 1 of a configuration with these routes (route key -> entries)."""
    return Snapshot(
        routes=MappingProxyType({k: Chain(route=k, policies=tuple(v)) for k, v in routes.items()}),
        source="test",
        version=1,
    )


class Modify:
    """A request policy answering ``action`` (header changes and the like)."""

    def __init__(self, action: RequestModifications) -> None:
        self.action = action

    def on_request(self, ctx: RequestContext) -> RequestModifications:
        return self.action


class Deny:
    """A request policy answering 401 at once."""

    def on_request(self, ctx: RequestContext) -> ImmediateResponse:
        return ImmediateResponse(401, {"www-authenticate": "Bearer"}, b"denied")
