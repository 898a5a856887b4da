"""Command line of the control plane.

    controlplane --definitions ENGINE_definitions.json [--config FILE|DIR]
                 [--xds-listen 127.0.0.1:18000] [--admin-listen 127.0.0.1:18001]
                 [--xds-cert FILE --xds-key FILE [--xds-client-ca FILE]] [--insecure]

ADS TLS: ``--xds-cert``/``--xds-key`` serve TLS (re-read when the files change, before the
next handshake, without dropping streams); ``--xds-client-ca`` requires engine client
certificates (mTLS) and then each stream's node id must be named by its certificate
(:mod:`controlplane.ads`). ``--xds-listen`` beyond loopback without mTLS is refused unless
``--insecure``.

Serves ADS (engines connect with ``--xds``) and the admin API (:mod:`controlplane.admin`)
on one event loop. ``--definitions`` is the file the builder wrote for the engine build
being deployed (``bazel-bin/generated/<...>/engine_definitions.json``). With ``--config``
the table starts from that file or directory and follows its changes; an invalid initial
config is an error (exit 1), an invalid later change is logged and ignored.

Exit codes: 0 after SIGTERM/SIGINT, 1 bad definitions/config or a port in use, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Final

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from controlplane.admin import AdminApi
from controlplane.ads import AdsServer
from controlplane.definitions import load_validation_registry
from controlplane.gitops import ConfigWatcher
from controlplane.http import HttpServer
from controlplane.table import RouteTable
from engine.errors import DefinitionError, TlsError
from engine.tls import ServerTls, ServerTlsFiles, is_loopback

__all__ = ["main", "parse_args", "serve"]

log: Final = logging.getLogger("controlplane")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="controlplane", description="Policy-chain control plane: validates, then serves ADS."
    )
    parser.add_argument(
        "--definitions", required=True, metavar="FILE", help="<engine>_definitions.json"
    )
    parser.add_argument("--config", metavar="FILE|DIR", help="watched route configuration")
    parser.add_argument("--xds-listen", default="127.0.0.1:18000", metavar="HOST:PORT")
    parser.add_argument("--admin-listen", default="127.0.0.1:18001", metavar="HOST:PORT")
    parser.add_argument("--poll-interval", type=float, default=0.5, metavar="SECONDS")
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    ads_tls = parser.add_argument_group("ADS TLS")
    ads_tls.add_argument("--xds-cert", metavar="FILE", help="ADS server certificate (PEM)")
    ads_tls.add_argument("--xds-key", metavar="FILE", help="its private key (PEM)")
    ads_tls.add_argument(
        "--xds-client-ca",
        metavar="FILE",
        help="require engine client certificates chaining to this CA bundle (mTLS); each "
        "engine's node id must be its certificate's URI SAN spiffe://<trust domain>/node/<id>",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow --xds-listen beyond loopback without mTLS (default: refused)",
    )
    args = parser.parse_args(argv)
    if not args.poll_interval > 0:
        parser.error("--poll-interval must be greater than 0")
    if (args.xds_cert is None) != (args.xds_key is None):
        parser.error("--xds-cert and --xds-key go together")
    if args.xds_client_ca is not None and args.xds_cert is None:
        parser.error("--xds-client-ca needs --xds-cert and --xds-key")
    if not is_loopback(args.xds_listen) and args.xds_client_ca is None and not args.insecure:
        parser.error(
            f"--xds-listen {args.xds_listen} is not a loopback address: give --xds-cert, "
            "--xds-key and --xds-client-ca (mTLS), or --insecure to serve the configuration "
            "to anyone who connects"
        )
    return args


async def serve(
    args: argparse.Namespace,
    table: RouteTable,
    *,
    stop: asyncio.Event | None = None,
    on_bound: Callable[[int, int], None] | None = None,
    handle_signals: bool = True,
) -> int:
    """Run until ``stop`` (or, with ``handle_signals``, SIGTERM/SIGINT); returns the exit code."""
    stop = stop if stop is not None else asyncio.Event()
    watcher = None
    if args.config:
        watcher = ConfigWatcher(args.config, table, args.poll_interval)
        errors = await watcher.load_initial()
        if errors:
            return 1
    tls = None
    if args.xds_cert is not None:
        files = ServerTlsFiles(
            args.xds_cert, args.xds_key, args.xds_client_ca, "--xds-cert", "--xds-key",
            "--xds-client-ca",
        )  # fmt: skip
        try:
            tls = ServerTls(files)
        except TlsError as exc:
            log.error("%s", exc)
            return 1
    if not is_loopback(args.xds_listen) and (tls is None or not tls.mutual):  # --insecure
        log.warning("--insecure: ADS on %s authenticates no engine", args.xds_listen)
    ads = AdsServer(table, verify_node_identity=tls is not None and tls.mutual)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    if tls is not None:
        xds_port = server.add_secure_port(args.xds_listen, tls.grpc_credentials())
    else:
        xds_port = server.add_insecure_port(args.xds_listen)
    if xds_port == 0:
        log.error("cannot listen on %s", args.xds_listen)
        return 1
    admin = HttpServer(AdminApi(table, ads))
    host, _, port = args.admin_listen.rpartition(":")
    try:
        admin_port = await admin.start(host, int(port))
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.admin_listen, exc)
        return 1
    await server.start()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(watcher.run())] if watcher is not None else []
    log.info(
        "control plane: ADS on %s (port %d), admin API on http://%s:%d, version %s",
        args.xds_listen,
        xds_port,
        host,
        admin_port,
        table.current.version,
    )
    if on_bound is not None:
        on_bound(xds_port, admin_port)
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await admin.stop()
        await server.stop(1.0)
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
    )
    try:
        definitions = load_validation_registry(args.definitions)
    except DefinitionError as exc:
        for line in exc.errors:
            log.error("%s", line)
        return 1
    policies = ", ".join(f"{p.name} {p.version}" for p in definitions.registry) or "none"
    log.info("definitions %s: %s", args.definitions, policies)
    return asyncio.run(serve(args, RouteTable(definitions.registry)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
