"""The main job's xDS mode: ``tools/bazel run //tools/demo -- --xds``.

Instead of reading the config file itself, the built engine gets its route chains from
the control plane of this repository:

    demo config (a watched directory) -> control plane (validates against the engine's
    definitions file) -> ADS over mTLS -> engine (--xds) -> ext_proc over mTLS -> Envoy

The control plane is the engine binary's own ``controlplane`` command (the same command
the image has), which validates against ``engine_definitions.json``, the file the
builder wrote next to the registry. The admin API needs a token: the control plane gets
a throw-away token file (``admin-tokens`` in the demo's work directory, written by
:class:`~tests.e2e.xds_harness.ControlPlaneProcess`), and ``admin.token`` beside it holds
the read-write token alone, which the printed curl lines read with
``-H "Authorization: Bearer $(cat .../admin.token)"``. :func:`live_change_lines` prints
the admin API calls that change a route's chain while traffic flows;
:func:`check_live_change` runs those very lines with bash in ``--check`` mode.

Every link is secured as in production, with a throw-away PKI
(:class:`engine.tls_testing.TestPki`, in ``pki/`` of the work directory): the control plane
serves ADS over mTLS and admits the engine by the node id its client certificate names;
the engine verifies the control plane, and serves ext_proc over mTLS to Envoy, whose
ext_proc cluster presents a client certificate. :func:`process_lines` prints where the PKI
is and the command lines the demo ran; :func:`tls_lines` prints curl calls showing that a
client without a certificate is refused by either port (and one with a certificate is
not), and :func:`check_tls` runs them in ``--check`` mode.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.definition import load_yaml
from engine.tls_testing import Issued, TestPki
from tests.e2e.harness import HOST, EnvoyProcess, http_request, upstream_tls
from tests.e2e.xds_harness import ControlPlaneProcess, EngineXdsProcess, wait_until

__all__ = [
    "AdminTarget",
    "XdsEngine",
    "admin_commands",
    "check_live_change",
    "check_tls",
    "live_change_lines",
    "process_lines",
    "run_printed",
    "tls_commands",
    "tls_lines",
]

NODE_ID: Final = "demo-engine-1"
LIVE_ROUTE: Final = "public"
LIVE_CHAIN: Final = {
    "policies": [
        {
            "name": "setHeader",
            "version": "v1.0.0",
            "parameters": {"request": {"set": {"x-demo-route": "changed-live"}}},
        }
    ]
}
INVALID_CHAIN: Final = {
    "policies": [
        {"name": "rateLimit", "version": "v1.0.0", "parameters": {"requestsPerSecond": -1}}
    ]
}


class XdsEngine:
    """Control plane + the built engine connected to it (the demo's ``Engine``), over mTLS.

    ``binary``: the builder's engine, which runs the control plane too (``None``: the e2e
    tests' engine and ``python -m controlplane.main``). ``env``: variables the engine reads
    from its environment (shown before its printed command line).
    """

    def __init__(
        self,
        binary: Path | None,
        definitions: Path,
        config: Path,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        workdir = config.parent
        if binary is not None:  # the printed command lines work from any directory
            binary = binary.absolute()
        self.env = dict(env or {})
        self.pki = TestPki(workdir / "pki", name="policy-engine demo CA (throw-away)")
        self.plane_cert = self.pki.server("controlplane")
        self.engine_cert = self.pki.server("engine")
        self.node_cert = self.pki.client(f"node-{NODE_ID}", node_id=NODE_ID)
        self.envoy_cert = self.pki.client("envoy", dns=["envoy"])
        ca = str(self.pki.ca_file)
        routes = workdir / "routes"
        routes.mkdir(exist_ok=True)
        # The same document: routes as RouteChain resources, unknownRoute as EngineSettings.
        (routes / "demo.yaml").write_text(json.dumps(load_yaml(config.read_bytes()), indent=2))
        # `<engine> controlplane`: the command the image has too. ADS over mTLS: an engine
        # is admitted with a certificate of this CA naming its node id.
        self.plane = ControlPlaneProcess(
            definitions,
            workdir,
            config=routes,
            engine=binary,
            extra=[
                *("--xds-cert", str(self.plane_cert.cert), "--xds-key", str(self.plane_cert.key)),
                *("--xds-client-ca", ca),
            ],
        )
        try:
            self.engine = EngineXdsProcess(
                self.plane.xds_port,
                NODE_ID,
                workdir,
                binary=binary,
                max_backoff=2.0,
                extra=[
                    # the xDS client: verifies the control plane, presents the node's cert
                    *("--xds-ca", ca, "--xds-server-name", "localhost"),
                    *("--xds-cert", str(self.node_cert.cert), "--xds-key", str(self.node_cert.key)),
                    # ext_proc: only a client with a certificate of this CA (Envoy's)
                    *("--tls-cert", str(self.engine_cert.cert)),
                    *("--tls-key", str(self.engine_cert.key), "--tls-client-ca", ca),
                ],
                credentials=_credentials(self.pki, self.envoy_cert),
            )
            self.plane.wait_acked(self.plane.status()["version"], {NODE_ID}, timeout=20)
        except BaseException:
            self.plane.close()
            raise
        self.port = self.engine.port

    @property
    def envoy_cluster(self) -> dict[str, Any]:
        """Envoy's ext_proc cluster: TLS to the engine, presenting Envoy's certificate."""
        cert = self.envoy_cert
        return {"transport_socket": upstream_tls(self.pki.ca_file, cert.cert, cert.key)}

    @property
    def admin(self) -> str:
        return f"http://{HOST}:{self.plane.admin_port}"

    @property
    def token_file(self) -> Path:
        """The file holding the admin token alone (for curl)."""
        return self.plane.token_only_file

    def close(self) -> None:
        self.engine.close()
        self.plane.close()


def _credentials(pki: TestPki, client: Issued | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca_file.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


class AdminTarget(Protocol):
    """What the printed admin calls need: :class:`XdsEngine`, or a test's stand-in."""

    @property
    def admin(self) -> str: ...

    @property
    def token_file(self) -> Path: ...

    @property
    def plane(self) -> ControlPlaneProcess: ...


def _curl(engine: AdminTarget, *options: str, url: str, auth: bool = True) -> str:
    """A curl command line; with ``auth`` the shell reads the token from its file."""
    line = shlex.join(["curl", "-s", *options])
    if auth:  # double quotes, so the shell runs the $(cat ...)
        line += f' -H "Authorization: Bearer $(cat {shlex.quote(str(engine.token_file))})"'
    return f"{line} {shlex.quote(url)}"


def admin_commands(engine: AdminTarget) -> dict[str, str]:
    put = ["-X", "PUT", "--data-binary"]
    route = f"{engine.admin}/routes/{LIVE_ROUTE}"
    return {
        "change": _curl(engine, *put, json.dumps(LIVE_CHAIN), url=route),
        "invalid": _curl(engine, *put, json.dumps(INVALID_CHAIN), url=route),
        "status": _curl(engine, url=f"{engine.admin}/status"),
        "no-token": _curl(engine, url=f"{engine.admin}/routes", auth=False),
    }


def live_change_lines(engine: AdminTarget, envoy_port: int) -> list[str]:
    """curl lines: change a chain live, see it, submit an invalid one, read the status."""
    commands = admin_commands(engine)
    return [
        f"# xDS mode: the control plane's admin API at {engine.admin}; its token file is "
        f"{engine.plane.token_file} (name role token), the token alone is in {engine.token_file}",
        "# change the public route's chain live (validated, then pushed to the engine):",
        commands["change"],
        shlex.join(["curl", "-s", f"http://{HOST}:{envoy_port}/api/v1/public/hello"])
        + "    # -> the upstream sees x-demo-route: changed-live",
        "# an invalid chain is refused with the field named; nothing reaches the engine:",
        commands["invalid"] + "    # -> 400",
        commands["status"] + "    # -> the version each engine ACKed or NACKed",
        commands["no-token"] + "    # -> 401: every admin call needs the token",
        "",
    ]


def _tool_dir(name: str) -> str | None:
    """The directory of a tool (``bazel run`` may leave /usr/bin off PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
    return str(Path(found).parent) if found else None


def _curl_dir() -> str | None:
    return _tool_dir("curl")


def _bash(line: str, tool_dir: str) -> subprocess.CompletedProcess[str]:
    """Run a printed command line as a newcomer would (bash), ``tool_dir`` on PATH."""
    env = {**os.environ, "PATH": f"{tool_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}"}
    return subprocess.run(
        ["bash", "-c", line], capture_output=True, timeout=20, check=False, text=True, env=env
    )


def run_printed(line: str, curl_dir: str) -> Any:
    """Run a printed command line as a newcomer would (bash), return its JSON output."""
    done = _bash(line, curl_dir)
    try:
        return json.loads(done.stdout)
    except ValueError:
        return {"unreadable": done.stdout[-500:], "stderr": done.stderr[-500:]}


def _call(engine: AdminTarget, name: str, curl_dir: str | None) -> Any:
    """The printed line ``name`` run with bash, or (no curl here) the same request made by
    the harness's client with the same token."""
    if curl_dir is not None:
        return run_printed(admin_commands(engine)[name], curl_dir)
    method, path, body, token = {
        "change": ("PUT", f"/routes/{LIVE_ROUTE}", LIVE_CHAIN, ""),
        "invalid": ("PUT", f"/routes/{LIVE_ROUTE}", INVALID_CHAIN, ""),
        "status": ("GET", "/status", None, ""),
        "no-token": ("GET", "/routes", None, None),
    }[name]
    return engine.plane.call(method, path, body, token=token)[1]


def check_live_change(engine: AdminTarget, envoy_port: int) -> list[str]:
    """Run the printed lines of :func:`live_change_lines` with bash (when curl is installed);
    return what went wrong."""
    problems: list[str] = []
    curl_dir = _curl_dir()
    if curl_dir is None:
        print("demo: no curl here; the printed admin calls are made by the Python client")
    body = _call(engine, "invalid", curl_dir)
    if not any("requestsPerSecond" in e for e in body.get("errors", [])):
        problems.append(f"invalid chain: expected 400 naming requestsPerSecond, got {body}")
    body = _call(engine, "no-token", curl_dir)
    if not any("authentication required" in e for e in body.get("errors", [])):
        problems.append(f"no token: expected 401, got {body}")
    body = _call(engine, "change", curl_dir)
    version = body.get("version")
    if not version:
        problems.append(f"live change: expected a version, got {body}")
        return problems
    engine.plane.wait_acked(version, {NODE_ID})
    status = _call(engine, "status", curl_dir)
    if not any(e.get("ackedVersion") == version for e in status.get("engines", [])):
        problems.append(f"status: expected an engine at {version}, got {status}")

    def seen() -> Any:
        reply = http_request(envoy_port, "/api/v1/public/hello")
        return reply.echo and reply.echo["headers"].get("x-demo-route") == "changed-live"

    try:
        wait_until(seen, 5, "the live change to be served")
    except TimeoutError as exc:
        problems.append(str(exc))
    return problems


# ------------------------------------------------------------------ TLS: what to print and check


def process_lines(engine: XdsEngine, envoy: EnvoyProcess) -> list[str]:
    """Where the PKI is, and the command lines the demo ran (absolute paths)."""
    plane, node = engine.plane, engine.engine
    env = "".join(f"{name}={shlex.quote(value)} " for name, value in engine.env.items())
    return [
        f"# xDS mode runs secured, with a throw-away PKI in {engine.pki.directory} (never for "
        f"production): CA {engine.pki.ca_file}; <name>/tls.crt, tls.key, ca.crt for "
        f"controlplane (ADS server), node-{NODE_ID} (the engine's xDS client, URI SAN "
        f"spiffe://<trust domain>/node/{NODE_ID}), engine (ext_proc server), envoy (its client)",
        f"# the control plane the demo runs (log {plane.log_path}):",
        shlex.join(plane.command),
        f"# the engine the demo runs (log {node.log_path}):",
        env + shlex.join(node.command),
        "# (both hold their ports while the demo runs: a copy beside them needs other ports)",
        f"# Envoy's config (its ext_proc cluster presents envoy/tls.crt): {envoy.config_path}",
        "",
    ]


def _health_curl(port: int, pki: TestPki, client: Issued | None, *, request: bool) -> str:
    """A gRPC health call with curl over TLS, presenting ``client``'s certificate if given;
    it prints the response headers and trailers (``grpc-status``). ``request``: send the
    empty HealthCheckRequest (5 zero bytes: uncompressed, length 0); without it the POST has
    no body, which a server without the health service answers at once (UNIMPLEMENTED),
    before a body could race its reset of the stream."""
    parts = ["curl", "-sS", "--cacert", str(pki.ca_file)]
    if client is not None:
        parts += ["--cert", str(client.cert), "--key", str(client.key)]
    parts += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    parts += ["--data-binary", "@-"] if request else ["-X", "POST"]
    parts += ["-o", "/dev/null", "-D", "-", f"https://{HOST}:{port}/grpc.health.v1.Health/Check"]
    return ("printf '\\0\\0\\0\\0\\0' | " if request else "") + shlex.join(parts)


def tls_commands(engine: XdsEngine) -> dict[str, str]:
    """The printed TLS calls by name (``node-identity`` only where openssl is installed)."""
    pki, ext_proc, ads = engine.pki, engine.port, engine.plane.xds_port
    commands = {
        "ext-proc-no-cert": _health_curl(ext_proc, pki, None, request=True),
        "ext-proc-envoy-cert": _health_curl(ext_proc, pki, engine.envoy_cert, request=True),
        "ads-no-cert": _health_curl(ads, pki, None, request=False),
        "ads-node-cert": _health_curl(ads, pki, engine.node_cert, request=False),
    }
    if _tool_dir("openssl") is not None:
        commands["node-identity"] = shlex.join(
            [
                *("openssl", "x509", "-noout", "-subject", "-ext", "subjectAltName"),
                *("-in", str(engine.node_cert.cert)),
            ]
        )
    return commands


def tls_lines(engine: XdsEngine) -> list[str]:
    """curl calls: either port refuses a client without a certificate, admits one with."""
    commands = tls_commands(engine)
    lines = [
        f"# mTLS: the engine's ext_proc port {engine.port} refuses a client without a "
        "certificate (curl fails: the engine ends the TLS handshake, no HTTP answer):",
        commands["ext-proc-no-cert"],
        "# ... and answers one with Envoy's certificate:",
        commands["ext-proc-envoy-cert"] + "    # -> HTTP/2 200, grpc-status: 0",
        f"# the control plane's ADS port {engine.plane.xds_port} refuses a client without a "
        "certificate too:",
        commands["ads-no-cert"],
        "# ... and lets the engine's certificate through TLS (ADS has no health service):",
        commands["ads-node-cert"] + "    # -> HTTP/2 200, grpc-status: 12 (unimplemented)",
    ]
    if "node-identity" in commands:
        lines += [
            f"# the node id the control plane admits with that certificate ({NODE_ID}):",
            commands["node-identity"] + f"    # -> URI:spiffe://.../node/{NODE_ID}",
        ]
    return [*lines, ""]


def _grpc_health(port: int, credentials: grpc.ChannelCredentials) -> str:
    """What :func:`_health_curl` shows, through the Python client (no curl here):
    ``grpc-status: <code>``, or ``refused`` when no call got through TLS."""
    with grpc.secure_channel(f"{HOST}:{port}", credentials) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                return "refused"
            return f"grpc-status: {error.code().value[0]}"
    return "grpc-status: 0"


def check_tls(engine: XdsEngine, envoy: EnvoyProcess) -> list[str]:
    """Run the printed lines of :func:`tls_lines` with bash (with the Python client where
    curl is missing); check Envoy reached the engine over TLS. Return what went wrong."""
    problems: list[str] = []
    commands = tls_commands(engine)
    expected = {
        "ext-proc-no-cert": "refused",
        "ext-proc-envoy-cert": "grpc-status: 0",
        "ads-no-cert": "refused",
        "ads-node-cert": "grpc-status: 12",
    }
    curl_dir = _curl_dir()
    for name, wanted in expected.items():
        if curl_dir is not None:
            done = _bash(commands[name], curl_dir)
            got = "refused" if done.returncode != 0 else done.stdout
            if wanted not in got or ("grpc-status" in got and wanted == "refused"):
                problems.append(
                    f"{name}: expected {wanted!r}, got exit {done.returncode}: "
                    f"{(done.stdout + done.stderr).strip()[-300:]}"
                )
            continue
        client = {"ext-proc-envoy-cert": engine.envoy_cert, "ads-node-cert": engine.node_cert}
        port = engine.port if name.startswith("ext-proc") else engine.plane.xds_port
        got = _grpc_health(port, _credentials(engine.pki, client.get(name)))
        if got != wanted:
            problems.append(f"{name}: expected {wanted!r}, got {got!r} (Python client)")
    openssl_dir = _tool_dir("openssl")
    if "node-identity" in commands and openssl_dir is not None:
        done = _bash(commands["node-identity"], openssl_dir)
        if f"/node/{NODE_ID}" not in done.stdout:
            problems.append(
                f"node-identity: no /node/{NODE_ID} URI SAN: {done.stdout}{done.stderr}"
            )
    handshakes = envoy.stat("cluster.ext_proc.ssl.handshake")
    if handshakes < 1:
        problems.append("Envoy's ext_proc cluster made no TLS handshake with the engine")
    return problems
