"""``<engine> explain``: what a route's chain would do for one request (engine/explain.py).

::

    engine explain --config demo.yaml --route private --path /api/x \\
        --header authorization:'Bearer x' --metadata tier=gold [--json]

The configuration is loaded as the engine loads it (policies constructed, exactly as
``--validate`` does); no request hook runs. Exit codes: 0 explained, 1 invalid
configuration or a request the route cannot be found for, 2 bad command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from engine.config import load_config_file
from engine.errors import ConfigError, ExplainError
from engine.explain import ABSENT, ExplainRequest, explain
from engine.registry import PolicyRegistry

__all__ = ["build_parser", "main", "render"]


def build_parser() -> argparse.ArgumentParser:
    """The ``explain`` subcommand's parser (also the source of docs/reference/cli.md)."""
    parser = argparse.ArgumentParser(
        prog="policy-engine explain",
        description="Show what a route's policy chain would do for one request: which "
        "entries run, which conditions are false and why, which static actions apply. "
        "No policy hook is called.",
    )
    parser.add_argument(
        "--config", metavar="FILE", required=True, help="route/policy-chain configuration file"
    )
    parser.add_argument(
        "--route",
        metavar="KEY",
        help="route key (as Envoy sends it in x-policy-route); default: the only route",
    )
    parser.add_argument("--method", default="GET", help="request method (default GET)")
    parser.add_argument("--path", default="/", help="request path with query (default /)")
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="a request header (repeatable; a repeated name adds a value)",
    )
    parser.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="request metadata an earlier policy would have written (repeatable); VALUE is "
        "read as JSON when it parses (5, true, {...}), else as a string",
    )
    parser.add_argument("--json", action="store_true", help="print the explanation as JSON")
    return parser


def _pairs(values: Sequence[str], sep: str, flag: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, found, rest = value.partition(sep)
        if not found or not name.strip():
            raise ExplainError(flag, f"{value!r} is not {flag[2:].upper()}{sep}VALUE")
        pairs.append((name.strip(), rest.lstrip() if sep == ":" else rest))
    return pairs


def _metadata_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def main(
    argv: Sequence[str],
    *,
    registry: PolicyRegistry,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run ``explain`` with the engine's ``registry``; return the exit code."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    args = build_parser().parse_args(argv)
    try:
        request = ExplainRequest(
            method=args.method,
            path=args.path,
            headers=tuple((n.lower(), v) for n, v in _pairs(args.header, ":", "--header")),
            metadata={k: _metadata_value(v) for k, v in _pairs(args.metadata, "=", "--metadata")},
            route=args.route,
        )
        snapshot = load_config_file(args.config, registry)
        result = explain(snapshot, request, registry)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=err)
        return 1
    except ExplainError as exc:
        print(f"explain: {exc}", file=err)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True), file=out)
    else:
        print(render(result), file=out, end="")
    return 0


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _phase_lines(name: str, phase: dict[str, Any]) -> list[str]:
    lines = [f"    {name}: {phase['runs']}"]
    if "why" in phase:
        lines[0] += f": {phase['why']}"
    condition = phase.get("condition")
    if condition is not None:
        value = condition["value"]
        if "error" in condition:
            shown = "error"
        elif value is None:
            shown = "decided per response"
        else:
            shown = _show(value)
        lines.append(f"      condition {condition['expression']} -> {shown}")
        if "error" in condition:
            lines.append(f"        {condition['error']}")
        for read, got in condition.get("reads", {}).items():
            lines.append(f"        read {read} = {got if got == ABSENT else _show(got)}")
    for key, label in (("applies", "applies"), ("wouldApply", "would apply (shadow)")):
        if key in phase:
            lines.append(f"      {label}: {_show(phase[key])}")
    if "strips" in phase:
        lines.append(f"      strips: {_show(phase['strips'])}")
    return lines


def render(result: dict[str, Any]) -> str:
    """The explanation as text for a terminal."""
    route, request, config = result["route"], result["request"], result["config"]
    lines = [
        f"route {route['key']!r} ({route['resolvedFrom']}); config {config['source']} "
        f"version {config['version']}",
        f"request: {request['method']} {request['path']}, {len(request['headers'])} header(s), "
        f"metadata {_show(request['metadata'])}",
    ]
    if not route.get("known"):
        lines.append(f"no chain for this route key: {result['result']['request']}")
        return "\n".join(lines) + "\n"
    timing = "on (x-policy-engine-timing header)" if result["debug"]["timing"] else "off"
    lines.append(f"timing: {timing}")
    if not result["entries"]:
        lines.append("no policies: a pass-through route")
    for entry in result["entries"]:
        settings = [entry["mode"], entry["onError"]]
        if entry["onError"] == "failClosed":
            settings[-1] += f" ({entry['errorStatus']})"
        if entry["timeout"] is not None:
            settings.append(f"timeout {entry['timeout']:g}s")
        if entry["bodies"]:
            settings.append("reads the " + " and ".join(entry["bodies"]) + " body")
        lines.append("")
        lines.append(
            f"[{entry['index']}] {entry['name']} {entry['version']}: {', '.join(settings)}"
        )
        for phase in ("request", "response"):
            if phase in entry:
                lines.extend(_phase_lines(phase, entry[phase]))
        explanation = entry["explanation"]
        if isinstance(explanation, dict) and explanation:
            lines.append("    explain:")
            lines.extend(
                f"      {key}: {value if isinstance(value, str) else _show(value)}"
                for key, value in explanation.items()
            )
        else:
            shown = explanation if isinstance(explanation, str) else _show(explanation)
            lines.append(f"    explain: {shown}")
    outcome = result["result"]
    lines.append("")
    lines.append(f"result: the request {outcome['request']}")
    if outcome.get("staticChanges"):
        lines.append(f"  static changes: {_show(outcome['staticChanges'])}")
    if outcome.get("decidedAtRunTime"):
        lines.append(
            "  decided at run time (hooks not called here): "
            + ", ".join(outcome["decidedAtRunTime"])
        )
    if outcome.get("shadow"):
        lines.append("  shadow (recorded, not enforced): " + ", ".join(outcome["shadow"]))
    return "\n".join(lines) + "\n"
