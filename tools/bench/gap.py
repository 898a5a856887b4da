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

Needs valgrind (``valgrind``, ``callgrind_control``, ``callgrind_annotate``) on PATH, so it is
not a Bazel target: ``tools/bazel`` runs Bazel in an offline root that has no valgrind. Run it
from the repository root with the locked requirements installed, after generating the protos
(``python -m tools.protoc.gen_protos``)::

    PYTHONPATH=.:generated/python python -m tools.bench.gap [--requests N] [--concurrency C]

About two minutes at ``--requests 60`` on this machine kind (callgrind runs ~50x slower).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import grpc
import yaml
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from engine.extproc_messages import ROUTE_METADATA_KEY
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


def _valgrind(out: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
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
) -> dict[str, tuple[Path, int]]:
    """Start ``argv`` under callgrind; for each (route, messages): warm up, zero, drive
    ``requests`` requests, dump. Returns route -> (dump file, messages per request)."""
    out = workdir / f"cg-{name}"
    proc = subprocess.Popen(
        [*_valgrind(out), *argv],
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
    routes: list[str], *, requests: int, workdir: Path
) -> dict[str, tuple[Path, int]]:
    out = workdir / "cg-inprocess"
    proc = subprocess.Popen(
        [*_valgrind(out), sys.executable, "-m", "tools.bench.gap", "--child", ",".join(routes)],
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
    args = ["callgrind_annotate", "--threshold=100", f"--inclusive={'yes' if inclusive else 'no'}"]
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


def total(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def grouped(table: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = collections.Counter()
    for name, ir in table.items():
        for label, pattern in GROUPS:
            if re.search(pattern, name):
                out[label] += ir
                break
    return dict(out)


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
    path = workdir / "gap-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(requests: int, concurrency: int, workdir: Path) -> Iterator[str]:
    keys = KeySet.generate()
    (workdir / "pki").mkdir(exist_ok=True)
    pki = make_pki(workdir / "pki")
    token = keys.rsa.sign(claims(sub="bench", exp=int(time.time()) + 3600))
    chains = [*STATIC, *DYNAMIC]
    with JwksServer(pki, keys.published) as jwks:
        config = _config(workdir, jwks.url, str(pki.ca_file))
        floor_port, engine_port = free_port(), free_port()
        py = [sys.executable, "-m"]
        floor = measure_server(
            [*py, "tools.bench.floor", "--impl", "grpcaio-uvloop", "--port", str(floor_port)],
            floor_port,
            [(f"floor{n}", hotpath._messages("headers")) for n in (1, 2)],
            requests=requests,
            concurrency=concurrency,
            workdir=workdir,
            name="floor",
        )
        engine = measure_server(
            [
                *py,
                "tools.bench.engine_main",
                f"--config={config}",
                f"--listen={HOST}:{engine_port}",
                "--workers=1",
                "--log-level=WARNING",
            ],
            engine_port,
            [(route, hotpath._messages(route, token)) for route in chains],
            requests=requests,
            concurrency=concurrency,
            workdir=workdir,
            name="engine",
        )
    inproc = measure_inprocess(["floor1", "floor2", *chains], requests=requests, workdir=workdir)
    yield from report(floor, engine, inproc, requests)


def report(
    floor: dict[str, tuple[Path, int]],
    engine: dict[str, tuple[Path, int]],
    inproc: dict[str, tuple[Path, int]],
    requests: int,
) -> Iterator[str]:
    def per(dump: Path) -> float:
        return total(dump) / requests / 1000

    yield f"instructions per request (thousands, callgrind; {requests} requests per row)"
    yield ""
    yield "| chain | messages | server (k instr) | in-process (k instr) | server - in-process |"
    yield "|---|---|---|---|---|"
    rows: dict[str, tuple[float, float]] = {}
    for name, (dump, count) in {**floor, **engine}.items():
        server = per(dump)
        inner = per(inproc[name][0]) if name in inproc else float("nan")
        rows[name] = (server, inner)
        yield f"| {name} | {count} | {server:.0f} | {inner:.0f} | {server - inner:.0f} |"
    yield ""
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
        yield (
            f"| {label} | " + " | ".join(f"{x:.1f}" for x in v) + f" | {d_auth:.1f} | {d_jwt:.1f} |"
        )
    yield ""
    yield "top functions by inclusive instructions per request, auth server minus static server"
    yield ""
    a, s = functions(dynamic, inclusive=True), functions(static, inclusive=True)
    diff = sorted(((a.get(k, 0) - s.get(k, 0), k) for k in a.keys() | s.keys()), reverse=True)
    yield "| k instr/req | function |"
    yield "|---|---|"
    for d, k in diff[:25]:
        yield f"| {d / requests / 1000:.1f} | {k[:110]} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="measured requests per row")
    parser.add_argument("--concurrency", type=int, default=4, help="streams in flight")
    parser.add_argument("--keep", metavar="DIR", help="keep the callgrind dumps in DIR")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _inprocess_child(args.child.split(","))
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("valgrind (callgrind) is not on PATH: apt-get install valgrind")
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
        workdir = Path(args.keep)
        for line in run(args.requests, args.concurrency, workdir):
            print(line, flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="gap-") as directory:
        for line in run(args.requests, args.concurrency, Path(directory)):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
