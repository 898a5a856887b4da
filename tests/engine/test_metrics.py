"""engine.metrics: families, label bounds, multi-process sums, the HTTP endpoint."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import metrics


@pytest.fixture
def enabled(tmp_path: Path) -> Iterator[metrics.Metrics]:
    directory = tmp_path / "metrics"
    directory.mkdir()
    try:
        yield metrics.enable(str(directory))
    finally:
        metrics.disable()


def samples(text: bytes | str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as (name, sorted labels without pid) -> value."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    raw = text.decode() if isinstance(text, bytes) else text
    for family in text_string_to_metric_families(raw):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "pid"))
            found[(sample.name, labels)] = found.get((sample.name, labels), 0.0) + sample.value
    return found


def test_off_by_default_records_nothing() -> None:
    assert not metrics.enabled()
    metrics.extproc_protocol_error()  # no-ops, no error
    metrics.ratelimit_decision("redis", "allowed")
    assert metrics.route_label("anything") == "anything"


def test_routes_outside_the_config_share_one_label(enabled: metrics.Metrics) -> None:
    metrics.config_published(3, "file:/etc/c.yaml", "ab" * 32, ["api", "web"])
    assert metrics.route_label("api") == "api"
    assert metrics.route_label("guessed-by-a-client") == metrics.UNKNOWN_ROUTE
    assert metrics.route_label("") == metrics.UNKNOWN_ROUTE


def test_config_and_ratelimit_families(enabled: metrics.Metrics) -> None:
    metrics.config_published(7, "file", "0123456789abcdef", ["api"])
    metrics.config_reload_failed("rejected")
    metrics.ratelimit_decision("redis", "limited")
    metrics.ratelimit_decision("redis", "limited")
    metrics.ratelimit_backend_error("redis")
    metrics.xds_connected(True)
    metrics.xds_response("NACK")
    found = samples(metrics.render())
    assert found[("policy_engine_config_version", ())] == 7
    assert found[("policy_engine_config_info", (("source", "file"),))] == 1
    assert found[("policy_engine_config_hash", ())] == 0x0123456789AB
    assert found[("policy_engine_config_reloads_total", (("result", "ok"),))] == 1
    assert found[("policy_engine_config_reloads_total", (("result", "rejected"),))] == 1
    limited = (("backend", "redis"), ("decision", "limited"))
    assert found[("policy_engine_ratelimit_decisions_total", limited)] == 2
    assert found[("policy_engine_ratelimit_backend_errors_total", (("backend", "redis"),))] == 1
    assert found[("policy_engine_xds_connected", ())] == 1
    assert found[("policy_engine_xds_responses_total", (("result", "NACK"),))] == 1
    metrics.config_published(8, "xds", "fedcba9876543210", ["api"])
    found = samples(metrics.render())
    assert found[("policy_engine_config_info", (("source", "file"),))] == 0
    assert found[("policy_engine_config_info", (("source", "xds"),))] == 1
    assert found[("policy_engine_config_hash", ())] == 0xFEDCBA987654


def test_counts_from_forked_workers_are_summed(enabled: metrics.Metrics) -> None:
    """What --workers does: fork after enable(); each child records; /metrics sums."""
    pids = []
    for worker in range(2):
        pid = os.fork()
        if pid == 0:  # child: record, then leave without running pytest's teardown
            code = 1
            try:
                for _ in range(3 + worker):
                    metrics.ratelimit_decision("local", "allowed")
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    metrics.ratelimit_decision("local", "allowed")  # the parent's own count
    found = samples(metrics.render())
    allowed = (("backend", "local"), ("decision", "allowed"))
    assert found[("policy_engine_ratelimit_decisions_total", allowed)] == 3 + 4 + 1


def test_http_endpoint(enabled: metrics.Metrics) -> None:
    metrics.extproc_protocol_error()
    stop = metrics.serve("127.0.0.1:0")
    try:
        port = stop.port  # type: ignore[attr-defined]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert reply.status == 200
            assert reply.headers["content-type"].startswith("text/plain")
            found = samples(reply.read())
        assert found[("policy_engine_extproc_protocol_errors_total", ())] == 1
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert info.value.code == 404
        info.value.close()
    finally:
        stop()


def test_store_publish_and_ratelimit_policy_record(enabled: metrics.Metrics) -> None:
    from engine.chain import Chain, Snapshot
    from engine.registry import load_policy
    from engine.store import ConfigStore
    from engine.testing import construct, make_request_context

    ConfigStore().publish(Snapshot(routes={"api": Chain("api")}, source="t", version=4), "test")
    limiter = construct(
        load_policy(Path(__file__).resolve().parents[2] / "policies/rateLimit/v2.0.0"),
        {"requestsPerSecond": 1, "burstSize": 1},
    )
    for _ in range(3):
        limiter.on_request(make_request_context(client_address="10.0.0.9"))
    found = samples(metrics.render())
    assert found[("policy_engine_config_version", ())] == 4
    assert metrics.route_label("api") == "api"
    allowed = (("backend", "local"), ("decision", "allowed"))
    limited = (("backend", "local"), ("decision", "limited"))
    assert found[("policy_engine_ratelimit_decisions_total", allowed)] == 1
    assert found[("policy_engine_ratelimit_decisions_total", limited)] == 2


def test_series_whose_labels_are_known_start_at_zero(enabled: metrics.Metrics) -> None:
    # Before: a route's counters appeared only at its first request, so rate() over them
    # (the dashboard, the alerts) returned no data instead of 0 on a quiet engine.
    from engine.chain import Chain, ChainPolicy, Snapshot
    from engine.store import ConfigStore

    chain = Chain("api", (ChainPolicy("p", "v1.0.0", object()),))
    ConfigStore().publish(Snapshot(routes={"api": chain}, source="t", version=1), "test")
    found = samples(metrics.render())
    policy = (("name", "p"), ("route", "api"), ("version", "v1.0.0"))
    assert found[("policy_engine_streams_total", (("route", "api"),))] == 0
    assert found[("policy_engine_requests_total", (("route", "(unknown)"),))] == 0
    for kind in metrics.FAILURE_KINDS:
        assert found[("policy_engine_policy_failures_total", (("kind", kind), *policy))] == 0
    assert found[("policy_engine_policy_duration_seconds_count", policy)] == 0
    assert found[("policy_engine_config_reloads_total", (("result", "rejected"),))] == 0
    assert found[("policy_engine_xds_responses_total", (("result", "NACK"),))] == 0
    assert found[("policy_engine_extproc_protocol_errors_total", ())] == 0


def series(text: bytes) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every series (name and all labels, pid included) in an exposition."""
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def test_many_pushes_keep_the_series_count_constant(enabled: metrics.Metrics) -> None:
    """Issue 16.12: every xDS push used to add a config_info series (its source held the
    version, its hash label the content hash); labels are bounded by configuration now."""
    from engine.chain import Snapshot
    from engine.store import ConfigStore

    store = ConfigStore()

    def push(n: int) -> None:
        snapshot = Snapshot(
            routes={},
            source=f"xds 127.0.0.1:18000 version {n}-{n:012x}",
            version=n,
            content_hash=f"{n:012x}" + "0" * 52,
        )
        store.publish(snapshot, "xds")
        metrics.xds_response("ACK")

    push(1)
    first = series(metrics.render())
    for n in range(2, 60):
        push(n)
    last = metrics.render()
    assert series(last) == first
    found = samples(last)
    assert found[("policy_engine_config_hash", ())] == 59
    assert found[("policy_engine_config_version", ())] == 59


def test_a_dead_workers_series_leave_the_exposition(enabled: metrics.Metrics) -> None:
    """Per-process gauges carry a pid label; process_dead (the supervisor calls it when
    it reaps a worker) removes them, while the dead worker's counts stay in the totals."""
    pid = os.fork()
    if pid == 0:  # a worker: record, then leave without running pytest's teardown
        code = 1
        try:
            metrics.xds_connected(True)
            metrics.config_published(3, "xds", "ab" * 32, ["api"])
            metrics.ratelimit_decision("local", "allowed")
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0

    def pids() -> set[str]:
        return {dict(labels).get("pid", "") for _, labels in series(metrics.render())} - {""}

    assert str(pid) in pids()
    metrics.process_dead(pid)
    assert str(pid) not in pids()
    allowed = (("backend", "local"), ("decision", "allowed"))
    assert samples(metrics.render())[("policy_engine_ratelimit_decisions_total", allowed)] == 1
