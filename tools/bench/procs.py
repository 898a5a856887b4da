"""The benchmark's process tree: nginx, the engine (and its workers), trivial servicers, Envoy.

Every process is a child of the benchmark, listens on 127.0.0.1, and is stopped (SIGTERM, then
SIGKILL) by :class:`Procs`, whatever happens. :func:`cpu_seconds` and :func:`rss_bytes` read
``/proc/<pid>/stat`` and ``/proc/<pid>/status`` of a process *and its children* (the engine's
workers), :func:`worker_io` the bytes each worker read (its share of the streams).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.bench.loadtools import Tools

__all__ = [
    "HOST",
    "Procs",
    "children",
    "cpu_seconds",
    "free_port",
    "read_io",
    "rss_bytes",
]

HOST: Final = "127.0.0.1"
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
        return True
    return False


# ------------------------------------------------------------------------------ /proc


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the engine's workers)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    return found


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        # comm (field 2) may hold spaces: split after its closing parenthesis.
        return f.read().rpartition(")")[2].split()


def cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime of ``pid`` and each child, in seconds: {pid: seconds}."""
    result: dict[int, float] = {}
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError):
            fields = _stat_fields(p)
            result[p] = (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
    return result


def rss_bytes(pid: int) -> dict[int, int]:
    """Resident set size of ``pid`` and each child: {pid: bytes}."""
    result: dict[int, int] = {}
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    result[p] = int(line.split()[1]) * 1024
    return result


def read_io(pid: int) -> dict[int, int]:
    """Bytes read (``rchar``: sockets included) by ``pid`` and each child: {pid: bytes}."""
    result: dict[int, int] = {}
    for p in [pid, *children(pid)]:
        with contextlib.suppress(OSError), open(f"/proc/{p}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    result[p] = int(line.split()[1])
    return result


# ------------------------------------------------------------------------------ processes


class Procs:
    """Starts the benchmark's servers; :meth:`close` stops every one of them."""

    def __init__(self, workdir: Path, tools: Tools) -> None:
        self.workdir = workdir
        self.tools = tools
        self._procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def _spawn(self, name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs
        )
        self._procs.append((name, proc, log))
        return proc

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _check_alive(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.log_tail(name)}")

    def _alive_and_listening(self, name: str, proc: subprocess.Popen[bytes], port: int) -> bool:
        self._check_alive(name, proc)
        return _listening(port)

    # -- nginx -----------------------------------------------------------------------

    def nginx(self) -> int:
        """Start nginx answering ``200 ok`` on every path (bodies are read and dropped)."""
        port = free_port()
        prefix = self.workdir / "nginx"
        prefix.mkdir()
        temp = "\n".join(
            f"    {kind}_temp_path {prefix}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        user = "user root root;\n" if os.geteuid() == 0 else ""
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"""{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log stderr warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 16384; }}
http {{
    access_log off;
{temp}
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_max_body_size 16m;
    client_body_buffer_size 1m;
    server {{
        listen {HOST}:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 "ok\\n"; }}
    }}
}}
"""
        )
        proc = self._spawn(
            "nginx",
            [str(self.tools.nginx), "-p", str(prefix), "-c", str(conf), "-e", "stderr"],
            env=self.tools.env,
        )
        _wait(lambda: self._alive_and_listening("nginx", proc, port), 10, "nginx")
        return port

    # -- gRPC servers ----------------------------------------------------------------

    def _python(
        self, name: str, module: str, args: Sequence[str], *, tree: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """``python -m module args`` with this process's path; ``tree``: another checkout of
        the repository whose code comes first (and the working directory, which ``-m`` puts
        first on the path): tools/bench/ab_http.py runs two checkouts side by side."""
        env = dict(os.environ)
        paths = [p for p in sys.path if p]
        if tree is not None:
            paths = [str(tree), str(tree / "generated" / "python"), *paths]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return self._spawn(name, [sys.executable, "-m", module, *args], env=env, cwd=tree)

    def _wait_serving(self, name: str, proc: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(f"{HOST}:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive(name, proc)
                with contextlib.suppress(grpc.RpcError):
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not become SERVING:\n{self.log_tail(name)}")
                time.sleep(0.1)

    def engine(
        self,
        name: str,
        config: dict[str, Any],
        *,
        workers: int,
        tls: tuple[str, str, str] | None = None,
        http_port: int | None = None,
        tree: Path | None = None,
    ) -> tuple[int, int]:
        """Start the engine (``workers`` processes); return (port, pid of its parent).

        ``tls``: (certificate, key, client CA) files: the listener requires client
        certificates (mTLS); readiness is then read on a loopback ``--health-listen`` port.
        ``http_port``: also serve the HTTP ext_proc transport there (``--listen-http``).
        ``tree``: run another checkout's engine (see :meth:`_python`)."""
        port = free_port()
        extra: list[str] = [] if http_port is None else [f"--listen-http={HOST}:{http_port}"]
        health_port = port
        if tls is not None:
            health_port = free_port()
            extra += [
                *("--tls-cert", tls[0], "--tls-key", tls[1], "--tls-client-ca", tls[2]),
                *("--health-listen", f"{HOST}:{health_port}"),
            ]
        path = self.workdir / f"{name}-config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = self._python(
            name,
            "tools.bench.engine_main",
            [
                "--config",
                str(path),
                "--listen",
                f"{HOST}:{port}",
                f"--workers={workers}",
                "--log-level=WARNING",
                *extra,
            ],
            tree=tree,
        )
        self._wait_serving(name, proc, health_port)
        if workers > 1:  # every worker must listen before the load starts
            _wait(lambda: len(children(proc.pid)) >= workers, 10, f"{workers} engine workers")
            time.sleep(0.5)
        return port, proc.pid

    def floor(self, impl: str) -> tuple[int, int]:
        """Start a trivial ext_proc servicer (see tools/bench/floor.py); return (port, pid)."""
        port = free_port()
        name = f"floor-{impl}"
        proc = self._python(name, "tools.bench.floor", ["--impl", impl, "--port", str(port)])
        _wait(lambda: self._alive_and_listening(name, proc, port), 30, name)
        return port, proc.pid

    def http_floor(self) -> tuple[int, int]:
        """Start the trivial HTTP ext_proc server (tools/bench/http_floor.py): (port, pid)."""
        port = free_port()
        proc = self._python("floor-http", "tools.bench.http_floor", ["--port", str(port)])
        _wait(lambda: self._alive_and_listening("floor-http", proc, port), 30, "floor-http")
        return port, proc.pid

    # -- Envoy -----------------------------------------------------------------------

    def envoy(self, name: str, binary: Path, bootstrap: dict[str, Any], *, concurrency: int) -> int:
        """Start Envoy with ``bootstrap`` (admin port read from it); return its pid."""
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
        admin = bootstrap["admin"]["address"]["socket_address"]["port_value"]
        listener = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]
        proc = self._spawn(
            name,
            [
                str(binary),
                "-c",
                str(path),
                "--disable-hot-restart",
                "--concurrency",
                str(concurrency),
                "-l",
                "warn",
            ],
        )

        def ready() -> bool:
            self._check_alive(name, proc)
            try:
                with urllib.request.urlopen(f"http://{HOST}:{admin}/ready", timeout=0.5) as r:
                    if r.read().strip() != b"LIVE":
                        return False
            except OSError:
                return False
            return _listening(listener["port_value"])

        _wait(ready, 30, f"{name} /ready == LIVE")
        return proc.pid

    def stop(self, pid: int) -> None:
        """Stop one of our processes (and reap it)."""
        for entry in list(self._procs):
            if entry[1].pid == pid:
                self._terminate(*entry)
                self._procs.remove(entry)

    @staticmethod
    def _terminate(name: str, proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        log.close()

    def close(self) -> None:
        while self._procs:
            self._terminate(*self._procs.pop())


def envoy_stats(admin_port: int, prefix: str = "") -> dict[str, int]:
    """Envoy's counters and gauges (name -> value), optionally only those matching ``prefix``."""
    url = f"http://{HOST}:{admin_port}/stats"
    if prefix:
        url += f"?filter={prefix}"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    stats: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        with contextlib.suppress(ValueError):
            stats[key] = int(value)
    return stats
