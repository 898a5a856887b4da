"""The engine's xDS flags: ``--xds HOST:PORT``, ``--node-id``, ``--cluster``, ``--xds-max-backoff``.

With ``--xds`` the control plane is the configuration source; ``--config`` becomes
optional and only warm-starts the engine (served until the first xDS update is
accepted, then never re-read). Without either the engine has nothing to serve.
"""

from __future__ import annotations

import argparse

from engine.registry import PolicyRegistry
from engine.store import ConfigStore
from engine.xds.client import Backoff, XdsConfigSource, make_node

__all__ = ["add_arguments", "check_arguments", "make_source"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the xDS flags to the engine's parser."""
    group = parser.add_argument_group("xDS (configuration from a control plane)")
    group.add_argument(
        "--xds",
        metavar="HOST:PORT",
        help="control plane (ADS); --config is then only the warm-start configuration",
    )
    group.add_argument("--node-id", help="xDS node id (default: <hostname>-<pid>)")
    group.add_argument(
        "--cluster", default="policy-engine", help="xDS node cluster (default policy-engine)"
    )
    group.add_argument(
        "--xds-max-backoff",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="longest wait between reconnect attempts (default 5; jittered)",
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag combinations that make no sense (exits 2 via ``parser.error``)."""
    if not args.xds_max_backoff > 0:
        parser.error("--xds-max-backoff must be greater than 0")
    if args.xds is not None and args.xds.rpartition(":")[2] in ("", "0"):
        parser.error("--xds needs HOST:PORT with a port")


def make_source(
    args: argparse.Namespace, registry: PolicyRegistry, store: ConfigStore, engine_version: str
) -> XdsConfigSource:
    """The xDS source for ``args.xds``. The node is built when the source runs, so each
    worker process reports its own pid."""
    return XdsConfigSource(
        args.xds,
        registry,
        store,
        node=lambda: make_node(args.node_id, args.cluster, registry, engine_version),
        backoff=Backoff(base=min(0.25, args.xds_max_backoff), maximum=args.xds_max_backoff),
    )
