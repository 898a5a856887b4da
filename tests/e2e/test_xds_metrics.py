"""Issue 16.12 through real processes: /metrics stays bounded under xDS pushes and
worker deaths.

A control plane process and one engine process with two workers (``--xds``,
``--metrics-listen``), on 127.0.0.1. Many pushes must not add series (the xDS version
used to be a label value of ``config_info``); a SIGKILLed worker's per-process series
must leave the exposition once the supervisor has reaped (and replaced) it.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.harness import HOST, free_port
from tests.e2e.xds_harness import (
    ControlPlaneProcess,
    EngineXdsProcess,
    wait_until,
    write_e2e_definitions,
)

Series = set[tuple[str, tuple[tuple[str, str], ...]]]


def add_header(value: str) -> dict[str, Any]:
    parameters = {"header": "x-version", "value": value}
    return {"policies": [{"name": "addHeader", "version": "v1.0.0", "parameters": parameters}]}


def scrape(port: int) -> Series:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def pids(found: Series) -> set[int]:
    return {int(dict(labels)["pid"]) for _, labels in found if "pid" in dict(labels)}


def test_pushes_and_a_killed_worker_leave_the_series_bounded(tmp_path: Path) -> None:
    definitions = write_e2e_definitions(tmp_path / "engine_definitions.json")
    routes = tmp_path / "routes"
    routes.mkdir()
    (routes / "base.yaml").write_text(yaml.safe_dump({"routes": {"xm": add_header("0")}}))
    metrics_port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    extra = ["--workers", "2", "--metrics-listen", f"{HOST}:{metrics_port}"]
    extra += ["--metrics-dir", str(metrics_dir)]
    with (
        ControlPlaneProcess(definitions, tmp_path, config=routes) as plane,
        EngineXdsProcess(plane.xds_port, "metered", tmp_path, extra=extra) as engine,
    ):

        def acked_by_two(version: str) -> list[dict[str, Any]]:
            rows = [
                e
                for e in plane.status()["engines"]
                if e["node"] == "metered" and e["connected"] and e["ackedVersion"] == version
            ]
            return rows if len(rows) == 2 else []

        def workers(version: str) -> set[int]:
            rows = wait_until(lambda: acked_by_two(version), 30, f"both workers on {version}")
            return {int(r["metadata"]["pid"]) for r in rows}

        def settled(version: str) -> Series:
            """The exposition once both workers' series show ``version`` is served."""
            expected = workers(version)
            return wait_until(  # type: ignore[no-any-return]
                lambda: (found := scrape(metrics_port)) and expected <= pids(found) and found,
                30,
                "both workers' series",
            )

        first = settled(plane.put_route("xm", add_header("1")))
        for n in range(2, 31):
            version = plane.put_route("xm", add_header(str(n)))
        after_pushes = settled(version)
        assert len(after_pushes) == len(first), sorted(after_pushes - first)[:10]

        victim = min(workers(version))
        os.kill(victim, signal.SIGKILL)
        # The supervisor reaps it and starts a replacement, which connects and ACKs.
        replaced = wait_until(
            lambda: (
                (now := {int(r["metadata"]["pid"]) for r in acked_by_two(version)})
                and victim not in now
                and now
            ),
            30,
            "a replacement worker",
        )
        found = wait_until(
            lambda: (s := scrape(metrics_port)) and replaced <= pids(s) and s, 30, "its series"
        )
        assert victim not in pids(found), f"dead worker {victim}'s series are still exposed"
        assert len(found) == len(after_pushes)
        assert engine.process.poll() is None
