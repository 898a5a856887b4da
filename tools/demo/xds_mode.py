"""The main job's xDS mode: ``tools/bazel run //tools/demo -- --xds``.

Instead of reading the config file itself, the built engine gets its route chains from
the control plane of this repository:

    demo config (a watched directory) -> control plane (validates against the engine's
    definitions file) -> ADS -> engine (--xds) -> Envoy

The control plane is the engine binary's own ``controlplane`` command (the same command
the image has), which validates against ``engine_definitions.json``, the file the
builder wrote next to the registry. The admin API needs a token: the control plane gets
a throw-away token file (``admin-tokens`` in the demo's work directory, written by
:class:`~tests.e2e.xds_harness.ControlPlaneProcess`), and ``admin.token`` beside it holds
the read-write token alone, which the printed curl lines read with
``-H "Authorization: Bearer $(cat .../admin.token)"``. :func:`live_change_lines` prints
the admin API calls that change a route's chain while traffic flows;
:func:`check_live_change` runs those very lines with bash in ``--check`` mode.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Final, Protocol

from engine.definition import load_yaml
from tests.e2e.harness import HOST, http_request
from tests.e2e.xds_harness import ControlPlaneProcess, EngineXdsProcess, wait_until

__all__ = [
    "AdminTarget",
    "XdsEngine",
    "admin_commands",
    "check_live_change",
    "live_change_lines",
    "run_printed",
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
    """Control plane + the built engine connected to it (the demo's ``Engine``)."""

    def __init__(self, binary: Path, definitions: Path, config: Path) -> None:
        workdir = config.parent
        routes = workdir / "routes"
        routes.mkdir(exist_ok=True)
        # The same document: routes as RouteChain resources, unknownRoute as EngineSettings.
        (routes / "demo.yaml").write_text(json.dumps(load_yaml(config.read_bytes()), indent=2))
        # `<engine> controlplane`: the command the image has too.
        self.plane = ControlPlaneProcess(definitions, workdir, config=routes, engine=binary)
        try:
            self.engine = EngineXdsProcess(
                self.plane.xds_port, NODE_ID, workdir, binary=binary, max_backoff=2.0
            )
            self.plane.wait_acked(self.plane.status()["version"], {NODE_ID}, timeout=20)
        except BaseException:
            self.plane.close()
            raise
        self.port = self.engine.port

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


def _curl_dir() -> str | None:
    """The directory of a curl binary (``bazel run`` may leave /usr/bin off PATH)."""
    found = shutil.which("curl") or shutil.which("curl", path="/usr/local/bin:/usr/bin:/bin")
    return str(Path(found).parent) if found else None


def run_printed(line: str, curl_dir: str) -> Any:
    """Run a printed command line as a newcomer would (bash), return its JSON output."""
    env = {**os.environ, "PATH": f"{curl_dir}{os.pathsep}{os.environ.get('PATH', os.defpath)}"}
    done = subprocess.run(
        ["bash", "-c", line], capture_output=True, timeout=20, check=False, text=True, env=env
    )
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
