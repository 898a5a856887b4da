"""The ADS listener's TLS: ``--xds-cert``, ``--xds-key``, ``--xds-client-ca``, ``--xds-insecure``.

``--xds-cert``/``--xds-key`` serve ADS over TLS, re-read when the files change (before the
next handshake, without dropping streams: :class:`engine.tls.ServerTls`);
``--xds-client-ca`` requires engine client certificates (mTLS), and then each stream's node
id must be named by its certificate (:mod:`controlplane.ads`). ``--xds-listen`` beyond
loopback without mTLS is refused (exit 2) unless ``--xds-insecure``: the configuration,
secrets included, would go to anyone who connects, under any node id they claim.
"""

from __future__ import annotations

import argparse
import logging
from typing import Final

import grpc

from engine.tls import ServerTls, ServerTlsFiles, is_loopback

__all__ = ["add_arguments", "add_port", "check_arguments", "load"]

log: Final = logging.getLogger("controlplane")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ADS TLS flags and ``--xds-insecure`` to the control plane's parser."""
    group = parser.add_argument_group("ADS TLS")
    group.add_argument("--xds-cert", metavar="FILE", help="ADS server certificate (PEM)")
    group.add_argument("--xds-key", metavar="FILE", help="its private key (PEM)")
    group.add_argument(
        "--xds-client-ca",
        metavar="FILE",
        help="require engine client certificates chaining to this CA bundle (mTLS); each "
        "engine's node id must be its certificate's URI SAN spiffe://<trust domain>/node/<id>",
    )
    parser.add_argument(
        "--xds-insecure",
        action="store_true",
        help="allow --xds-listen beyond loopback without mTLS (default: refused)",
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse incomplete TLS flags and an unauthenticated non-loopback ADS listener."""
    if (args.xds_cert is None) != (args.xds_key is None):
        parser.error("--xds-cert and --xds-key go together")
    if args.xds_client_ca is not None and args.xds_cert is None:
        parser.error("--xds-client-ca needs --xds-cert and --xds-key")
    if not is_loopback(args.xds_listen) and args.xds_client_ca is None and not args.xds_insecure:
        parser.error(
            f"--xds-listen {args.xds_listen} is not a loopback address: give --xds-cert, "
            "--xds-key and --xds-client-ca (mTLS), or --xds-insecure to serve the configuration "
            "to anyone who connects"
        )


def load(args: argparse.Namespace) -> ServerTls | None:
    """The ADS listener's files, loaded and checked (``None``: plaintext). Raises
    :class:`~engine.errors.TlsError` naming the file and the flag."""
    tls = None
    if args.xds_cert is not None:
        files = ServerTlsFiles(
            args.xds_cert, args.xds_key, args.xds_client_ca, "--xds-cert", "--xds-key",
            "--xds-client-ca",
        )  # fmt: skip
        tls = ServerTls(files)
    if not is_loopback(args.xds_listen) and (tls is None or not tls.mutual):  # --xds-insecure
        log.warning("--xds-insecure: ADS on %s authenticates no engine", args.xds_listen)
    return tls


def add_port(server: grpc.aio.Server, listen: str, tls: ServerTls | None) -> int:
    """Bind ``listen`` on ``server``, with ``tls`` when given; the port (0: failed)."""
    if tls is None:
        return server.add_insecure_port(listen)
    return server.add_secure_port(listen, tls.grpc_credentials())
