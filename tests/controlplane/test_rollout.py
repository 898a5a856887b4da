"""The admin API's ``?wait=SECONDS`` (issue 20 item 4): after an accepted change, each
engine stream's ACK, NACK, silence or end is reported to whoever made it.

An in-process control plane (:class:`controlplane.testing.ControlPlane`) and raw ADS
clients (:class:`controlplane.testing.FakeEngine`) that answer only when told."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controlplane import rollout
from controlplane.ads import AdsServer, EngineStatus
from controlplane.definitions import load_validation_registry
from controlplane.table import RouteTable
from controlplane.testing import ControlPlane, FakeEngine, admin_call, write_definitions
from engine.registry import PolicyRegistry

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted(p for p in (REPO / "policies").glob("*/v*") if p.is_dir())
ROUTE = {"policies": [{"name": "setHeader", "version": "v1.0.0",
                       "parameters": {"request": {"set": {"x-a": "1"}}}}]}  # fmt: skip


@pytest.fixture(scope="module")
def definitions(tmp_path_factory: pytest.TempPathFactory) -> PolicyRegistry:
    path = tmp_path_factory.mktemp("defs") / "engine_definitions.json"
    write_definitions(path, SAMPLES, {"target": "//generated/test:engine"})
    return load_validation_registry(path).registry


@pytest.fixture
async def plane(definitions: PolicyRegistry, tmp_path: Path) -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(definitions, token_file=tmp_path / "tokens", admin_timeout=2.0)
    await plane.start()
    try:
        yield plane
    finally:
        assert await plane.stop() == 0


@pytest.fixture
async def engines(plane: ControlPlane) -> AsyncIterator[list[FakeEngine]]:
    """Two engines, ``a`` and ``b``, each running the table's first version."""
    started = [FakeEngine(plane.xds_port, node) for node in ("a", "b")]
    try:
        for engine in started:
            await engine.connect()
            assert await engine.next_version() == plane.table.current.version
            await engine.ack()
        yield started
    finally:
        for engine in started:
            await engine.close()


async def put(plane: ControlPlane, path: str, body: Any = ROUTE) -> asyncio.Task[Any]:
    """Start a PUT (in a thread: the answer waits for the engines) and return its task."""
    return asyncio.create_task(admin_call(plane, "PUT", path, body))


def results(body: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {e["node"]: (e["result"], e.get("nackError", "")) for e in body["engines"]}


async def test_wait_reports_each_engines_ack_and_nack(
    plane: ControlPlane, engines: list[FakeEngine]
) -> None:
    a, b = engines
    answer = await put(plane, "/routes/r?wait=10")
    version = await a.next_version()
    assert await b.next_version() == version
    await a.ack()
    await asyncio.sleep(0.1)
    assert not answer.done()  # b has not answered yet
    await b.nack("routes[r].policies[0] jwtValidation v2.0.0: caFile: no such file")
    status, body = await answer
    assert status == 200, body
    assert body["version"] == version
    assert body["allAcked"] is False
    assert results(body) == {
        "a": ("ACK", ""),
        "b": ("NACK", "routes[r].policies[0] jwtValidation v2.0.0: caFile: no such file"),
    }
    assert {e["version"] for e in body["engines"]} == {version}


async def test_every_engine_acking_is_all_acked(
    plane: ControlPlane, engines: list[FakeEngine]
) -> None:
    answer = await put(plane, "/routes/r?wait=10")
    for engine in engines:
        await engine.next_version()
        await engine.ack()
    status, body = await answer
    assert (status, body["allAcked"]) == (200, True)
    assert results(body) == {"a": ("ACK", ""), "b": ("ACK", "")}
    # DELETE waits the same way.
    answer = asyncio.create_task(admin_call(plane, "DELETE", "/routes/r?wait=10"))
    for engine in engines:
        await engine.next_version()
        await engine.ack()
    status, body = await answer
    assert (status, body["allAcked"]) == (200, True)


async def test_an_engine_that_never_answers_times_out_beyond_the_connection_timeout(
    plane: ControlPlane, engines: list[FakeEngine]
) -> None:
    """``admin_timeout`` is 2 s here: a 3 s wait still gets its answer (the server, not
    the client, is taking the time)."""
    a, _ = engines
    started = time.monotonic()
    answer = await put(plane, "/routes/r?wait=3")
    await a.next_version()
    await a.ack()
    status, body = await answer
    assert 3 <= time.monotonic() - started < 6
    assert (status, body["allAcked"]) == (200, False)
    assert results(body) == {"a": ("ACK", ""), "b": ("timeout", "")}


async def test_a_stream_that_ends_is_reported_disconnected(
    plane: ControlPlane, engines: list[FakeEngine]
) -> None:
    a, b = engines
    answer = await put(plane, "/routes/r?wait=10")
    await a.next_version()
    await a.ack()
    await b.close()
    status, body = await answer
    assert status == 200
    assert results(body) == {"a": ("ACK", ""), "b": ("disconnected", "")}


async def test_an_engine_answering_a_newer_version_is_superseded(
    plane: ControlPlane, engines: list[FakeEngine]
) -> None:
    a, b = engines
    answer = await put(plane, "/routes/r?wait=10")
    await a.next_version()
    await b.next_version()
    await a.ack()
    status, newer = await admin_call(plane, "PUT", "/routes/s", ROUTE)
    assert status == 200, newer
    assert await b.next_version() == newer["version"]
    await b.ack()
    _, body = await answer
    assert results(body) == {"a": ("ACK", ""), "b": ("superseded", "")}
    assert [e["version"] for e in body["engines"]] == [body["version"], newer["version"]]


async def test_no_engine_connected_answers_at_once(plane: ControlPlane) -> None:
    status, body = await admin_call(plane, "PUT", "/routes/r?wait=30", ROUTE)
    assert (status, body["allAcked"], body["engines"]) == (200, True, [])


@pytest.mark.parametrize(
    "value", ["0", "-1", "61", "abc", "nan", "inf", "", "1e9"], ids=lambda v: v or "empty"
)
async def test_a_wrong_wait_is_400_and_changes_nothing(plane: ControlPlane, value: str) -> None:
    before = plane.table.current.version
    status, body = await admin_call(plane, "PUT", f"/routes/r?wait={value}", ROUTE)
    assert status == 400
    assert body["errors"][0].startswith("wait: must be a number of seconds in (0, 60]")
    assert plane.table.current.version == before
    status, body = await admin_call(plane, "GET", "/routes/r?wait=1")
    assert (status, body["errors"]) == (400, ["wait: only with PUT or DELETE, not GET"])


async def test_a_rejected_change_does_not_wait(plane: ControlPlane) -> None:
    bad = {"policies": [{"name": "setHeader", "version": "v9.0.0", "parameters": {}}]}
    started = time.monotonic()
    status, body = await admin_call(plane, "PUT", "/routes/r?wait=30", bad)
    assert status == 400
    assert "errors" in body
    assert "engines" not in body
    assert time.monotonic() - started < 5


async def test_many_waiters_wake_on_verdicts_not_on_a_poll(
    definitions: PolicyRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 waiters read the engines' status once at start, once per verdict (here one
    NACK of another version, then the ACK) and never in between: no poll."""
    reads = 0
    real = rollout.result_of

    def counting(engine: Any, version: Any) -> Any:
        nonlocal reads
        reads += 1
        return real(engine, version)

    monkeypatch.setattr(rollout, "result_of", counting)
    table = RouteTable(definitions)
    ads = AdsServer(table)
    await table.put_route("r", ROUTE, "test")
    current = table.current
    engine = EngineStatus(stream=1, peer="ipv4:127.0.0.1:5000", node_id="e")
    ads.engines[1] = engine
    waiters = asyncio.gather(
        *(rollout.wait_for_engines(ads, current, [engine], 30.0) for _ in range(50))
    )
    await asyncio.sleep(0.5)
    assert reads == 50
    engine.nacked_version = "0-elsewhere"
    ads._signal()
    await asyncio.sleep(0.1)
    assert reads == 100
    engine.acked_version, engine.acked_generation = current.version, current.generation
    ads._signal()
    answers = await asyncio.wait_for(waiters, 5)
    assert {a[0].result for a in answers} == {"ACK"}
    assert reads == 150
