"""The engine's xDS flags: ``--xds HOST:PORT``, ``--node-id``, ``--cluster``, ``--xds-max-backoff``,
and TLS: ``--xds-ca``, ``--xds-cert``, ``--xds-key``, ``--xds-server-name``.

With ``--xds`` the control plane is the configuration source; ``--config`` becomes
optional and only warm-starts the engine (served until the first xDS update is
accepted, then never re-read). Without either the engine has nothing to serve.

TLS: ``--xds-ca`` turns TLS on (the control plane's certificate must chain to it and name
the ``--xds`` host, or ``--xds-server-name``); ``--xds-cert``/``--xds-key`` add the client
certificate (mTLS), whose URI SAN ``spiffe://<trust domain>/node/<id>`` must name the
``--node-id`` (required with them): the control plane refuses any other node id. A
control plane that is not on a loopback address needs ``--xds-ca`` unless ``--insecure``
(plaintext would hand the whole configuration, secrets included, to anyone on the path).
"""

from __future__ import annotations

import argparse

from engine.registry import PolicyRegistry
from engine.store import ConfigStore
from engine.tls import ClientTlsFiles, is_loopback, load_client_material
from engine.xds.client import Backoff, XdsConfigSource, make_node

__all__ = ["add_arguments", "check_arguments", "make_source", "plaintext_remote", "tls_files"]


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
    group.add_argument(
        "--xds-ca",
        metavar="FILE",
        help="TLS to the control plane: the CA bundle (PEM) its certificate must chain to; "
        "required when --xds is not a loopback address (unless --insecure)",
    )
    group.add_argument(
        "--xds-cert",
        metavar="FILE",
        help="client certificate (PEM) for mTLS; its URI SAN spiffe://<trust domain>/node/<id> "
        "must name --node-id. Re-read at every connect (rotation needs no restart)",
    )
    group.add_argument("--xds-key", metavar="FILE", help="the --xds-cert private key (PEM)")
    group.add_argument(
        "--xds-server-name",
        metavar="NAME",
        help="name the control plane's certificate must hold, instead of the --xds host",
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject flag combinations that make no sense (exits 2 via ``parser.error``)."""
    if not args.xds_max_backoff > 0:
        parser.error("--xds-max-backoff must be greater than 0")
    if args.xds is not None:
        # No colon at all made the whole address the "port"; 99999 or abc started the
        # engine on a control plane it could never reach, retrying for ever.
        head, colon, port = args.xds.rpartition(":")
        if not (
            head
            and colon
            and port.isascii()
            and port.isdigit()
            and len(port) <= 5
            and 1 <= int(port) <= 65535
        ):
            parser.error(f"--xds {args.xds}: expected HOST:PORT, a port from 1 to 65535")
    if (args.xds_cert is None) != (args.xds_key is None):
        parser.error("--xds-cert and --xds-key go together")
    for flag in ("xds_cert", "xds_server_name"):
        if getattr(args, flag) is not None and args.xds_ca is None:
            parser.error(f"--{flag.replace('_', '-')} needs --xds-ca (TLS to the control plane)")
    if args.xds_cert is not None and not args.node_id:
        parser.error(
            "--xds-cert needs --node-id: the id the certificate's URI SAN "
            "spiffe://<trust domain>/node/<id> names (the control plane checks it)"
        )
    if plaintext_remote(args) and not args.insecure:
        parser.error(
            f"--xds {args.xds} is not a loopback address: give --xds-ca (and --xds-cert, "
            "--xds-key for mTLS), or --insecure to fetch the configuration in plaintext"
        )


def plaintext_remote(args: argparse.Namespace) -> bool:
    """Whether the flags ask for plaintext xDS to a control plane beyond loopback."""
    return args.xds is not None and args.xds_ca is None and not is_loopback(args.xds)


def tls_files(args: argparse.Namespace) -> ClientTlsFiles | None:
    """The xDS client's TLS files from the flags (``None``: plaintext)."""
    if args.xds_ca is None:
        return None
    return ClientTlsFiles(
        ca=args.xds_ca, cert=args.xds_cert, key=args.xds_key, server_name=args.xds_server_name
    )


def make_source(
    args: argparse.Namespace, registry: PolicyRegistry, store: ConfigStore, engine_version: str
) -> XdsConfigSource:
    """The xDS source for ``args.xds``. The node is built when the source runs, so each
    worker process reports its own pid. The TLS files are checked now: a missing,
    unreadable or mismatched one raises :class:`~engine.errors.TlsError` (a startup
    error naming the file and the flag)."""
    tls = tls_files(args)
    if tls is not None:
        load_client_material(tls)
    return XdsConfigSource(
        args.xds,
        registry,
        store,
        node=lambda: make_node(args.node_id, args.cluster, registry, engine_version),
        backoff=Backoff(base=min(0.25, args.xds_max_backoff), maximum=args.xds_max_backoff),
        tls=tls,
    )
