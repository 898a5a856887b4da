"""deploy/prometheus: the alert rules and the configuration pass ``promtool check``, and the
rules' unit tests (alerts_test.yaml: each alert fires on its series, stays quiet otherwise)
pass ``promtool test rules``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.deploy.promtool import binary

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(["check", "rules", "alerts.yaml"], id="check-rules"),
        pytest.param(["check", "config", "prometheus.yaml"], id="check-config"),
        pytest.param(["test", "rules", "alerts_test.yaml"], id="test-rules"),
    ],
)
def test_promtool(command: list[str]) -> None:
    result = subprocess.run(
        [str(binary("promtool")), *command],
        cwd=DEPLOY,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
