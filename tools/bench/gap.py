"""Where the end-to-end cost of a chain goes: instructions per request, server vs in-process.

Issue 17 item 5: chains with dynamic policies cost more end to end than their in-process figure
(``tools/bench/hotpath.py``) explains. Wall-clock and CPU-second figures on a shared 2-core host
are noisy, so this counts instructions with valgrind's callgrind (repeatable under load) and
attributes them by shared object / function group.

One run, side by side, each server process under ``valgrind --tool=callgrind`` with
instrumentation switched on only for the measured requests (``callgrind_control``):

* (a) the trivial grpc.aio + uvloop servicer (``tools/bench/floor.py``), 1 and 2 messages;
* (b) the engine (``tools/bench/engine_main.py``, ``--workers 1``) on static chains (answered
  from a prebuilt reply): ``empty``, ``headers-request`` (5 x setHeader), ``headers`` (+1
  response header, 2 messages);
* (c) the engine on dynamic chains: ``auth`` (apiKey + rateLimit), ``jwt`` (jwtValidation +
  rateLimit against the JWKS test double);
* the same chains in-process (``PolicyProcessor.Process`` driven as grpc.aio does, as
  ``tools/bench/hotpath.py`` does), in a child process under callgrind.

The driver is a grpc.aio client in this process (not counted) playing Envoy's part directly on
the ext_proc stream, without Envoy: one stream per request with the route key as invocation
metadata, the request headers Envoy 1.36 sends for wrk's GET, the response headers only when
the reply's ``mode_override`` asks for them, then half-close: it isolates the engine process
and records how many messages each chain asks for.

Before the callgrind part, the same servers run without valgrind (``--cpu-requests``, 0 to
skip): ``--rounds`` interleaved passes per row give each server's CPU per request split into
the event-loop thread and grpc's own threads (``/proc/<pid>/task/*/schedstat``), voluntary
context switches per request, and (``strace -f -c`` attached for one more pass, when strace is
on PATH) system calls per request; in the same rounds the chains run in-process timed in CPU
seconds, "hot" (back to back, as hotpath measures) and "cold" (caches evicted before each
request, see ``InProcess``). ``--cache-sim`` adds callgrind's simulated cache misses.

Needs valgrind (``valgrind``, ``callgrind_control``, ``callgrind_annotate``) on PATH, so it is
not a Bazel target: ``tools/bazel`` runs Bazel in an offline root that has no valgrind. Run it
from the repository root with the locked requirements installed, after generating the protos
(``python -m tools.protoc.gen_protos``)::

    PYTHONPATH=.:generated/python python -m tools.bench.gap [--requests N] [--cache-sim]

About 4-5 minutes with the defaults on this machine kind (callgrind runs ~50x slower; twice as
long with ``--cache-sim``). ``--keep DIR`` keeps the dumps for ``callgrind_annotate``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import yaml
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from engine.transport.messages import ROUTE_METADATA_KEY
from policies.jwtValidation.testing import JwksServer, KeySet, claims, make_pki
from tools.bench import hotpath
from tools.bench.paths import engine_config
from tools.bench.procs import HOST, free_port

__all__ = ["GROUPS", "main", "measure_server"]

_METHOD: Final = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
_SEND: Final = processing_mode_pb2.ProcessingMode.SEND
STATIC: Final = ("empty", "headers-request", "headers")
DYNAMIC: Final = ("auth", "jwt")
# Function groups, first match wins: (label, regex on "object:function").
GROUPS: Final = (
    ("grpc core + cython (cygrpc)", r"cygrpc"),
    ("protobuf (upb)", r"_message\.|upb|protobuf"),
    ("uvloop", r"uvloop|loop\.cpython"),
    ("libuv/epoll", r"libuv"),
    ("python: eval loop", r"_PyEval_EvalFrameDefault"),
    ("python: gc", r"gc_collect|visit_|subtract_refs|update_refs|move_unreachable|deduce_"),
    ("python: alloc/free", r"PyObject_Malloc|PyObject_Free|pymalloc|_PyObject_GC_|dealloc"),
    ("python: other", r"libpython|/python3"),
    ("libc malloc", r"malloc|free|realloc|calloc|_int_|tcache"),
    ("libc other", r"libc\.so|libc-"),
    ("other", r"."),
)


# -- the client playing Envoy ---------------------------------------------------------------


async def _drive(port: int, route: str, messages: list[bytes], n: int, concurrency: int) -> int:
    """``n`` requests on ``route``, ``concurrency`` streams at a time; returns the number of
    ext_proc messages the server asked for per request (the last one's)."""
    async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
        call_factory = channel.stream_stream(
            _METHOD,
            request_serializer=lambda raw: raw,
            response_deserializer=pb.ProcessingResponse.FromString,
        )
        metadata = ((ROUTE_METADATA_KEY, route),)
        sent = 0
        counter = iter(range(n))

        async def one() -> int:
            call: Any = call_factory(metadata=metadata)  # type: ignore[call-arg]
            await call.write(messages[0])
            reply = await call.read()
            count = 1
            if reply.mode_override.response_header_mode == _SEND:
                await call.write(messages[-1])
                await call.read()
                count = 2
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
            return count

        async def worker() -> None:
            nonlocal sent
            for _ in counter:
                sent = await one()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return sent


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 600.0) -> None:
    import socket  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}) before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"server not listening on {port} after {timeout:.0f} s")


def _control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


def _valgrind(out: Path, cache_sim: bool) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--cache-sim={'yes' if cache_sim else 'no'}",
        f"--callgrind-out-file={out}",
    ]


def _dump(pid: int, out: Path, label: str) -> Path:
    """Dump the counters since the last zeroing into ``out.<n>`` and return that file."""
    before = set(out.parent.glob(f"{out.name}.*"))
    _control(pid, "-d", label)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = set(out.parent.glob(f"{out.name}.*")) - before
        if new:
            path = new.pop()
            time.sleep(0.5)  # let the file be complete
            return path
        time.sleep(0.2)
    raise RuntimeError(f"callgrind dump {label} did not appear")


def measure_server(
    argv: list[str],
    port: int,
    workload: list[tuple[str, list[bytes]]],
    *,
    requests: int,
    concurrency: int,
    workdir: Path,
    name: str,
    cache_sim: bool = False,
) -> dict[str, tuple[Path, int]]:
    """Start ``argv`` under callgrind; for each (route, messages): warm up, zero, drive
    ``requests`` requests, dump. Returns route -> (dump file, messages per request)."""
    out = workdir / f"cg-{name}"
    proc = subprocess.Popen(
        [*_valgrind(out, cache_sim), *argv],
        stdout=subprocess.DEVNULL,
        stderr=(workdir / f"{name}.log").open("wb"),
    )
    results: dict[str, tuple[Path, int]] = {}
    try:
        _wait_port(port, proc)
        _control(proc.pid, "-i", "on")
        for route, messages in workload:
            asyncio.run(_drive(port, route, messages, max(20, requests // 5), concurrency))
            _control(proc.pid, "-z")
            count = asyncio.run(_drive(port, route, messages, requests, concurrency))
            results[route] = (_dump(proc.pid, out, route), count)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return results


# -- in-process (hotpath) under callgrind -------------------------------------------------


def _inprocess_child(routes: list[str]) -> int:
    """Child mode: build hotpath's processor, then per stdin line ``ROUTE N`` run N requests
    and answer ``done`` (the parent zeroes and dumps callgrind around each)."""
    loop = hotpath._new_loop()
    with hotpath._processor() as (processor, token):
        ones: dict[str, Any] = {}
        for route in routes:
            if route.startswith("floor"):
                ones[route] = hotpath._floor_request(int(route[-1]))
            else:
                ones[route] = hotpath._engine_request(processor, route, token)
            loop.run_until_complete(ones[route]())
        print("ready", flush=True)
        for line in sys.stdin:
            route, n = line.split()

            async def many(one: Any = ones[route], count: int = int(n)) -> None:
                for _ in range(count):
                    await one()

            loop.run_until_complete(many())
            print("done", flush=True)
    loop.close()
    return 0


def measure_inprocess(
    routes: list[str], *, requests: int, workdir: Path, cache_sim: bool = False
) -> dict[str, tuple[Path, int]]:
    out = workdir / "cg-inprocess"
    proc = subprocess.Popen(
        [
            *_valgrind(out, cache_sim),
            sys.executable,
            "-m",
            "tools.bench.gap",
            "--child",
            ",".join(routes),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(workdir / "inprocess.log").open("wb"),
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    results: dict[str, tuple[Path, int]] = {}
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"in-process child failed; see {workdir / 'inprocess.log'}")
        _control(proc.pid, "-i", "on")
        for route in routes:
            for count in (max(20, requests // 5), requests):
                if count == requests:
                    _control(proc.pid, "-z")
                proc.stdin.write(f"{route} {count}\n")
                proc.stdin.flush()
                if proc.stdout.readline().strip() != "done":
                    raise RuntimeError("in-process child stopped")
            results[route] = (_dump(proc.pid, out, f"inprocess-{route}"), 0)
    finally:
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return results


# -- reading the dumps ----------------------------------------------------------------------

_LINE: Final = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*?)\s*$")


def functions(dump: Path, *, inclusive: bool = False) -> dict[str, int]:
    """``object:function`` -> instructions (exclusive, or inclusive) of one dump."""
    args = [
        "callgrind_annotate",
        "--threshold=100",
        "--show=Ir",
        f"--inclusive={'yes' if inclusive else 'no'}",
    ]
    text = subprocess.run([*args, str(dump)], check=True, capture_output=True, text=True).stdout
    table: dict[str, int] = {}
    started = False
    for line in text.splitlines():
        if not started:
            started = line.startswith("Ir") and "file:function" in line
            continue
        m = _LINE.match(line)
        if m and not line.lstrip().startswith("-"):
            table[m.group(2)] = table.get(m.group(2), 0) + int(m.group(1).replace(",", ""))
    return table


def counts(dump: Path) -> dict[str, int]:
    """The dump's event totals: ``Ir`` (instructions) and, with ``--cache-sim``, the
    simulated cache misses (``I1mr``, ``D1mr``, ``D1mw``, ``ILmr``, ``DLmr``, ``DLmw``)."""
    events: list[str] = []
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            return dict(zip(events, (int(x) for x in line.split()[1:]), strict=False))
    raise RuntimeError(f"no totals in {dump}")


def total(dump: Path) -> int:
    """Instructions in ``dump``."""
    return counts(dump)["Ir"]


def grouped(table: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = collections.Counter()
    for name, ir in table.items():
        for label, pattern in GROUPS:
            if re.search(pattern, name):
                out[label] += ir
                break
    return dict(out)


# -- without valgrind: CPU per thread, context switches, system calls ------------------------


@dataclass(frozen=True)
class Cpu:
    """One row's figures per request, measured on the server without valgrind."""

    loop_us: float
    """CPU of the event-loop thread (the process's main thread: Python, uvloop, cygrpc)."""
    grpc_us: float
    """CPU of every other thread (grpc's poller and EventEngine threads)."""
    switches: float
    """Voluntary context switches, all threads (each one a thread going to sleep)."""


def _threads(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (CPU ns, voluntary context switches) of each thread of ``pid``."""
    out: dict[int, tuple[int, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended between listing and reading
        switches = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
        out[int(tid)] = (ns, switches)
    return out


def _cpu_delta(pid: int, before: dict[int, tuple[int, int]], n: int) -> Cpu:
    after = _threads(pid)
    loop = grpc_ns = switches = 0
    for tid, (ns, sw) in after.items():
        ns0, sw0 = before.get(tid, (0, 0))
        if tid == pid:
            loop += ns - ns0
        else:
            grpc_ns += ns - ns0
        switches += sw - sw0
    return Cpu(loop / n / 1000, grpc_ns / n / 1000, switches / n)


def _syscalls(pid: int, port: int, route: str, messages: list[bytes], *, n: int, c: int) -> float:
    """System calls per request, all threads (``strace -f -c`` attached for ``n`` requests)."""
    with tempfile.NamedTemporaryFile(prefix="gap-strace-", suffix=".txt") as out:
        tracer = subprocess.Popen(
            ["strace", "-f", "-c", "-o", out.name, "-p", str(pid)], stderr=subprocess.DEVNULL
        )
        time.sleep(1.5)  # strace attaches to every thread before the measured requests
        asyncio.run(_drive(port, route, messages, n, c))
        tracer.send_signal(signal.SIGINT)
        tracer.wait(60)
        text = Path(out.name).read_text()
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[-1] == "total":
            return int(fields[2] if len(fields) == 4 else fields[3]) / n
    raise RuntimeError(f"no strace summary: {text[:200]!r}")


class InProcess:
    """The chains in-process (hotpath's driver), timed in CPU seconds of this thread.

    ``hot``: requests back to back, as ``hotpath`` measures them (code and data stay in the
    caches). ``cold``: before each request, 16 MB of memory are written (more than the 8 MB
    L3 of this machine kind) and unrelated interpreter code runs (a JSON round trip), as a
    server's request runs after gRPC's threads, the event loop and other processes had the
    core; only the request itself is timed.
    """

    def __init__(self, routes: list[str]) -> None:
        self._stack = contextlib.ExitStack()
        self._loop = hotpath._new_loop()
        self._stack.callback(self._loop.close)
        processor, token = self._stack.enter_context(hotpath._processor())
        self._ones: dict[str, Any] = {}
        for route in routes:
            if route.startswith("floor"):
                self._ones[route] = hotpath._floor_request(int(route[-1]))
            else:
                self._ones[route] = hotpath._engine_request(processor, route, token)
            self._loop.run_until_complete(self._ones[route]())  # JWKS fetched once here
        self._junk = bytearray(16 << 20)
        self._blob = {f"k{i}": [i, str(i), {"v": i / 3}] for i in range(5000)}

    def _evict(self) -> None:
        self._junk[::64] = b"\x01" * (len(self._junk) // 64)
        json.loads(json.dumps(self._blob))

    def cpu_us(self, route: str, n: int, *, cold: bool) -> float:
        """Median CPU us of one request on ``route`` over ``n`` requests."""
        one = self._ones[route]

        async def many() -> list[int]:
            times = []
            for _ in range(n):
                if cold:
                    self._evict()
                start = time.thread_time_ns()
                await one()
                times.append(time.thread_time_ns() - start)
            return times

        return statistics.median(self._loop.run_until_complete(many())) / 1000

    def close(self) -> None:
        self._stack.close()


def measure_cpu(
    servers: list[tuple[list[str], int, list[tuple[str, list[bytes]]]]],
    *,
    requests: int,
    concurrency: int,
    rounds: int,
    workdir: Path,
    inprocess: InProcess,
) -> dict[str, tuple[Cpu, float | None, float, float]]:
    """Each server (argv, port, workload) started plainly; ``rounds`` interleaved passes of
    ``requests`` per route, each round followed by ``inprocess``'s hot and cold passes; the
    median of each figure; then one pass under strace per route (None when strace is not on
    PATH). Returns route -> (Cpu, syscalls per request, in-process hot us, cold us)."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        rows: list[tuple[int, int, str, list[bytes]]] = []
        for i, (argv, port, workload) in enumerate(servers):
            log = (workdir / f"cpu-{i}.log").open("wb")
            procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log))
            _wait_port(port, procs[-1])
            rows += [(procs[-1].pid, port, route, messages) for route, messages in workload]
        for _, port, route, messages in rows:
            asyncio.run(_drive(port, route, messages, max(200, requests // 5), concurrency))
        samples: dict[str, list[Cpu]] = collections.defaultdict(list)
        hot: dict[str, list[float]] = collections.defaultdict(list)
        cold: dict[str, list[float]] = collections.defaultdict(list)
        in_n = max(100, requests // 8)
        for _ in range(rounds):
            for pid, port, route, messages in rows:
                before = _threads(pid)
                asyncio.run(_drive(port, route, messages, requests, concurrency))
                samples[route].append(_cpu_delta(pid, before, requests))
            for _, _, route, _ in rows:
                hot[route].append(inprocess.cpu_us(route, in_n, cold=False))
                cold[route].append(inprocess.cpu_us(route, in_n, cold=True))
        traced = shutil.which("strace") is not None
        out: dict[str, tuple[Cpu, float | None, float, float]] = {}
        for pid, port, route, messages in rows:
            got = samples[route]
            cpu = Cpu(
                statistics.median(c.loop_us for c in got),
                statistics.median(c.grpc_us for c in got),
                statistics.median(c.switches for c in got),
            )
            n = max(200, requests // 4)
            calls = _syscalls(pid, port, route, messages, n=n, c=concurrency) if traced else None
            out[route] = (cpu, calls, statistics.median(hot[route]), statistics.median(cold[route]))
        return out
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- the run --------------------------------------------------------------------------------


def _config(workdir: Path, jwks_url: str, ca: str) -> Path:
    config = engine_config(jwks_url, ca)
    routes = config["routes"]
    rate_limit = copy.deepcopy(routes["jwt"]["policies"][1])
    rate_limit["parameters"]["keyName"] = "apiKey.consumer"
    api_key = {
        "name": "apiKey",
        "version": "v1.0.0",
        "parameters": {"keys": [{"key": hotpath._API_KEY, "consumer": "bench"}]},
    }
    routes["auth"] = {"policies": [api_key, rate_limit]}
    # Under callgrind the engine lives longer than the default 5 minute JWKS TTL and a TLS
    # fetch takes seconds: no background refresh inside a measured window.
    routes["jwt"]["policies"][0]["parameters"].update(jwksCacheTtl="1h", fetchTimeout="60s")
    path = workdir / "gap-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass(frozen=True)
class Options:
    """What one run measures (the command-line options)."""

    requests: int
    concurrency: int
    cache_sim: bool
    cpu_requests: int
    rounds: int


def run(options: Options, workdir: Path) -> Iterator[str]:
    keys = KeySet.generate()
    (workdir / "pki").mkdir(exist_ok=True)
    pki = make_pki(workdir / "pki")
    token = keys.rsa.sign(claims(sub="bench", exp=int(time.time()) + 3600))
    chains = [*STATIC, *DYNAMIC]
    with JwksServer(pki, keys.published) as jwks:
        config = _config(workdir, jwks.url, str(pki.ca_file))
        floor_port, engine_port = free_port(), free_port()
        floor_argv = [
            *[sys.executable, "-m", "tools.bench.floor"],
            *["--impl", "grpcaio-uvloop", "--port", str(floor_port)],
        ]
        engine_argv = [
            *[sys.executable, "-m", "tools.bench.engine_main"],
            f"--config={config}",
            f"--listen={HOST}:{engine_port}",
            "--workers=1",
            "--log-level=WARNING",
        ]
        floor_work = [(f"floor{n}", hotpath._messages("headers")) for n in (1, 2)]
        engine_work = [(route, hotpath._messages(route, token)) for route in chains]
        cpu: dict[str, tuple[Cpu, float | None, float, float]] = {}
        if options.cpu_requests:
            inprocess = InProcess(["floor1", "floor2", *chains])
            try:
                cpu = measure_cpu(
                    [
                        (floor_argv, floor_port, floor_work),
                        (engine_argv, engine_port, engine_work),
                    ],
                    requests=options.cpu_requests,
                    concurrency=options.concurrency,
                    rounds=options.rounds,
                    workdir=workdir,
                    inprocess=inprocess,
                )
            finally:
                inprocess.close()
        common: dict[str, Any] = {
            "requests": options.requests,
            "concurrency": options.concurrency,
            "workdir": workdir,
            "cache_sim": options.cache_sim,
        }
        floor = measure_server(floor_argv, floor_port, floor_work, name="floor", **common)
        engine = measure_server(engine_argv, engine_port, engine_work, name="engine", **common)
    inproc = measure_inprocess(
        ["floor1", "floor2", *chains],
        requests=options.requests,
        workdir=workdir,
        cache_sim=options.cache_sim,
    )
    yield from report(floor, engine, inproc, cpu, options)


def _cpu_table(
    cpu: dict[str, tuple[Cpu, float | None, float, float]], options: Options
) -> Iterator[str]:
    yield (
        f"without valgrind, CPU us per request (median of {options.rounds} interleaved passes: "
        f"server {options.cpu_requests} requests, in-process {max(100, options.cpu_requests // 8)}"
        "); voluntary context switches and system calls (strace -f -c, one pass) per request"
    )
    yield ""
    yield (
        "| chain | server: loop thread | grpc threads | total | in-process hot | in-process cold "
        "| switches | syscalls |"
    )
    yield "|---|---|---|---|---|---|---|---|"
    for name, (c, calls, hot, cold) in cpu.items():
        sys_calls = "-" if calls is None else f"{calls:.1f}"
        yield (
            f"| {name} | {c.loop_us:.0f} | {c.grpc_us:.0f} | {c.loop_us + c.grpc_us:.0f} "
            f"| {hot:.1f} | {cold:.1f} | {c.switches:.1f} | {sys_calls} |"
        )
    yield ""
    base = cpu["headers-request"]
    yield "dynamic minus static (headers-request), us per request"
    yield ""
    yield "| chain | server loop thread | grpc threads | in-process hot | in-process cold |"
    yield "|---|---|---|---|---|"
    for name in DYNAMIC:
        c, _, hot, cold = cpu[name]
        yield (
            f"| {name} | {c.loop_us - base[0].loop_us:+.0f} | {c.grpc_us - base[0].grpc_us:+.0f} "
            f"| {hot - base[2]:+.1f} | {cold - base[3]:+.1f} |"
        )
    yield ""


def report(
    floor: dict[str, tuple[Path, int]],
    engine: dict[str, tuple[Path, int]],
    inproc: dict[str, tuple[Path, int]],
    cpu: dict[str, tuple[Cpu, float | None, float, float]],
    options: Options,
) -> Iterator[str]:
    requests = options.requests

    def per(dump: Path, event: str = "Ir") -> float:
        return counts(dump).get(event, 0) / requests / 1000

    rows = {**floor, **engine}
    yield (
        f"instructions per request (thousands, callgrind; {requests} requests per row, "
        f"{options.concurrency} streams in flight)"
    )
    yield ""
    yield "| chain | messages | server (k instr) | in-process (k instr) | server - in-process |"
    yield "|---|---|---|---|---|"
    for name, (dump, count) in rows.items():
        server = per(dump)
        inner = per(inproc[name][0]) if name in inproc else float("nan")
        yield f"| {name} | {count} | {server:.0f} | {inner:.0f} | {server - inner:.0f} |"
    yield ""
    if options.cache_sim:
        yield "simulated cache misses per request (thousands; callgrind --cache-sim, one cache)"
        yield ""
        yield "| chain | I1 server | I1 in-proc | D1 server | D1 in-proc | LL server | LL in-proc |"
        yield "|---|---|---|---|---|---|---|"
        for name, (dump, _) in rows.items():
            mine = inproc[name][0]

            def d1(d: Path) -> float:
                return per(d, "D1mr") + per(d, "D1mw")

            def ll(d: Path) -> float:
                return per(d, "ILmr") + per(d, "DLmr") + per(d, "DLmw")

            yield (
                f"| {name} | {per(dump, 'I1mr'):.1f} | {per(mine, 'I1mr'):.1f} "
                f"| {d1(dump):.1f} | {d1(mine):.1f} | {ll(dump):.2f} | {ll(mine):.2f} |"
            )
        yield ""
    if cpu:
        yield from _cpu_table(cpu, options)
    static, dynamic = engine["headers-request"][0], engine["auth"][0]
    in_static, in_dynamic = inproc["headers-request"][0], inproc["auth"][0]
    groups = {
        "floor1 server": grouped(functions(floor["floor1"][0])),
        "static server": grouped(functions(static)),
        "auth server": grouped(functions(dynamic)),
        "jwt server": grouped(functions(engine["jwt"][0])),
        "static in-proc": grouped(functions(in_static)),
        "auth in-proc": grouped(functions(in_dynamic)),
        "jwt in-proc": grouped(functions(inproc["jwt"][0])),
    }
    yield (
        "k instructions per request by function group (exclusive); static = headers-request, "
        "Δ = (dynamic - static) on the server minus the same in-process"
    )
    yield ""
    names = list(groups)
    yield "| group | " + " | ".join(names) + " | Δ auth | Δ jwt |"
    yield "|---|" + "---|" * (len(names) + 2)
    for label, _ in GROUPS:
        v = [groups[n].get(label, 0) / requests / 1000 for n in names]
        d_auth = (v[2] - v[1]) - (v[5] - v[4])
        d_jwt = (v[3] - v[1]) - (v[6] - v[4])
        cells = " | ".join(f"{x:.1f}" for x in v)
        yield f"| {label} | {cells} | {d_auth:.1f} | {d_jwt:.1f} |"
    yield ""
    yield (
        "functions whose exclusive instructions per request grow most from the static to the "
        "jwt chain: on the server, and in-process"
    )
    yield ""
    on_server = _growth(functions(engine["jwt"][0]), functions(static), requests)
    in_proc = _growth(functions(inproc["jwt"][0]), functions(in_static), requests)
    yield "| function | server k instr/req | in-process k instr/req |"
    yield "|---|---|---|"
    for name, grown in sorted(on_server.items(), key=lambda kv: -kv[1])[:15]:
        yield f"| {name} | {grown:+.1f} | {in_proc.get(name, 0.0):+.1f} |"


def _growth(a: dict[str, int], b: dict[str, int], requests: int) -> dict[str, float]:
    """Per function name (object path dropped), ``a - b`` in k instructions per request."""

    def short(table: dict[str, int]) -> dict[str, int]:
        out: dict[str, int] = collections.Counter()
        for name, ir in table.items():
            function = name.split(" [")[0].rsplit(":", 1)[-1]
            out[function] += ir
        return dict(out)

    sa, sb = short(a), short(b)
    return {k: (sa.get(k, 0) - sb.get(k, 0)) / requests / 1000 for k in sa.keys() | sb.keys()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="callgrind requests per row")
    parser.add_argument("--concurrency", type=int, default=4, help="streams in flight")
    parser.add_argument(
        "--cache-sim", action="store_true", help="also simulate caches (callgrind ~2x slower)"
    )
    parser.add_argument(
        "--cpu-requests",
        type=int,
        default=1000,
        help="requests per pass without valgrind (0: skip the CPU and system-call figures)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved passes without valgrind")
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind dumps in DIR")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _inprocess_child(args.child.split(","))
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("valgrind (callgrind) is not on PATH: install Debian's valgrind package")
    options = Options(
        args.requests, args.concurrency, args.cache_sim, args.cpu_requests, args.rounds
    )
    with contextlib.ExitStack() as stack:
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            workdir = Path(args.keep)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gap-")))
        for line in run(options, workdir):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
