"""Secrets in the control plane's route table: the definitions file carries the
``secret`` marks, what the table shows is redacted, a redaction marker sent back keeps
the current value only where asked to, and NACK texts are scrubbed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from controlplane.definitions import load_validation_registry
from controlplane.table import RouteTable
from controlplane.testing import write_definitions
from engine.registry import PolicyRegistry
from engine.secrets import MARKER

REPO = Path(__file__).resolve().parents[2]
FOLDERS = [REPO / "policies" / "apiKey" / "v1.0.0", REPO / "policies" / "rateLimit" / "v2.0.0"]
KEY = "ak-4b0e2d9c71f3"
PASSWORD = "pw-e83a0c5d21"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> PolicyRegistry:
    path = tmp_path_factory.mktemp("defs") / "engine_definitions.json"
    write_definitions(path, FOLDERS, {"target": "t"})
    return load_validation_registry(path).registry


def _document(key: str = KEY, url_user: str = "app") -> dict[str, Any]:
    return {
        "routes": {
            "r": {
                "policies": [
                    {
                        "name": "apiKey",
                        "version": "v1.0.0",
                        "parameters": {"keys": [{"key": key, "consumer": "c"}]},
                    },
                    {
                        "name": "rateLimit",
                        "version": "v2.0.0",
                        "parameters": {
                            "requestsPerSecond": 5,
                            "backend": "redis",
                            "redisUrl": f"redis://{url_user}:{PASSWORD}@cache:6379/0",
                        },
                    },
                ]
            }
        }
    }


def test_definitions_file_carries_the_secret_marks(tmp_path: Path) -> None:
    path = write_definitions(tmp_path / "defs.json", FOLDERS, {"target": "t"})
    rows = {row["name"]: row["definition"] for row in json.loads(path.read_text())["policies"]}
    key_spec = rows["apiKey"]["parameters"]["keys"]["items"]["properties"]["key"]
    assert key_spec["secret"] is True
    assert rows["rateLimit"]["parameters"]["redisUrl"]["secret"] == "urlCredentials"
    loaded = load_validation_registry(path).registry
    assert set(loaded.get("apiKey", "v1.0.0").definition.secrets) == {"keys"}
    assert set(loaded.get("rateLimit", "v2.0.0").definition.secrets) == {"redisUrl"}


async def test_routes_are_shown_redacted(registry: PolicyRegistry) -> None:
    table = RouteTable(registry)
    assert (await table.replace(_document(), "test")).errors == []
    shown = json.dumps(table.routes())
    assert KEY not in shown
    assert PASSWORD not in shown
    assert MARKER in shown
    assert "cache:6379/0" in shown
    assert table.current.document == _document()  # the raw document is what engines get
    assert {KEY, PASSWORD} <= table.current.secrets


async def test_markers_keep_values_only_when_asked(registry: PolicyRegistry) -> None:
    table = RouteTable(registry)
    assert (await table.replace(_document(), "test")).errors == []
    first = table.current
    sent_back = {"routes": table.routes()}
    # A watched config file must stand on its own: the marker is no value.
    errors = (await table.replace(sent_back, "config routes.yaml")).errors
    assert errors == [
        f"routes[r].policies[0] apiKey v1.0.0: keys[0].key: is {MARKER!r} (how secrets are "
        "shown) but no current value is kept here; send the value itself",
        f"routes[r].policies[1] rateLimit v2.0.0: redisUrl: has {MARKER!r} as credentials "
        "(how they are shown; the user must be the current one) but no current value is "
        "kept here; send the URL with its credentials",
    ]
    assert table.current is first
    # What the admin API showed, sent back with keep_redacted: nothing changes.

    async def send_back() -> list[str]:
        change = await table.change(lambda _: sent_back, "admin PUT", keep_redacted=True)
        return change.errors

    assert await send_back() == []
    assert table.current is first
    # Changing the key is sending a new one.
    sent_back["routes"]["r"]["policies"][0]["parameters"]["keys"][0]["key"] = "ak-new-key-000"
    assert await send_back() == []
    assert table.current.document == _document(key="ak-new-key-000")


async def test_no_path_publishes_a_marker(registry: PolicyRegistry) -> None:
    # Every writer of the table validates through _prepare (check() runs it): a marker is
    # a valid string to the schema, and an apiKey key "<redacted>" would let in anyone
    # who sends that. It is refused there, not only where the admin API calls in.
    table = RouteTable(registry)
    errors = table.check(_document(key=MARKER), "any writer")
    assert errors == [
        f"routes[r].policies[0] apiKey v1.0.0: keys[0].key: is {MARKER!r} (how secrets are "
        "shown) but no current value is kept here; send the value itself"
    ]


async def test_put_route_keeps_secrets_and_delete_keeps_others(registry: PolicyRegistry) -> None:
    table = RouteTable(registry)
    document = _document()
    document["routes"]["s"] = document["routes"]["r"]
    assert (await table.replace(document, "test")).errors == []
    spec = table.routes()["r"]
    spec["policies"][1]["parameters"]["requestsPerSecond"] = 7
    assert (await table.put_route("r", spec, "admin")).errors == []
    raw = table.current.document["routes"]
    assert raw["r"]["policies"][0]["parameters"]["keys"][0]["key"] == KEY
    assert raw["r"]["policies"][1]["parameters"]["redisUrl"].startswith(f"redis://app:{PASSWORD}@")
    assert await table.delete_route("r", "admin")
    assert table.current.document["routes"]["s"] == _document()["routes"]["r"]


async def test_scrub_knows_recent_versions(registry: PolicyRegistry) -> None:
    table = RouteTable(registry)
    assert (await table.replace(_document(), "test")).errors == []
    assert (await table.replace(_document(key="ak-second-key-1"), "test")).errors == []
    nack = f"keys[0].key: {KEY!r} rejected; also 'ak-second-key-1' and {PASSWORD}"
    assert table.scrub(nack) == f"keys[0].key: {MARKER!r} rejected; also {MARKER!r} and {MARKER}"
