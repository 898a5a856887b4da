"""``POST /explain`` (controlplane/explain.py) on a real control plane process, over HTTP
with its token file: a read-only token may explain, no token is 401, an oversized body
413, a bad description 400 naming the field; secrets never in the answer."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.explain import MAX_EXPLAIN_BODY
from tests.e2e.xds_harness import ControlPlaneProcess, write_e2e_definitions

HOST = "127.0.0.1"
API_KEY = "partner-secret-key-0123"
REDIS_PASSWORD = "hunter2-redis-pass"

PARTNER = {
    "debug": {"timing": True},
    "policies": [
        {"name": "apiKey", "version": "v1.0.0",
         "parameters": {"keys": [{"key": API_KEY, "consumer": "partner-prod"}]}},
        {"name": "setHeader", "version": "v1.0.0",
         "condition": 'request.headers["x-env"] == "prod"',
         "parameters": {"request": {"set": {"x-prod": "1"}}}},
        {"name": "rateLimit", "version": "v2.0.0", "mode": "shadow",
         "parameters": {"requestsPerSecond": 1, "backend": "redis",
                        "redisUrl": f"redis://user:{REDIS_PASSWORD}@127.0.0.1:6379/0"}},
        {"name": "jwtValidation", "version": "v2.0.0",
         "parameters": {"jwksUrl": "https://127.0.0.1:9/jwks.json", "issuer": "https://idp/",
                        "audiences": ["orders"], "caFile": "/nowhere/ca.pem"}},
    ],
}  # fmt: skip
PUBLIC = {"policies": [{"name": "respond", "version": "v1.0.0", "parameters": {"status": 418}}]}


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    workdir = tmp_path_factory.mktemp("explain")
    definitions = write_e2e_definitions(workdir / "engine_definitions.json")
    # With the policies' code, as `<engine> controlplane` runs it.
    with ControlPlaneProcess(definitions, workdir, policies=True) as plane:
        plane.put_route("partner", PARTNER)
        plane.put_route("public", PUBLIC)
        yield plane


def post(
    plane: ControlPlaneProcess, body: bytes | str, token: str | None
) -> tuple[int, dict[str, str], Any, str]:
    """(status, headers, JSON body, raw text) of one ``POST /explain``."""
    conn = http.client.HTTPConnection(HOST, plane.admin_port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request("POST", "/explain", body=body, headers=headers)
        reply = conn.getresponse()
        raw = reply.read().decode()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, json.loads(raw), raw
    finally:
        conn.close()


def test_read_only_token_explains_against_the_named_version(plane: ControlPlaneProcess) -> None:
    request = {"route": "partner", "path": "/api", "headers": {"x-env": "dev"}}
    status, headers, body, raw = post(plane, json.dumps(request), plane.reader_token)
    assert status == 200, body
    version = plane.status()["version"]
    assert headers["x-table-version"] == version
    assert body["config"]["version"] == version
    assert body["debug"] == {"timing": True}
    api_key, prod, limiter, jwt = body["entries"]
    assert api_key["explanation"]["consumers"] == ["partner-prod"]
    assert prod["request"]["runs"] == "skipped (condition false)"
    assert prod["request"]["condition"]["reads"] == {'request.headers["x-env"]': "dev"}
    assert limiter["mode"] == "shadow"
    # jwtValidation is not constructed on the control plane; its explain() hook still runs.
    assert jwt["explanation"]["issuer"] == "https://idp/"
    assert API_KEY not in raw
    assert REDIS_PASSWORD not in raw
    assert "redis://user:<redacted>@127.0.0.1:6379/0" in raw


def test_yaml_body_and_static_answer(plane: ControlPlaneProcess) -> None:
    status, _, body, _ = post(plane, "route: public\npath: /teapot\n", plane.reader_token)
    assert status == 200, body
    assert body["result"] == {"request": "is answered by respond v1.0.0 (418)"}


def test_no_token_is_401(plane: ControlPlaneProcess) -> None:
    status, headers, body, _ = post(plane, '{"route": "public"}', None)
    assert status == 401
    assert "www-authenticate" in headers
    assert body["errors"] == ["authentication required: Authorization: Bearer <token>"]


def test_oversized_body_is_413(plane: ControlPlaneProcess) -> None:
    padding = "x" * MAX_EXPLAIN_BODY
    status, _, body, _ = post(plane, json.dumps({"path": "/" + padding}), plane.reader_token)
    assert status == 413
    assert body["errors"] == [f"body: over {MAX_EXPLAIN_BODY} bytes"]


@pytest.mark.parametrize(
    ("request_body", "field", "error"),
    [
        ({"route": "public", "path": "x"}, "path", "path: 'x' must start with '/'"),
        ({"path": "/"}, "route", "route: which route? the configuration has 2: partner, public"),
        ({"route": "public", "headers": "x"}, "headers", "headers: must be"),
        ({"route": "public", "pth": "/"}, "pth", "pth: unknown field"),
    ],
    ids=["path", "route", "headers", "unknown"],
)
def test_bad_description_is_400_naming_the_field(
    plane: ControlPlaneProcess, request_body: Any, field: str, error: str
) -> None:
    status, _, body, _ = post(plane, json.dumps(request_body), plane.reader_token)
    assert status == 400, body
    assert body["field"] == field
    assert body["errors"][0].startswith(error)


def test_empty_or_broken_body_is_400(plane: ControlPlaneProcess) -> None:
    assert post(plane, "", plane.token)[0] == 400
    status, _, body, _ = post(plane, "{unclosed", plane.token)
    assert status == 400
    assert body["errors"][0].startswith("body: ")


def test_other_methods_and_writes_stay_guarded(plane: ControlPlaneProcess) -> None:
    assert plane.call("GET", "/explain", token=plane.reader_token)[0] == 405
    # The read-only exception is for /explain only.
    assert plane.call("PUT", "/routes/public", PUBLIC, token=plane.reader_token)[0] == 403


def test_definitions_only_plane_has_no_hooks(tmp_path: Path) -> None:
    """``python -m controlplane.main`` has no policy code: no explain() hook to run."""
    definitions = write_e2e_definitions(tmp_path / "engine_definitions.json")
    with ControlPlaneProcess(definitions, tmp_path) as plane:
        plane.put_route("public", PUBLIC)
        status, _, body, _ = post(plane, '{"path": "/"}', plane.reader_token)
    assert status == 200, body
    (entry,) = body["entries"]
    assert entry["explanation"] == "no static explanation"
    assert entry["request"]["runs"].startswith("runs (its hook decides")
