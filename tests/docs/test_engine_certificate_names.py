"""The engine's server certificate must carry the DNS name each shipped Envoy checks.

Envoy verifies the engine's certificate against one DNS name (``sni`` and
``match_typed_subject_alt_names`` of the ext_proc cluster). An operator issuing the
``policy-engine-tls`` Secret from docs/operators/kubernetes.md must learn that name there,
or every request through that Envoy fails closed (500) on the TLS handshake.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import pytest
import yaml

DOC: Final = Path("docs/operators/kubernetes.md")
SECRET: Final = "policy-engine-tls"
BOOTSTRAPS: Final = (
    Path("deploy/envoy/shared-service.yaml"),
    Path("deploy/kubernetes/overlays/sidecar/envoy.yaml"),
)


def _engine_names(bootstrap: Path) -> set[str]:
    config: dict[str, Any] = yaml.safe_load(bootstrap.read_text())
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "ext_proc"]
    tls = cluster["transport_socket"]["typed_config"]
    matchers = tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    names = {m["matcher"]["exact"] for m in matchers if m["san_type"] == "DNS"}
    assert tls["sni"] in names, bootstrap
    return names


def _secret_row() -> str:
    rows = [
        line for line in DOC.read_text().splitlines() if line.strip().startswith(f"| `{SECRET}`")
    ]
    assert len(rows) == 1, f"{DOC}: one table row for {SECRET}"
    return rows[0]


@pytest.mark.parametrize("bootstrap", BOOTSTRAPS, ids=str)
def test_the_secret_table_names_the_dns_name_envoy_checks(bootstrap: Path) -> None:
    row = _secret_row()
    for name in _engine_names(bootstrap):
        assert f"`{name}`" in row, f"{DOC}: the {SECRET} row does not name DNS {name} ({bootstrap})"
