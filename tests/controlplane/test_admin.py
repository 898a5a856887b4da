"""The admin API's gate (issue 16 items 3 and 14): tokens and roles, Host allow list,
body, connection and time limits, TLS with certificate reload, the audit trail, and
validation off the event loop."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from controlplane import admin as admin_module
from controlplane.definitions import load_validation_registry
from controlplane.main import parse_args
from controlplane.testing import ControlPlane, new_token, write_definitions, write_tokens
from engine import definition as engine_definition
from engine.registry import PolicyRegistry
from policies.jwtValidation.testing import make_pki

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted(p for p in (REPO / "policies").glob("*/v*") if p.is_dir())
LIMIT = {"name": "rateLimit", "version": "v1.0.0", "parameters": {"requestsPerSecond": 5}}
ROUTE = {"policies": [LIMIT]}


@pytest.fixture(scope="module")
def definitions(tmp_path_factory: pytest.TempPathFactory) -> PolicyRegistry:
    path = tmp_path_factory.mktemp("defs") / "engine_definitions.json"
    write_definitions(path, SAMPLES, {"target": "//generated/test:engine"})
    return load_validation_registry(path).registry


@pytest.fixture
async def plane(definitions: PolicyRegistry, tmp_path: Path) -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(definitions, token_file=tmp_path / "tokens", settle=0.1)
    await plane.start()
    try:
        yield plane
    finally:
        assert await plane.stop() == 0


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
    chunked: bool = False,
) -> tuple[int, Any, dict[str, str]]:
    """One request (blocking): status, JSON body, lower-case headers."""
    conn: http.client.HTTPConnection
    if context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    sent = {"Authorization": f"Bearer {token}"} if token else {}
    sent.update(headers or {})
    try:
        data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
        if chunked:
            conn.request(
                method,
                path,
                body=iter([data.encode()]) if data else None,
                headers=sent,
                encode_chunked=True,
            )
        else:
            conn.request(method, path, body=data, headers=sent)
        reply = conn.getresponse()
        raw = reply.read()
        return (
            reply.status,
            json.loads(raw or b"null"),
            {k.lower(): v for k, v in reply.getheaders()},
        )
    finally:
        conn.close()


async def call(
    plane: ControlPlane, method: str, path: str, body: Any = None, **kw: Any
) -> tuple[int, Any, dict[str, str]]:
    return await asyncio.to_thread(request, plane.admin_port, method, path, body, **kw)


async def eventually(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Until ``predicate()`` is true; TimeoutError after 10 seconds."""
    async with asyncio.timeout(10):
        while True:
            if await predicate():
                return
            await asyncio.sleep(0.05)


async def test_no_or_unknown_token_is_401_everywhere_but_healthz(plane: ControlPlane) -> None:
    for method, path, body in [
        ("GET", "/routes", None),
        ("GET", "/status", None),
        ("PUT", "/routes/r", ROUTE),
        ("DELETE", "/routes/r", None),
        ("GET", "/nowhere", None),
    ]:
        for token in (None, new_token(), plane.admin_token[:-1]):
            status, reply, headers = await call(plane, method, path, body, token=token)
            assert status == 401, (method, path, reply)
            assert headers["www-authenticate"].startswith("Bearer")
    # A scheme other than Bearer is no token either.
    status, _, _ = await call(
        plane, "GET", "/routes", headers={"Authorization": f"Basic {plane.admin_token}"}
    )
    assert status == 401
    assert (await call(plane, "GET", "/healthz"))[0] == 200  # probes need no token
    assert plane.table.current.generation == 0  # nothing changed


async def test_read_only_token_reads_but_cannot_change(plane: ControlPlane) -> None:
    status, _, _ = await call(plane, "PUT", "/routes/r", ROUTE, token=plane.admin_token)
    assert status == 200
    version = plane.table.current.version
    status, reply, _ = await call(plane, "GET", "/routes/r", token=plane.reader_token)
    assert status == 200
    assert reply["spec"] == ROUTE
    assert (await call(plane, "GET", "/status", token=plane.reader_token))[0] == 200
    for method, path, body in [
        ("PUT", "/routes/r", {"policies": []}),
        ("PUT", "/routes", {"routes": {}}),
        ("DELETE", "/routes/r", None),
    ]:
        status, reply, _ = await call(plane, method, path, body, token=plane.reader_token)
        assert status == 403, reply
        assert reply == {"errors": ["token 'reader' is read-only"]}
    assert plane.table.current.version == version


@pytest.mark.parametrize(
    "host",
    ["attacker.example", "attacker.example:18001", "127.0.0.2", "[::2]:80", "", "localhost.evil"],
)
async def test_a_host_outside_the_allow_list_is_refused(plane: ControlPlane, host: str) -> None:
    # What a browser sends after DNS rebinding: the attacker's name, our loopback address.
    status, reply, _ = await call(
        plane, "PUT", "/routes/r", ROUTE, token=plane.admin_token, headers={"Host": host}
    )
    assert status == 421, reply
    assert (await call(plane, "GET", "/healthz", headers={"Host": host}))[0] == 421
    assert plane.table.current.generation == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST:1", "[::1]:8"])
async def test_loopback_host_forms_are_served(plane: ControlPlane, host: str) -> None:
    status, _, _ = await call(
        plane, "GET", "/routes", token=plane.admin_token, headers={"Host": host}
    )
    assert status == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_oversized_body_is_413(
    definitions: PolicyRegistry, tmp_path: Path, chunked: bool
) -> None:
    plane = ControlPlane(definitions, token_file=tmp_path / "tokens", admin_max_body=2000)
    await plane.start()
    try:
        big = {"policies": [LIMIT], "pad": "x" * 3000}
        status, reply, _ = await call(
            plane, "PUT", "/routes/r", big, token=plane.admin_token, chunked=chunked
        )
        assert status == 413, reply
        assert reply == {"errors": ["body: over 2000 bytes"]}
        status, _, _ = await call(
            plane, "PUT", "/routes/r", ROUTE, token=plane.admin_token, chunked=chunked
        )
        assert status == 200
    finally:
        assert await plane.stop() == 0


async def test_token_rotation_by_editing_the_file(plane: ControlPlane) -> None:
    old, new = plane.admin_token, new_token()
    # Step 1: add the new token beside the old one (both work).
    write_tokens(plane.token_file, {"admin": ("read-write", old), "admin-2": ("read-write", new)})

    async def works(token: str) -> bool:
        return (await call(plane, "GET", "/routes", token=token))[0] == 200

    await eventually(lambda: works(new))
    assert await works(old)
    # Step 2: remove the old one.
    write_tokens(plane.token_file, {"admin-2": ("read-write", new)})

    async def old_refused() -> bool:
        return not await works(old)

    await eventually(old_refused)
    assert await works(new)
    assert not await works(plane.reader_token)  # its line is gone too


async def test_an_invalid_token_file_later_fails_closed(
    plane: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controlplane")
    plane.token_file.write_text(f"admin read-write {plane.admin_token}\nbroken line\n")

    async def refused() -> bool:
        return (await call(plane, "GET", "/routes", token=plane.admin_token))[0] == 401

    await eventually(refused)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{plane.token_file}:2: expected 3 fields 'name role token', got 2" in text
    assert plane.admin_token not in text
    assert plane.reader_token not in text


async def test_audit_log_names_who_what_and_versions_never_the_token(
    plane: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    before = plane.table.current.version
    status, reply, _ = await call(plane, "PUT", "/routes/private", ROUTE, token=plane.admin_token)
    assert status == 200
    after = reply["version"]
    await call(
        plane, "PUT", "/routes", {"routes": {"a": ROUTE, "b": ROUTE}}, token=plane.admin_token
    )
    await call(plane, "PUT", "/routes/private", ROUTE, token=plane.reader_token)  # 403
    await call(plane, "GET", "/routes", token=new_token())  # 401
    lines = [r.getMessage() for r in caplog.records if r.name == "controlplane.audit"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("audit: admin (read-write) from 127.0.0.1: ")
    assert lines[0].endswith(
        f'PUT /routes/private: changed ["private"]; version {before} -> {after}'
    )
    assert 'PUT /routes: changed ["a", "b", "private"]; version ' in lines[1]
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert plane.admin_token not in everything
    assert plane.reader_token not in everything


async def test_paths_from_clients_cannot_forge_log_lines(
    plane: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    # A decoded path may hold a newline: written as it is, an unauthenticated client
    # could add a line that reads like an audit entry (and terminal escapes, a NUL...).
    caplog.set_level(logging.DEBUG)
    forged = "%0Aaudit:%20admin%20(read-write)%20from%2010.0.0.1:%20PUT%20x%1B[2J%00"
    assert (await call(plane, "GET", "/nope" + forged))[0] == 401
    reader = plane.reader_token
    assert (await call(plane, "PUT", "/routes/a" + forged, ROUTE, token=reader))[0] == 403
    assert (await call(plane, "GET", "/x" + forged, headers={"Host": "evil.example"}))[0] == 421
    status, _, _ = await call(plane, "PUT", "/routes/b" + forged, ROUTE, token=plane.admin_token)
    assert status == 200
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("controlplane")]
    assert len([m for m in messages if "/nope" in m or "/routes/a" in m or "/routes/b" in m]) == 3
    for message in messages:
        assert message.isprintable(), message
    assert any("PUT /routes/b\\naudit: admin" in m for m in messages), messages


async def test_connections_over_the_cap_get_503(
    definitions: PolicyRegistry, tmp_path: Path
) -> None:
    plane = ControlPlane(definitions, token_file=tmp_path / "tokens", admin_max_connections=2)
    await plane.start()
    idle = [socket.create_connection(("127.0.0.1", plane.admin_port), timeout=5) for _ in range(2)]
    try:
        await asyncio.sleep(0.2)  # both accepted by the server
        status, reply, _ = await call(plane, "GET", "/healthz")
        assert status == 503, reply
        for sock in idle:
            sock.close()

        async def served() -> bool:
            return bool((await call(plane, "GET", "/healthz"))[0] == 200)

        await eventually(served)
    finally:
        for sock in idle:
            sock.close()
        assert await plane.stop() == 0


async def test_a_slow_client_is_cut_off(definitions: PolicyRegistry, tmp_path: Path) -> None:
    plane = ControlPlane(definitions, token_file=tmp_path / "tokens", admin_timeout=1.0)
    await plane.start()

    def trickle() -> bytes:
        with socket.create_connection(("127.0.0.1", plane.admin_port), timeout=10) as sock:
            sock.sendall(b"PUT /routes/r HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Len")
            return sock.recv(1024)  # b"" once the server closes; timeout after 10 s

    try:
        assert await asyncio.to_thread(trickle) == b""
    finally:
        assert await plane.stop() == 0


async def test_submissions_are_parsed_and_validated_off_the_event_loop(
    plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: dict[str, str] = {}
    real_prepare = plane.table._prepare

    def prepare(document: Any, source: str) -> Any:
        threads["validate"] = threading.current_thread().name
        return real_prepare(document, source)

    real_parse = engine_definition.load_yaml

    def parse(data: bytes) -> Any:
        threads["parse"] = threading.current_thread().name
        return real_parse(data)

    monkeypatch.setattr(plane.table, "_prepare", prepare)
    monkeypatch.setattr(admin_module, "load_yaml", parse)
    status, _, _ = await call(plane, "PUT", "/routes/r", ROUTE, token=plane.admin_token)
    assert status == 200
    loop_thread = threading.current_thread().name
    assert set(threads) == {"parse", "validate"}
    assert loop_thread not in threads.values(), threads


def test_tls_certificate_is_reloaded_when_its_files_change(
    definitions: PolicyRegistry, tmp_path: Path
) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first, second = make_pki(tmp_path / "one"), make_pki(tmp_path / "two")
    cert, key = tmp_path / "admin.pem", tmp_path / "admin-key.pem"
    cert.write_bytes(first.cert_file.read_bytes())
    key.write_bytes(first.key_file.read_bytes())

    def trusting(pki: Any) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(pki.ca_file))

    async def scenario() -> None:
        plane = ControlPlane(
            definitions,
            token_file=tmp_path / "tokens",
            settle=0.1,
            admin_tls_cert=str(cert),
            admin_tls_key=str(key),
        )
        await plane.start()
        try:
            status, _, _ = await call(
                plane, "GET", "/routes", token=plane.admin_token, context=trusting(first)
            )
            assert status == 200
            with pytest.raises(ssl.SSLError):  # plaintext is not served
                await call(
                    plane, "GET", "/routes", token=plane.admin_token, context=trusting(second)
                )
            for source, target in ((second.cert_file, cert), (second.key_file, key)):
                tmp = target.with_suffix(".tmp")
                tmp.write_bytes(source.read_bytes())
                tmp.replace(target)

            async def second_served() -> bool:
                try:
                    await call(plane, "GET", "/healthz", context=trusting(second))
                except ssl.SSLError:
                    return False
                return True

            await eventually(second_served)
        finally:
            assert await plane.stop() == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param([], "needs --admin-token-file FILE", id="no-token-file"),
        pytest.param(["--admin-token-file", "t", "--admin-no-auth"], "not both", id="both"),
        pytest.param(
            ["--admin-token-file", "t", "--admin-listen", "0.0.0.0:18001"],
            "is not a loopback address",
            id="public-plaintext",
        ),
        pytest.param(
            [
                "--admin-no-auth",
                "--admin-listen",
                "10.0.0.1:1",
                "--admin-tls-cert",
                "c",
                "--admin-tls-key",
                "k",
            ],
            "needs --admin-insecure",
            id="public-no-auth",
        ),
        pytest.param(
            ["--admin-token-file", "t", "--admin-tls-cert", "c"],
            "go together",
            id="cert-without-key",
        ),
    ],
)
def test_unsafe_admin_flags_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--definitions", "d.json", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--admin-no-auth"], id="loopback-no-auth"),
        pytest.param(
            ["--admin-token-file", "t", "--admin-listen", "0.0.0.0:1", "--admin-insecure"],
            id="public-insecure-explicit",
        ),
        pytest.param(
            [
                "--admin-token-file",
                "t",
                "--admin-listen",
                "[::]:1",
                "--admin-tls-cert",
                "c",
                "--admin-tls-key",
                "k",
            ],
            id="public-tls",
        ),
    ],
)
def test_explicit_choices_are_accepted(argv: list[str]) -> None:
    parse_args(["--definitions", "d.json", *argv])


def test_invalid_token_file_is_a_startup_error_naming_file_and_line(
    definitions: PolicyRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = new_token()
    tokens = tmp_path / "tokens"
    plane = ControlPlane(definitions, token_file=tokens)
    tokens.write_text(
        f"# comment\nops read-write {secret}\nci admin {new_token()}\n"
        f"short read-only abc\nops read-only {new_token()}\n"
    )
    caplog.set_level(logging.ERROR)

    async def start() -> None:
        with pytest.raises(RuntimeError, match="exited with 1"):
            await plane.start()

    asyncio.run(start())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{tokens}:3: role must be read-only or read-write" in text
    assert f"{tokens}:4: token of 'short' must be at least 32 characters" in text
    assert f"{tokens}:5: name 'ops' also on line 2" in text
    assert secret not in text
    assert "abc" not in text.replace(str(tokens), "")


def test_missing_token_file_is_a_startup_error(
    definitions: PolicyRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plane = ControlPlane(definitions, token_file=tmp_path / "tokens")
    plane.token_file.unlink()
    caplog.set_level(logging.ERROR)

    async def start() -> None:
        with pytest.raises(RuntimeError, match="exited with 1"):
            await plane.start()

    asyncio.run(start())
    assert f"{tmp_path / 'tokens'}: cannot read: No such file or directory" in caplog.text
