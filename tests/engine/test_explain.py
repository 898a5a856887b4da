"""engine/explain.py and ``<engine> explain`` (engine/explain_cli.py) on the sample
policies: which entries run, why a condition is false, static actions, the policies'
``explain`` hooks, secrets kept out, no hook called."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from engine.conditions import read_paths
from engine.config import load_config
from engine.errors import ExplainError
from engine.explain import ABSENT, NO_EXPLANATION, ExplainRequest, explain
from engine.explain_cli import main as explain_main
from engine.main import main as engine_main
from engine.registry import PolicyRegistry, RegisteredPolicy, load_policy
from engine.secrets import parameters_secrets
from engine.testing import example_id, valid_examples
from tests.support import registry_from

REPO = Path(__file__).resolve().parents[2]
_SAMPLES = ("apiKey/v1.0.0", "setHeader/v1.0.0", "respond/v1.0.0", "rateLimit/v2.0.0")
API_KEY = "partner-secret-key-0123"
REDIS_PASSWORD = "hunter2-redis-pass"

CONFIG = f"""
routes:
  partner:
    debug: {{timing: true}}
    policies:
      - name: apiKey
        version: v1.0.0
        parameters:
          keys: [{{key: {API_KEY}, consumer: partner-prod}}]
      - name: setHeader
        version: v1.0.0
        condition: 'metadata["apiKey.consumer"] == "partner-staging"'
        parameters: {{request: {{set: {{x-debug: "true"}}}}}}
      - name: setHeader
        version: v1.0.0
        condition: 'request.headers["x-env"] == "prod" && request.path.startsWith("/api")'
        parameters: {{request: {{set: {{x-prod: "1"}}}}, response: {{set: {{x-served-by: pe}}}}}}
      - name: rateLimit
        version: v2.0.0
        mode: shadow
        parameters:
          requestsPerSecond: 1
          backend: redis
          redisUrl: redis://user:{REDIS_PASSWORD}@127.0.0.1:6379/0
      - name: respond
        version: v1.0.0
        condition: 'request.path == "/teapot"'
        parameters: {{status: 418, body: short and stout}}
  static:
    policies:
      - name: setHeader
        version: v1.0.0
        parameters: {{request: {{set: {{x-a: "1"}}, remove: [x-drop]}}}}
      - name: setHeader
        version: v1.0.0
        condition: 'request.headers["x-a"] == "1"'
        onError: failOpen
        parameters: {{request: {{set: {{x-b: "2"}}}}}}
      - name: respond
        version: v1.0.0
        parameters: {{status: 403, body: denied}}
      - name: setHeader
        version: v1.0.0
        parameters: {{request: {{set: {{x-c: "3"}}}}}}
  guarded:
    policies:
      - name: setHeader
        version: v1.0.0
        condition: 'metadata["tier"] == "gold"'
        parameters: {{request: {{set: {{x-gold: "1"}}}}}}
  errors:
    policies:
      - name: setHeader
        version: v1.0.0
        condition: 'response.status >= 500'
        parameters: {{response: {{set: {{x-err: "1"}}}}}}
  empty:
    policies: []
unknownRoute: {{action: deny, status: 404}}
"""


@pytest.fixture(scope="module")
def registry() -> PolicyRegistry:
    return PolicyRegistry(load_policy(REPO / "policies" / folder) for folder in _SAMPLES)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("explain") / "config.yaml"
    path.write_text(CONFIG)
    return path


def _explain(registry: PolicyRegistry, **request: Any) -> dict[str, Any]:
    snapshot = load_config(CONFIG, source="config.yaml", registry=registry)
    return explain(snapshot, ExplainRequest(**request), registry)


def test_conditions_static_actions_and_hooks(registry: PolicyRegistry) -> None:
    result = _explain(
        registry,
        route="partner",
        path="/api/x",
        headers=(("x-env", "dev"),),
        metadata={"apiKey.consumer": "partner-prod"},
    )
    assert result["route"] == {"key": "partner", "resolvedFrom": "given", "known": True}
    assert result["debug"] == {"timing": True}
    api_key, staging, prod, limiter, teapot = result["entries"]
    assert api_key["request"]["runs"].startswith("runs (its hook decides at run time")
    assert api_key["explanation"]["consumers"] == ["partner-prod"]
    assert api_key["explanation"]["requires"] == "an API key in the header x-api-key"
    assert staging["request"]["runs"] == "skipped (condition false)"
    assert staging["request"]["condition"]["reads"] == {
        'metadata["apiKey.consumer"]': "partner-prod"
    }
    assert prod["request"]["condition"]["value"] is False
    assert prod["request"]["condition"]["reads"] == {
        'request.headers["x-env"]': "dev",
        "request.path": "/api/x",
    }
    assert prod["response"]["runs"] == "skipped (condition false)"
    assert prod["explanation"] == {
        "request": {"set": {"x-prod": "1"}},
        "response": {"set": {"x-served-by": "pe"}},
    }
    assert limiter["mode"] == "shadow"
    assert limiter["request"]["runs"].startswith("runs in shadow mode")
    assert limiter["explanation"]["redis"] == "redis://user:<redacted>@127.0.0.1:6379/0"
    assert teapot["request"]["runs"] == "skipped (condition false)"
    assert result["result"] == {
        "request": "goes upstream",
        "staticChanges": {},
        "decidedAtRunTime": ["apiKey v1.0.0"],
        "shadow": ["rateLimit v2.0.0"],
    }


def test_static_answer_ends_the_chain(registry: PolicyRegistry) -> None:
    result = _explain(registry, route="static", headers=(("x-drop", "1"),))
    first, second, answer, after = result["entries"]
    assert first["request"]["applies"] == {"setHeaders": {"x-a": "1"}, "removeHeaders": ["x-drop"]}
    # The later condition sees the earlier static change.
    assert second["request"]["condition"]["value"] is True
    assert second["onError"] == "failOpen"
    assert answer["request"]["applies"] == {"answers": 403, "headers": {}, "body": "denied"}
    assert after["request"]["runs"] == "not reached"
    assert result["result"] == {"request": "is answered by respond v1.0.0 (403)"}


def test_missing_metadata_fails_closed_and_names_what_it_read(registry: PolicyRegistry) -> None:
    result = _explain(registry, route="guarded")
    (entry,) = result["entries"]
    condition = entry["request"]["condition"]
    assert condition["value"] is None
    assert "Key not found" in condition["error"]
    assert condition["reads"] == {'metadata["tier"]': ABSENT}
    assert entry["request"]["runs"] == "fails: condition error, failClosed answers 500"
    gold = _explain(registry, route="guarded", metadata={"tier": "gold"})
    assert gold["result"]["staticChanges"] == {"headers": {"x-gold": "1"}}


def test_condition_on_metadata_after_a_hook_is_unknown(registry: PolicyRegistry) -> None:
    result = _explain(registry, route="partner", path="/x")
    staging = result["entries"][1]
    assert staging["request"]["runs"].startswith("unknown: the condition fails")
    assert "apiKey v1.0.0 runs first" in staging["request"]["runs"]
    assert result["result"]["request"] == "goes upstream"


def test_unknown_and_empty_routes(registry: PolicyRegistry) -> None:
    unknown = _explain(registry, route="nope")
    assert unknown["route"]["known"] is False
    assert unknown["result"]["request"].startswith("is answered 404")
    empty = _explain(registry, route="empty")
    assert empty["entries"] == []
    assert empty["result"]["request"] == "goes upstream"


def test_route_must_be_chosen_when_several(registry: PolicyRegistry) -> None:
    with pytest.raises(ExplainError) as caught:
        _explain(registry)
    assert caught.value.field == "route"
    assert "empty, errors, guarded, partner, static" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ({"path": "no-slash"}, "path"),
        ({"method": "G T"}, "method"),
        ({"headers": {"bad name": "1"}}, "headers"),
        ({"headers": "x"}, "headers"),
        ({"metadata": [1]}, "metadata"),
        ({"route": ""}, "route"),
        ({"pth": "/"}, "pth"),
    ],
    ids=[
        "not-object",
        "path",
        "method",
        "header-name",
        "headers-type",
        "metadata",
        "route",
        "unknown",
    ],
)
def test_bad_request_names_the_field(body: Any, field: str) -> None:
    with pytest.raises(ExplainError) as caught:
        ExplainRequest.from_json(body)
    assert caught.value.field == field


def test_no_request_hook_is_called() -> None:
    """The raiser test policy raises in every hook: explain never calls them."""
    registry = registry_from("raiser")
    snapshot = load_config(
        {
            "routes": {
                "r": {
                    "policies": [
                        {"name": "raiser", "version": "v1.0.0", "parameters": {"mode": "raise"}}
                    ]
                }
            }
        },
        source="t",
        registry=registry,
    )
    result = explain(snapshot, ExplainRequest(), registry)
    (entry,) = result["entries"]
    assert entry["request"]["runs"].startswith("runs (its hook decides")
    assert entry["explanation"] == NO_EXPLANATION


def test_read_paths() -> None:
    assert read_paths('"x" in request.headers || has(metadata.user)') == [
        ("request", "headers", "x"),
        ("metadata", "user"),
    ]
    assert read_paths("not valid (") == []


def test_cli_text_and_json(registry: PolicyRegistry, config_file: Path) -> None:
    argv = ["--config", str(config_file), "--route", "partner", "--path", "/api/x"]
    argv += ["--header", "X-Env: dev", "--metadata", "apiKey.consumer=partner-prod"]
    out, err = io.StringIO(), io.StringIO()
    assert explain_main(argv, registry=registry, stdout=out, stderr=err) == 0, err.getvalue()
    text = out.getvalue()
    assert "route 'partner' (given)" in text
    assert 'read request.headers["x-env"] = "dev"' in text
    assert "[3] rateLimit v2.0.0: shadow" in text
    assert "result: the request goes upstream" in text
    assert API_KEY not in text
    assert REDIS_PASSWORD not in text
    out = io.StringIO()
    assert explain_main([*argv, "--json"], registry=registry, stdout=out, stderr=err) == 0
    parsed = json.loads(out.getvalue())
    assert parsed["entries"][2]["request"]["condition"]["value"] is False
    assert API_KEY not in out.getvalue()
    assert REDIS_PASSWORD not in out.getvalue()


def test_cli_errors(registry: PolicyRegistry, config_file: Path, tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert (
        explain_main(["--config", str(config_file)], registry=registry, stdout=out, stderr=err) == 1
    )
    assert "explain: route: which route?" in err.getvalue()
    err = io.StringIO()
    bad = ["--config", str(config_file), "--route", "r", "--header", "no-colon"]
    assert explain_main(bad, registry=registry, stdout=out, stderr=err) == 1
    assert "--header: 'no-colon' is not HEADER:VALUE" in err.getvalue()
    broken = tmp_path / "broken.yaml"
    broken.write_text("routes: {r: {policies: [{name: nope, version: v1.0.0}]}}\n")
    err = io.StringIO()
    assert explain_main(["--config", str(broken)], registry=registry, stdout=out, stderr=err) == 1
    assert "routes[r].policies[0]" in err.getvalue()


def test_engine_main_dispatches_explain(registry: PolicyRegistry, config_file: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    argv = ["explain", "--config", str(config_file), "--route", "static", "--json"]
    assert engine_main(argv, registry=registry, stdout=out, stderr=err) == 0, err.getvalue()
    assert json.loads(out.getvalue())["result"]["request"] == "is answered by respond v1.0.0 (403)"


def test_condition_on_the_response_is_decided_per_response(
    registry: PolicyRegistry, config_file: Path
) -> None:
    result = _explain(registry, route="errors")
    (entry,) = result["entries"]
    assert "request" not in entry  # setHeader configured for responses only
    phase = entry["response"]
    assert phase["condition"]["value"] is None
    assert phase["condition"]["why"] == "reads the response: decided per response"
    assert phase["runs"] == "runs if its condition holds for the response (static action)"
    assert phase["applies"] == {"setHeaders": {"x-err": "1"}}
    out = io.StringIO()
    argv = ["--config", str(config_file), "--route", "errors"]
    assert explain_main(argv, registry=registry, stdout=out, stderr=io.StringIO()) == 0
    assert "condition response.status >= 500 -> decided per response" in out.getvalue()


SAMPLE_FOLDERS = sorted(p for p in (REPO / "policies").glob("*/v*") if p.is_dir())
SAMPLE_EXAMPLES = [
    (policy, example)
    for policy in (load_policy(folder) for folder in SAMPLE_FOLDERS)
    for example in valid_examples(policy)
]


def test_every_sample_policy_has_an_explain_hook() -> None:
    assert SAMPLE_FOLDERS
    missing = [
        f"{p.name} {p.version}"
        for p in (load_policy(folder) for folder in SAMPLE_FOLDERS)
        if not callable(getattr(p.factory, "explain", None))
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("policy", "example"),
    SAMPLE_EXAMPLES,
    ids=[f"{p.name}-{p.version}-{example_id(e)}" for p, e in SAMPLE_EXAMPLES],
)
def test_explain_hook_is_json_and_shows_no_secret(
    policy: RegisteredPolicy, example: dict[str, Any]
) -> None:
    params, problems = policy.definition.validate_parameters(example["parameters"])
    assert problems == []
    said = getattr(policy.factory, "explain")(params)  # noqa: B009 - optional hook
    assert isinstance(said, dict)
    text = json.dumps(said)
    secrets = parameters_secrets(params, policy.definition.secrets)
    assert [s for s in secrets if s in text] == []
