"""engine.healthcheck: the probe command of the image, against a real gRPC server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.healthcheck import main
from engine.registry import PolicyRegistry
from engine.store import ConfigStore
from engine.transport.server import EXT_PROC_SERVICE, serve
from tests.e2e.harness import EngineThread, free_port


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[EngineThread]:
    config = tmp_path / "config.yaml"
    config.write_text("routes: {}\n")
    thread = EngineThread(PolicyRegistry(()), config)
    try:
        yield thread
    finally:
        thread.close()


def test_serving_engine_exits_0(engine: EngineThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--address", engine.target]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert main(["--address", engine.target, "--service", EXT_PROC_SERVICE]) == 0


def test_unknown_service_exits_1(engine: EngineThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--address", engine.target, "--service", "no.such.Service"]) == 1
    assert "unknown" in capsys.readouterr().err


def test_nothing_listening_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--address", f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 2
    assert "unreachable" in capsys.readouterr().err


def test_engine_without_configuration_is_not_serving(capsys: pytest.CaptureFixture[str]) -> None:
    # No snapshot published yet: the server answers, but NOT_SERVING (exit 1).
    loop = asyncio.new_event_loop()
    bound: list[int] = []
    started = threading.Event()
    stop = asyncio.Event()

    def on_bound(port: int) -> None:
        bound.append(port)
        started.set()

    async def run() -> None:
        await serve("127.0.0.1:0", ConfigStore(), grace=0.1, stop=stop, on_bound=on_bound)

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        assert started.wait(10)
        assert main(["--address", f"127.0.0.1:{bound[0]}"]) == 1
        assert "NOT_SERVING" in capsys.readouterr().err
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def test_rejects_a_non_positive_timeout() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--timeout", "0"])
    assert exit_info.value.code == 2
