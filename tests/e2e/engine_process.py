"""An engine process of its own (``python -m``-style, through ``engine.main``), for tests
that need several engines, worker processes or a real shutdown: the policies of given
folders are compiled in, as the builder would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.harness import free_port

__all__ = ["EngineProcess"]

ROOT = Path(__file__).resolve().parents[2]
_ENGINE = (
    "import os, sys\n"
    "from engine.main import main\n"
    "from engine.registry import PolicyRegistry, load_policy\n"
    "folders = os.environ['RL_POLICY_FOLDERS'].split(os.pathsep)\n"
    "registry = PolicyRegistry([load_policy(folder) for folder in folders])\n"
    "sys.exit(main(sys.argv[1:], registry=registry))\n"
)


class EngineProcess:
    """An engine process (``workers`` workers) on a fixed 127.0.0.1 port, with the policies
    of ``policy_folders`` compiled in and ``redis_url`` in ``RL_REDIS_URL``
    (the configs of these tests read it through ``redisUrlEnv``)."""

    def __init__(
        self,
        config_path: Path,
        redis_url: str,
        workers: int,
        log: Path,
        *,
        policy_folders: Sequence[Path],
    ) -> None:
        self.port = free_port()
        self.workers = workers
        self.log_path = log
        folders = os.pathsep.join(str(folder) for folder in policy_folders)
        env = {**os.environ, "RL_POLICY_FOLDERS": folders, "RL_REDIS_URL": redis_url}
        argv = ["--config", str(config_path), "--listen", f"127.0.0.1:{self.port}"]
        argv += ["--workers", str(workers), "--grace", "1"]
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _ENGINE, *argv],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=out,
                stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_serving()
        except BaseException:
            self.close()
            raise

    def _wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.process.poll() is None, self.log()[-5000:]
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                assert time.monotonic() < deadline, f"engine not SERVING:\n{self.log()[-5000:]}"
                time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
