"""End-to-end pieces for xDS: a control plane process, engine processes fed by it, paced load.

Everything runs as real processes on 127.0.0.1 (``sys.executable``; under Bazel the
test's PYTHONPATH reaches the children), bounded in time and always stopped.

* :func:`e2e_registry`: the engine of these tests: every test policy (tests/support,
  tests/e2e) and every sample policy; :func:`write_e2e_definitions` writes its
  definitions file as the builder would.
* :class:`ControlPlaneProcess`: ``python -m controlplane.main`` (or, with ``policies``,
  the control plane as ``<engine> controlplane`` runs it, with the code of
  :func:`e2e_registry`); can be killed (SIGKILL)
  and restarted on the same ports; small admin API client methods, which send the
  read-write token of the token file the harness writes (``admin-tokens`` in the work
  directory; the token alone in ``admin.token``, for ``curl -H "Authorization: Bearer
  $(cat admin.token)"``).
* :class:`EngineXdsProcess`: the engine CLI with ``--xds``; RSS for memory checks.
* :class:`LoopThread`: an event loop on a thread, for an in-test raw xDS server.
* :class:`PacedLoad`: a client thread sending N requests/s through Envoy, recording every
  status and the value of one upstream-seen header, and every exception as a failure.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.testing import new_token, write_definitions, write_tokens
from engine.registry import PolicyRegistry, load_policy
from tests.e2e.harness import HOST, free_port, http_request

__all__ = [
    "ControlPlaneProcess",
    "EngineXdsProcess",
    "LoopThread",
    "PacedLoad",
    "assert_switched",
    "e2e_policy_folders",
    "e2e_registry",
    "wait_until",
    "write_e2e_definitions",
]

REPO = Path(__file__).resolve().parents[2]

ENGINE_SCRIPT = (
    "import sys\n"
    "from engine.main import main\n"
    "from tests.e2e.xds_harness import e2e_registry\n"
    "sys.exit(main(sys.argv[1:], registry=e2e_registry()))\n"
)


CONTROLPLANE_SCRIPT = (
    "import sys\n"
    "from controlplane.main import main\n"
    "from tests.e2e.xds_harness import e2e_registry\n"
    "sys.exit(main(sys.argv[1:], policies=e2e_registry))\n"
)


def e2e_policy_folders() -> list[Path]:
    roots = [REPO / "tests" / "support" / "policies", REPO / "tests" / "e2e" / "policies"]
    folders = [v for root in roots for p in root.iterdir() for v in p.iterdir() if v.is_dir()]
    folders += [p for p in (REPO / "policies").glob("*/v*") if p.is_dir()]
    return sorted(folders)


def e2e_registry() -> PolicyRegistry:
    return PolicyRegistry(load_policy(folder) for folder in e2e_policy_folders())


def write_e2e_definitions(path: Path, extra: list[Path] | None = None) -> Path:
    """The definitions file of :func:`e2e_registry`'s engine (plus ``extra`` folders, which
    the control plane then knows and the engine does not)."""
    folders = e2e_policy_folders() + list(extra or ())
    return write_definitions(path, folders, {"target": "//tests/e2e:xds_test"})


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _spawn(command: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    env = None
    if cwd is not None:  # the repository stays importable from another directory
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
    with log.open("ab") as handle:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
        )


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class ControlPlaneProcess:
    """The control plane as a child process. Use as a context manager.

    ``engine``: run it as ``<engine binary> controlplane`` (the builder's engines carry
    their control plane and definitions; ``definitions`` is then ignored); default
    ``python -m controlplane.main --definitions <definitions>``; ``policies``: the same
    with :func:`e2e_registry`'s code, as ``<engine> controlplane`` passes it (pure
    constructors run at submission). ``extra``: more flags (e.g. ADS TLS).
    :attr:`command` is the argv it runs.
    """

    def __init__(
        self,
        definitions: Path,
        workdir: Path,
        *,
        config: Path | None = None,
        engine: Path | None = None,
        policies: bool = False,
        settle: float = 0.2,
        extra: list[str] | None = None,
    ) -> None:
        self.definitions = definitions
        self.policies = policies
        self.config = config
        self.engine = engine
        self.settle = settle
        self.extra = list(extra or ())
        self.xds_port = free_port()
        self.admin_port = free_port()
        self.log_path = workdir / "controlplane.log"
        self.token = new_token()
        self.reader_token = new_token()
        self.token_file = write_tokens(
            workdir / "admin-tokens",
            {"operator": ("read-write", self.token), "viewer": ("read-only", self.reader_token)},
        )
        self.token_only_file = workdir / "admin.token"
        self.token_only_file.write_text(self.token + "\n")
        self.token_only_file.chmod(0o600)
        self.command: list[str] = []
        """The argv of the running process (as :meth:`start` ran it)."""
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, timeout: float = 20.0) -> None:
        args = [
            "--xds-listen",
            f"{HOST}:{self.xds_port}",
            "--admin-listen",
            f"{HOST}:{self.admin_port}",
            "--admin-token-file",
            str(self.token_file),
            "--poll-interval",
            "0.1",
            "--settle",
            str(self.settle),
        ]
        if self.config is not None:
            args += ["--config", str(self.config)]
        args += self.extra
        if self.engine is not None:
            self.command = [str(self.engine), "controlplane", *args]
        else:
            main = ["-c", CONTROLPLANE_SCRIPT] if self.policies else ["-m", "controlplane.main"]
            self.command = [sys.executable, *main, "--definitions", str(self.definitions), *args]
        self.process = _spawn(self.command, self.log_path)
        wait_until(self._healthy, timeout, "the control plane's /healthz")

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"control plane exited ({self.process.returncode}):\n{self.log()}")
        try:
            return self.call("GET", "/healthz", timeout=0.5)[0] == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no goodbye to the engines (a crash, an OOM kill, a lost node)."""
        assert self.process is not None
        _stop(self.process, signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: float = 5.0,
        token: str | None = "",
    ) -> tuple[int, Any]:
        """One admin request with ``token`` (default: the read-write one; None: no header)."""
        conn = http.client.HTTPConnection(HOST, self.admin_port, timeout=timeout)
        token = self.token if token == "" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
            conn.request(method, path, body=data, headers=headers)
            reply = conn.getresponse()
            return reply.status, json.loads(reply.read() or b"null")
        finally:
            conn.close()

    def put_route(self, key: str, spec: Any) -> str:
        status, body = self.call("PUT", f"/routes/{key}", spec)
        assert status == 200, body
        return str(body["version"])

    def status(self) -> dict[str, Any]:
        status, body = self.call("GET", "/status")
        assert status == 200
        return dict(body)

    def wait_acked(self, version: str, nodes: set[str], timeout: float = 10.0) -> None:
        """Until every engine in ``nodes`` has ACKed ``version`` (on an open stream)."""

        def done() -> bool:
            acked = {
                e["node"]
                for e in self.status()["engines"]
                if e["connected"] and e["ackedVersion"] == version
            }
            return nodes <= acked

        wait_until(done, timeout, f"{sorted(nodes)} to ACK {version}")

    def close(self) -> None:
        if self.process is not None:
            _stop(self.process)

    def __enter__(self) -> ControlPlaneProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EngineXdsProcess:
    """The engine CLI as a child process, configured by ``--xds``. A context manager.

    ``binary``: a builder-made engine; default the engine of :func:`e2e_registry`.
    ``port``: the ext_proc port (default: a free one), so an Envoy can be started first.
    ``credentials``: how :meth:`health` reaches a TLS listener (default plaintext).
    ``workers``: ``--workers``. ``cwd``: its working directory (relative paths in
    parameters, such as a ``caFile``, resolve there: another "host"). :attr:`command` is
    the argv it runs.
    """

    def __init__(
        self,
        xds_port: int,
        node_id: str,
        workdir: Path,
        *,
        max_backoff: float = 1.0,
        extra: list[str] | None = None,
        binary: Path | None = None,
        start_timeout: float = 20.0,
        port: int | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        workers: int = 1,
        cwd: Path | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.node_id = node_id
        self.credentials = credentials
        self.log_path = workdir / f"engine-{node_id}.log"
        argv = [
            "--xds",
            f"{HOST}:{xds_port}",
            "--node-id",
            node_id,
            "--listen",
            f"{HOST}:{self.port}",
            "--workers",
            str(workers),
            "--xds-max-backoff",
            str(max_backoff),
            "--grace",
            "1",
            *(extra or []),
        ]
        self.command = (
            [str(binary), *argv]
            if binary is not None
            else [sys.executable, "-c", ENGINE_SCRIPT, *argv]
        )
        self.process = _spawn(self.command, self.log_path, cwd)
        try:
            wait_until(self._listening, start_timeout, f"engine {node_id} to listen")
        except BaseException:
            self.close()
            raise

    def _listening(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"engine exited ({self.process.returncode}):\n{self.log()}")
        return self.health() is not None

    def health(self) -> int | None:
        """The health status (SERVING=1, NOT_SERVING=2), None if unreachable."""
        target = f"{HOST}:{self.port}"
        with (
            grpc.insecure_channel(target)
            if self.credentials is None
            else grpc.secure_channel(target, self.credentials)
        ) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=0.5
                )
            except grpc.RpcError:
                return None
            return int(reply.status)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def close(self) -> None:
        _stop(self.process)

    def __enter__(self) -> EngineXdsProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LoopThread:
    """An event loop on a thread, for the raw xDS server beside synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run ``coro`` on the loop; its result, within ``timeout`` seconds."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@dataclass
class Sample:
    started: float
    at: float  # when the answer arrived
    status: int
    value: str


class PacedLoad:
    """``rate`` requests per second to ``path`` through Envoy on ``port``, until :meth:`stop`.

    Open loop: ``workers`` threads take turns on a fixed schedule (request k is due at
    start + k/rate), so a slow request does not lower the rate. Each request records
    (start, end, status, upstream-seen ``header`` or ""); :attr:`samples` is in
    completion order. Any exception (refused, reset, timeout) is a failure.
    """

    def __init__(
        self,
        port: int,
        path: str,
        *,
        rate: float = 50.0,
        header: str = "x-version",
        workers: int = 25,
    ) -> None:
        self.port, self.path, self.rate, self.header = port, path, rate, header
        self.samples: list[Sample] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._threads = [
            threading.Thread(target=self._run, args=(i, workers), daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int, workers: int) -> None:
        k = index
        while not self._stop.is_set():
            delay = self._start + k / self.rate - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            k += workers
            started = time.monotonic()
            try:
                reply = http_request(self.port, self.path, timeout=5)
                value = (reply.echo or {}).get("headers", {}).get(self.header, "")
                sample = Sample(started, time.monotonic(), reply.status, value)
                with self._lock:
                    self.samples.append(sample)
            except BaseException as exc:  # every failure counts
                with self._lock:
                    self.errors.append(exc)

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Until ``count`` more samples than now have been recorded."""
        target = len(self.samples) + count
        wait_until(lambda: len(self.samples) >= target, timeout, f"{count} more requests")

    def latest(self) -> str:
        """The value seen by the request that started last among those answered."""
        with self._lock:
            return max(self.samples, key=lambda s: s.started).value if self.samples else ""

    def stop(self) -> list[Sample]:
        """Stop; the samples sorted by start time."""
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        return sorted(self.samples, key=lambda s: s.started)

    def failures(self) -> list[str]:
        bad = [f"status {s.status}" for s in self.samples if s.status != 200]
        return bad + [repr(e) for e in self.errors]

    def rate_seen(self) -> float:
        """Requests answered per second over the run."""
        samples = sorted(self.samples, key=lambda s: s.started)
        if len(samples) < 2:
            return 0.0
        return (len(samples) - 1) / (samples[-1].started - samples[0].started)


def assert_switched(samples: list[Sample], old: str, new: str) -> None:
    """``old`` first, ``new`` last, and no request that started after a ``new`` answer
    arrived saw ``old`` (copy-on-write: once applied, the old chain never comes back)."""
    assert samples[0].value == old
    assert samples[-1].value == new
    first_new = min(s.at for s in samples if s.value == new)
    late_old = [s for s in samples if s.value == old and s.started > first_new]
    assert not late_old, f"{len(late_old)} requests saw {old!r} after {new!r} was served"
    assert {s.value for s in samples} == {old, new}
