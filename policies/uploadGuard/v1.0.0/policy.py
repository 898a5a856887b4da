"""uploadGuard v1.0.0: size, content type and digest of request bodies, streamed.

Contract:

* A streaming policy (engine/streaming.py): the request body flows through
  :meth:`Policy.on_request_chunk` piece by piece (``bytes`` framing: nothing is held
  back), so a body of any size costs the engine one piece at a time.
* ``contentTypes`` (media types, no parameters, case-insensitive): a request whose
  ``content-type`` is not listed gets ``415`` at the headers (empty list: any).
* ``maxBytes``: a declared ``content-length`` over it gets ``413`` at the headers; a body
  that crosses it while streaming gets ``413`` then (the upstream never receives the piece
  that crossed it, Envoy resets the upstream request).
* ``digest``: the SHA-256 (hex) and size of an accepted body are written at the end of the
  body to metadata ``uploadGuard.sha256`` and ``uploadGuard.bytes``.
* When the chain buffers the body instead (another body policy of the route has no chunk
  hook), ``on_request`` applies the same rules to the whole body.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

from engine.policy import ImmediateResponse, RequestContext
from engine.streaming import Chunk

__all__ = ["Policy"]

_JSON: Final = {"content-type": "application/json"}
TOO_LARGE: Final = ImmediateResponse(
    status=413, headers=_JSON, body=json.dumps({"error": "request body too large"}).encode()
)
UNSUPPORTED: Final = ImmediateResponse(
    status=415, headers=_JSON, body=json.dumps({"error": "unsupported content type"}).encode()
)


class Policy:
    """Checks size and type of uploads as they stream; digests them into metadata."""

    pure_constructor = True

    @staticmethod
    def explain(params: Mapping[str, Any]) -> dict[str, Any]:
        """What an upload must be to pass, and what it records."""
        types = list(params["contentTypes"])
        said: dict[str, Any] = {
            "maxBytes": params["maxBytes"],
            "contentTypes": types or "any",
            "rejects": "413 over maxBytes (declared or streamed)"
            + (", 415 for another content-type" if types else ""),
        }
        if params["digest"]:
            said["writesMetadata"] = ["uploadGuard.sha256", "uploadGuard.bytes"]
        return said

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._max = int(params["maxBytes"])
        self._types = frozenset(t.lower() for t in params["contentTypes"])
        self._digest = bool(params["digest"])

    def on_request(self, ctx: RequestContext) -> ImmediateResponse | None:
        """At the headers (``ctx.body`` None): type and declared length. On a route that
        buffers, the whole body too."""
        if self._types:
            media = ctx.headers.get("content-type", "").split(";")[0].strip().lower()
            if media not in self._types:
                return UNSUPPORTED
        declared = ctx.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max:
            return TOO_LARGE
        if ctx.body is not None:
            if len(ctx.body) > self._max:
                return TOO_LARGE
            self._record(ctx, hashlib.sha256(ctx.body), len(ctx.body))
        return None

    def on_request_chunk(self, ctx: RequestContext, chunk: Chunk) -> ImmediateResponse | None:
        """One piece: counted (and digested); the piece goes on unchanged."""
        size = chunk.state["bytes"] = chunk.state.get("bytes", 0) + len(chunk.data)
        if size > self._max:
            return TOO_LARGE
        digest = chunk.state.get("sha256")
        if digest is None and self._digest:
            digest = chunk.state["sha256"] = hashlib.sha256()
        if digest is not None:
            digest.update(chunk.data)
        if chunk.end_of_stream:
            self._record(ctx, digest, size)
        return None

    def _record(self, ctx: RequestContext, digest: Any, size: int) -> None:
        if not self._digest:
            return
        ctx.metadata["uploadGuard.sha256"] = digest.hexdigest()
        ctx.metadata["uploadGuard.bytes"] = size
