"""The engine's NACK text never shows a secret parameter (engine/xds/client.py), read back
from a raw ADS server that validates nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

import engine.xds.client
from engine.config import load_config
from engine.store import ConfigStore
from engine.xds.client import Backoff, XdsConfigSource, make_node
from engine.xds.resources import ROUTE_CHAIN_TYPE, SETTINGS_TYPE
from engine.xds.testing import RawXdsServer, route_any
from tests.support import registry_from

REGISTRY = registry_from("secretToken")
TOKEN = "tk-nack-7e3d91a0c2"


def _route(token: str) -> dict[str, Any]:
    entry = {"name": "secretToken", "version": "v1.0.0", "parameters": {"token": token}}
    return {"policies": [entry]}


@pytest.fixture
async def server() -> AsyncIterator[RawXdsServer]:
    raw = RawXdsServer()
    port = await raw.start()
    source = XdsConfigSource(
        f"127.0.0.1:{port}",
        REGISTRY,
        ConfigStore(),
        node=lambda: make_node("engine-1", "edge", REGISTRY, "0.1.0"),
        backoff=Backoff(base=0.05, maximum=0.2),
    )
    task = asyncio.create_task(source.run())
    try:
        await raw.next_request()
        await raw.next_request(type_url=SETTINGS_TYPE)
        yield raw
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await raw.stop()


async def _nack_text(server: RawXdsServer, token: str) -> str:
    """Push settings and routes of version 1; every NACK must hold no ``token``; return
    the routes' NACK text. (An engine may answer both types of a version together.)"""
    await server.push([], version="1", type_url=SETTINGS_TYPE)
    await server.push([route_any("r", _route(token))], version="1")
    settings = await server.next_request(type_url=SETTINGS_TYPE)
    routes = await server.next_request(type_url=ROUTE_CHAIN_TYPE)
    assert token not in settings.error_detail.message
    assert routes.HasField("error_detail")
    return str(routes.error_detail.message)


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        pytest.param(
            "tk-7x",
            "routes[r].policies[0] secretToken v1.0.0: token: (secret, not shown)",
            id="schema",
        ),
        pytest.param(
            f"revoked-{TOKEN}",
            "routes[r].policies[0] secretToken v1.0.0: token: '<redacted>' is revoked",
            id="constructor",
        ),
    ],
)
async def test_nack_names_the_field_not_the_secret(
    server: RawXdsServer, token: str, expected: str
) -> None:
    text = await _nack_text(server, token)
    assert text.startswith(expected)
    assert token not in text


async def test_internal_error_nack_is_scrubbed(
    server: RawXdsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug while building (not a config error) NACKs with the exception's text, which
    # may quote anything; the secrets of the rejected routes are scrubbed from it.
    def broken(document: Any, **kwargs: Any) -> Any:
        if not document.get("routes"):
            return load_config(document, **kwargs)  # the settings alone build
        raise RuntimeError(f"cannot build with token {TOKEN}")

    monkeypatch.setattr(engine.xds.client, "load_config", broken)
    text = await _nack_text(server, TOKEN)
    assert text == "internal error: RuntimeError: cannot build with token <redacted>"
