"""The admin HTTP API of the control plane.

=========================  ==========================================================
``GET /healthz``           ``{"status": "ok", "version": ...}``
``GET /routes``            the table: ``{"version", "generation", "source", "routes"}``
``PUT /routes``            replace the whole table: body ``{"routes": {...}}``
``GET /routes/<key>``      one route's spec (404 if none)
``PUT /routes/<key>``      submit or replace one route: body ``{"policies": [...]}``
``DELETE /routes/<key>``   remove one route (404 if none)
``GET /status``            the table version and, per engine stream, what it ACKed/NACKed
=========================  ==========================================================

Bodies are JSON or YAML (the config file's format; JSON is YAML). A change is accepted
only if the whole resulting table is valid: then ``200 {"version": ...}`` and every
engine gets it. Otherwise ``400 {"errors": [...]}`` with every problem, each naming
route, policy and field (``routes[private].policies[0] jwtValidation v1.0.0: jwksUrl
must be HTTPS``), and nothing changes or is pushed.

Route changes made here live in memory: the watched config (``--config``), the durable
GitOps source, replaces the whole table again when it changes.
"""

from __future__ import annotations

from typing import Any, Final

from controlplane.ads import AdsServer
from controlplane.http import Request, Response, json_response
from controlplane.table import RouteTable
from engine.definition import YamlError, load_yaml

__all__ = ["AdminApi"]

_ROUTES: Final = "/routes"


class AdminApi:
    """Request handler for :class:`~controlplane.http.HttpServer`."""

    def __init__(self, table: RouteTable, ads: AdsServer) -> None:
        self.table = table
        self.ads = ads

    async def __call__(self, request: Request) -> Response:
        path = request.path.rstrip("/") or "/"
        if path == "/healthz":
            return self._only(request, "GET") or json_response(
                200, {"status": "ok", "version": self.table.current.version}
            )
        if path == "/status":
            return self._only(request, "GET") or self._status()
        if path == _ROUTES:
            return self._only(request, "GET", "PUT") or await self._table(request)
        if path.startswith(_ROUTES + "/"):
            key = path[len(_ROUTES) + 1 :]
            return self._only(request, "GET", "PUT", "DELETE") or await self._route(request, key)
        return json_response(404, {"errors": [f"no such endpoint: {request.path}"]})

    @staticmethod
    def _only(request: Request, *methods: str) -> Response | None:
        if request.method in methods:
            return None
        response = json_response(
            405, {"errors": [f"{request.method} not allowed; use {', '.join(methods)}"]}
        )
        response.headers["allow"] = ", ".join(methods)
        return response

    def _status(self) -> Response:
        current = self.table.current
        return json_response(
            200,
            {
                "version": current.version,
                "generation": current.generation,
                "engines": self.ads.status(),
            },
        )

    async def _table(self, request: Request) -> Response:
        if request.method == "GET":
            current = self.table.current
            return json_response(
                200,
                {
                    "version": current.version,
                    "generation": current.generation,
                    "source": current.source,
                    "routes": self.table.routes(),
                },
            )
        body, problem = _parse(request)
        if problem:
            return problem
        errors = await self.table.replace(body, f"admin {request.method} {request.path}")
        return self._verdict(errors)

    async def _route(self, request: Request, key: str) -> Response:
        if not key or "/" in key:
            return json_response(404, {"errors": [f"no such endpoint: {request.path}"]})
        source = f"admin {request.method} {request.path}"
        if request.method == "GET":
            routes = self.table.routes()
            if key not in routes:
                return json_response(404, {"errors": [f"routes[{key}]: no such route"]})
            return json_response(
                200, {"version": self.table.current.version, "route": key, "spec": routes[key]}
            )
        if request.method == "DELETE":
            if not await self.table.delete_route(key, source):
                return json_response(404, {"errors": [f"routes[{key}]: no such route"]})
            return self._verdict([])
        spec, problem = _parse(request)
        if problem:
            return problem
        return self._verdict(await self.table.put_route(key, spec, source))

    def _verdict(self, errors: list[str]) -> Response:
        if errors:
            return json_response(400, {"errors": errors})
        current = self.table.current
        return json_response(200, {"version": current.version, "generation": current.generation})


def _parse(request: Request) -> tuple[Any, Response | None]:
    if not request.body.strip():
        return None, json_response(400, {"errors": ["body: empty (send JSON or YAML)"]})
    try:
        return load_yaml(request.body), None
    except YamlError as exc:
        return None, json_response(400, {"errors": [f"body: {exc}"]})
