"""engine.main: the CLI (--version, --validate) and a real server process (workers, SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.main import ENGINE_VERSION, main, parse_args
from engine.registry import PolicyRegistry
from engine.transport import server
from tests.e2e.harness import free_port
from tests.support import registry_from

ROOT = Path(__file__).resolve().parents[2]

VALID = """
routes:
  public:
    policies:
      - {name: addHeader, version: v1.0.0, parameters: {header: x-a, value: "1"}}
  private:
    policies: []
"""

INVALID = """
routes:
  public:
    policies:
      - {name: addHeader, version: v9.0.0, parameters: {header: x-a, value: "1"}}
      - {name: addHeader, version: v1.0.0, parameters: {header: X-BAD, value: "1"}}
"""


def run(argv: list[str], registry: PolicyRegistry) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, registry=registry, build_info={"built": "today"}, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_version_prints_build_info_and_policies():
    code, out, _ = run(["--version"], registry_from("addHeader", "deny"))
    assert code == 0
    assert out.splitlines() == [
        f"policy-engine {ENGINE_VERSION}",
        "built: today",
        "policies: addHeader v1.0.0, deny v1.0.0",
    ]


def test_zero_policy_engine_version():
    code, out, _ = run(["--version"], PolicyRegistry(()))
    assert code == 0
    assert "policies: none" in out


def test_validate_ok(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(VALID)
    assert run(["--config", str(config), "--validate"], registry_from("addHeader")) == (
        0,
        "OK: 2 routes\n",
        "",
    )


def test_validate_prints_every_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(INVALID)
    code, out, err = run(["--config", str(config), "--validate"], registry_from("addHeader"))
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 2, lines
    assert all(line.startswith(f"{config}: routes[") for line in lines), lines
    assert "v9.0.0" in lines[0]
    assert "X-BAD" in lines[1]


def test_validate_missing_file(tmp_path):
    code, _, err = run(
        ["--config", str(tmp_path / "nope.yaml"), "--validate"], registry_from("addHeader")
    )
    assert code == 1
    assert "cannot read" in err


HTTP_PORT_0 = ["--listen-http", "127.0.0.1:0"]


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no-config"),
        pytest.param(["--config", "x", "--workers", "0"], id="zero-workers"),
        pytest.param(
            ["--config", "x", "--workers", "2", "--listen", "127.0.0.1:0"], id="workers-port-0"
        ),
        pytest.param(
            ["--config", "x", "--workers", "2", "--listen", "127.0.0.1:9", *HTTP_PORT_0],
            id="workers-http-port-0",
        ),
        pytest.param(["--config", "x", "--poll-interval", "0"], id="poll-interval-0"),
        pytest.param(["--config", "x", "--poll-interval", "-1"], id="poll-interval-negative"),
        pytest.param(["--config", "x", "--poll-interval", "inf"], id="poll-interval-inf"),
        pytest.param(["--config", "x", "--settle", "-1"], id="settle-negative"),
        pytest.param(["--config", "x", "--settle", "nan"], id="settle-nan"),
        pytest.param(["--config", "x", "--settle", "inf"], id="settle-inf"),
        pytest.param(["--config", "x", "--grace", "-1"], id="grace-negative"),
        pytest.param(["--config", "x", "--grace", "nan"], id="grace-nan"),
        pytest.param(["--config", "x", "--max-body-bytes", "0"], id="max-body-0"),
        pytest.param(["--config", "x", "--max-body-bytes", str(2**31)], id="max-body-2GiB"),
    ],
)
def test_bad_command_lines_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv, registry=PolicyRegistry(()))
    assert info.value.code == 2


LISTENERS = ["--listen", "--listen-http", "--metrics-listen", "--health-listen"]


@pytest.mark.parametrize("flag", LISTENERS)
@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1", "127.0.0.1:http", "[::1]:"])
def test_listen_addresses_need_a_port_in_range(flag, address, capsys):
    """Before: 127.0.0.1:99999 listened on port 34463 (99999 - 65536) for --listen and
    --listen-http, and a missing or named port ended --listen-http in a traceback."""
    with pytest.raises(SystemExit) as info:
        parse_args(["--config", "x", flag, address])
    assert info.value.code == 2
    assert f"{flag} {address}: expected HOST:PORT, a port from 0 to 65535" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:99999", "127.0.0.1:abc"]
)
def test_xds_needs_a_port_in_range(address, capsys):
    """Before: only an empty port or 0 was refused; 127.0.0.1 (no colon: the whole
    address was taken for the port), 127.0.0.1:99999 and 127.0.0.1:abc started the
    engine, which then failed to connect and retried for ever."""
    with pytest.raises(SystemExit) as info:
        parse_args(["--xds", address])
    assert info.value.code == 2
    assert f"--xds {address}: expected HOST:PORT, a port from 1 to 65535" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_metrics_dir_must_be_a_writable_directory(kind, tmp_path, capsys):
    """Before: a --metrics-dir that did not exist (or was a file) ended the engine in a
    FileNotFoundError traceback from prometheus-client, naming no flag."""
    path = tmp_path / "metrics"
    if kind == "file":
        path.write_text("")
    argv = ["--config", "x", "--metrics-listen", "127.0.0.1:0", "--metrics-dir", str(path)]
    with pytest.raises(SystemExit) as info:
        main(argv, registry=PolicyRegistry(()))
    assert info.value.code == 2
    assert f"--metrics-dir {path}: not a directory this process can write" in (
        capsys.readouterr().err
    )


SCRIPT = (
    "import sys\n"
    "from engine.main import main\n"
    "from tests.support import registry_from\n"
    "sys.exit(main(sys.argv[1:], registry=registry_from('addHeader')))\n"
)


@contextlib.contextmanager
def engine_process(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """The engine's command line (``SCRIPT``) with ``argv`` as a process, its stderr piped;
    killed on exit if it still runs."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *argv],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


def clean_exit_log(proc: subprocess.Popen[bytes]) -> str:
    """Wait (bounded) for ``proc`` to exit; assert it exited 0; its stderr."""
    code = proc.wait(timeout=15)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 0, stderr
    return stderr


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("workers", [pytest.param(1, id="one"), pytest.param(2, id="two")])
def test_server_process_serves_and_stops_on_sigterm(tmp_path, workers):
    config = tmp_path / "c.yaml"
    config.write_text(VALID)
    port = free_port()
    argv = ["--config", str(config), "--listen", f"127.0.0.1:{port}"]
    argv += ["--workers", str(workers), "--grace", "1", "--drain", "2"]
    with engine_process(argv) as proc:
        wait_serving(port, proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            if workers > 1:
                assert len(children(proc.pid)) == workers
            proc.send_signal(signal.SIGTERM)
            # The drain: NOT_SERVING is reported while the server still answers. Before,
            # NOT_SERVING and the stop came at once (the process was gone at the next check).
            deadline = time.monotonic() + 1.5
            while True:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if status.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                assert time.monotonic() < deadline, "NOT_SERVING not reported during the drain"
                time.sleep(0.05)
            assert proc.poll() is None
        stderr = clean_exit_log(proc)
        assert "policy-engine" in stderr  # build info logged at start


def test_http_transport_served_by_every_worker_on_uvloop(tmp_path):
    """--listen-http in the real engine process: 2 workers (SO_REUSEPORT), uvloop, the
    configuration's chain; SIGTERM stops it cleanly."""
    config = tmp_path / "c.yaml"
    config.write_text(VALID)
    port, http_port = free_port(), free_port()
    argv = ["--config", str(config), "--listen", f"127.0.0.1:{port}"]
    argv += ["--listen-http", f"127.0.0.1:{http_port}", "--workers", "2", "--grace", "1"]
    message = json.dumps(
        {
            "request_headers": {"headers": {"headers": [{"key": ":path", "raw_value": "Lw=="}]}},
            "attributes": {"envoy.filters.http.ext_proc": {"xds.route_name": "public"}},
        }
    ).encode()
    with engine_process(argv) as proc:
        wait_serving(port, proc)
        assert len(children(proc.pid)) == 2
        for _ in range(20):  # new connections: the kernel deals them to both workers
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
            try:
                conn.request(
                    "POST", "/", body=message, headers={"content-type": "application/json"}
                )
                reply = conn.getresponse()
                answer = json.loads(reply.read())
            finally:
                conn.close()
            assert reply.status == 200
            option = answer["request_headers"]["response"]["header_mutation"]["set_headers"][0]
            assert option["header"] == {"key": "x-a", "raw_value": "MQ=="}
        proc.send_signal(signal.SIGTERM)
        stderr = clean_exit_log(proc)
        where = f"127.0.0.1:{http_port} (port {http_port}, plaintext)"
        assert f"HTTP ext_proc transport listening on {where}" in stderr


def test_max_body_bytes_sizes_the_grpc_limits():
    # Before: no max_receive_message_length, so gRPC's 4 MiB default cut bodies over 4 MiB.
    assert parse_args(["--config", "x"]).max_body_bytes == 10 * 1024 * 1024
    options = dict(server.grpc_options(10 * 1024 * 1024, reuse_port=False))
    assert options["grpc.max_receive_message_length"] == 21 * 1024 * 1024
    assert options["grpc.max_send_message_length"] == 21 * 1024 * 1024


def wait_serving(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "server did not become SERVING"
            time.sleep(0.1)


def test_a_dead_worker_is_restarted(tmp_path):
    # Before: one worker dying made the supervisor stop all workers and exit 1.
    config = tmp_path / "c.yaml"
    config.write_text(VALID)
    port = free_port()
    argv = ["--config", str(config), "--listen", f"127.0.0.1:{port}", "--workers", "2"]
    argv += ["--grace", "1", "--drain", "0"]
    with engine_process(argv) as proc:
        wait_serving(port, proc)
        deadline = time.monotonic() + 15
        while len(children(proc.pid)) < 2:
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.05)
        first = children(proc.pid)
        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while True:
            now = children(proc.pid)
            if len(now) == 2 and first[0] not in now:
                break
            assert proc.poll() is None, "the supervisor gave up after one dead worker"
            assert time.monotonic() < deadline, f"no replacement worker: {now}"
            time.sleep(0.05)
        assert first[1] in now  # the other worker kept running
        wait_serving(port, proc)
        proc.send_signal(signal.SIGTERM)
        stderr = clean_exit_log(proc)
        assert "unexpectedly: restarting it (1 of at most 5 restarts per minute)" in stderr


CRASHING = (
    "import logging, sys\n"
    "from engine.transport.server import serve_workers\n"
    "logging.basicConfig(level=logging.INFO)\n"
    "async def worker():\n"
    "    raise RuntimeError('crash at start')\n"
    "sys.exit(serve_workers(2, worker, grace=0.1, max_restarts=3))\n"
)


def test_a_crash_loop_stops_all_workers_and_exits_non_zero():
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("restarting it") == 3
    assert "after 3 restarts in the last minute: stopping all workers" in proc.stderr


def test_the_engine_runs_on_uvloop():
    # Issue 10: uvloop costs less CPU per ext_proc stream (tools/bench); before, asyncio's loop.
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert server.run_loop(loop_module()).startswith("uvloop")


def test_grpc_core_never_cancels_calls_waiting_to_be_picked_up():
    # Issue 10: grpc-core's defaults (1,000 / 3,000 waiting calls) cancelled streams under
    # load; tests/e2e/test_load.py shows it end to end.
    options = dict(server.grpc_options(10 * 1024 * 1024, reuse_port=False))
    assert options["grpc.server.max_pending_requests"] >= 100_000
    assert options["grpc.server.max_pending_requests_hard_limit"] >= 100_000
