"""Envoy snippets the operators' docs print are the shipped, tested deploy/envoy settings.

docs/operators/http-transport.md prints the HTTP transport's ext_proc filter and cluster
and says the end-to-end tests run that filter; deploy/envoy/sidecar-http.yaml is the
complete file to copy. An operator copying the snippet must get the same settings (a
shorter message_timeout, for one, turns a JWKS fetch on a cold start into 504s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import yaml

from tests.docs.markdown import fenced_blocks

DOC: Final = Path("docs/operators/http-transport.md")
SHIPPED: Final = Path("deploy/envoy/sidecar-http.yaml")
FILTER: Final = "policy_engine.ext_proc_http"
CLUSTER: Final = "ext_proc_http"
# In the shipped file, not in the snippet: the doc says so right below it.
SHIPPED_ONLY: Final = {"allowed_override_modes"}


def _shipped() -> tuple[dict[str, Any], dict[str, Any]]:
    bootstrap = yaml.safe_load(SHIPPED.read_text())
    (listener,) = bootstrap["static_resources"]["listeners"]
    (hcm,) = listener["filter_chains"][0]["filters"]
    (http_filter,) = [f for f in hcm["typed_config"]["http_filters"] if f["name"] == FILTER]
    (cluster,) = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == CLUSTER]
    return http_filter, cluster


def _snippet() -> dict[str, Any]:
    for block in fenced_blocks(DOC.read_text()):
        if block.info == "yaml" and "clusters:" in block.text and FILTER in block.text:
            snippet: dict[str, Any] = yaml.safe_load(block.text)
            return snippet
    raise AssertionError(f"{DOC}: no yaml block with the {FILTER} filter and its cluster")


def test_http_transport_snippet_is_the_shipped_filter_and_cluster() -> None:
    shipped_filter, shipped_cluster = _shipped()
    snippet = _snippet()
    (doc_filter,) = [f for f in snippet["http_filters"] if f["name"] == FILTER]
    expected = {k: v for k, v in shipped_filter["typed_config"].items() if k not in SHIPPED_ONLY}
    assert doc_filter["typed_config"] == expected
    (doc_cluster,) = [c for c in snippet["clusters"] if c["name"] == CLUSTER]
    assert doc_cluster == shipped_cluster
