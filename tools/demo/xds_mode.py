"""The main job's xDS mode: ``tools/bazel run //tools/demo -- --xds``.

Instead of reading the config file itself, the built engine gets its route chains from
the control plane of this repository:

    demo config (a watched directory) -> control plane (validates against the engine's
    definitions file) -> ADS -> engine (--xds) -> Envoy

The control plane is the engine binary's own ``controlplane`` command (the same command
the image has), which validates against ``engine_definitions.json``, the file the
builder wrote next to the registry. :func:`live_change_lines` prints the admin API calls
that change a route's chain while traffic flows; :func:`check_live_change` makes the
same calls in ``--check`` mode.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Final

from engine.definition import load_yaml
from tests.e2e.harness import HOST, http_request
from tests.e2e.xds_harness import ControlPlaneProcess, EngineXdsProcess, wait_until

__all__ = ["XdsEngine", "check_live_change", "live_change_lines"]

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

    def close(self) -> None:
        self.engine.close()
        self.plane.close()


def live_change_lines(engine: XdsEngine, envoy_port: int) -> list[str]:
    """curl lines: change a chain live, see it, submit an invalid one, read the status."""
    put = ["curl", "-s", "-X", "PUT", f"{engine.admin}/routes/{LIVE_ROUTE}", "--data-binary"]
    return [
        f"# xDS mode: the control plane's admin API at {engine.admin}",
        "# change the public route's chain live (validated, then pushed to the engine):",
        shlex.join([*put, json.dumps(LIVE_CHAIN)]),
        shlex.join(["curl", "-s", f"http://{HOST}:{envoy_port}/api/v1/public/hello"])
        + "    # -> the upstream sees x-demo-route: changed-live",
        "# an invalid chain is refused with the field named; nothing reaches the engine:",
        shlex.join([*put, json.dumps(INVALID_CHAIN)]) + "    # -> 400",
        shlex.join(["curl", "-s", f"{engine.admin}/status"])
        + "    # -> the version each engine ACKed or NACKed",
        "",
    ]


def check_live_change(engine: XdsEngine, envoy_port: int) -> list[str]:
    """Make the calls of :func:`live_change_lines`; return what went wrong."""
    problems: list[str] = []
    status, body = engine.plane.call("PUT", f"/routes/{LIVE_ROUTE}", INVALID_CHAIN)
    if status != 400 or not any("requestsPerSecond" in e for e in body.get("errors", [])):
        problems.append(f"invalid chain: expected 400 naming requestsPerSecond, got {status}")
    version = engine.plane.put_route(LIVE_ROUTE, LIVE_CHAIN)
    engine.plane.wait_acked(version, {NODE_ID})

    def seen() -> Any:
        reply = http_request(envoy_port, "/api/v1/public/hello")
        return reply.echo and reply.echo["headers"].get("x-demo-route") == "changed-live"

    try:
        wait_until(seen, 5, "the live change to be served")
    except TimeoutError as exc:
        problems.append(str(exc))
    return problems
