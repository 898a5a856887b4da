"""Command line of the control plane.

    controlplane --definitions ENGINE_definitions.json [--config FILE|DIR]
                 [--xds-listen 127.0.0.1:18000] [--admin-listen 127.0.0.1:18001]
                 [--xds-cert FILE --xds-key FILE [--xds-client-ca FILE]] [--insecure]

ADS TLS and the refusal of an unauthenticated non-loopback ADS listener:
:mod:`controlplane.ads_tls`.

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

from controlplane import ads_tls
from controlplane.admin import AdminApi
from controlplane.ads import AdsServer
from controlplane.definitions import load_validation_registry
from controlplane.gitops import ConfigWatcher
from controlplane.http import HttpServer
from controlplane.table import RouteTable
from engine.errors import DefinitionError, TlsError

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
    ads_tls.add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.poll_interval > 0:
        parser.error("--poll-interval must be greater than 0")
    ads_tls.check_arguments(parser, args)
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
    try:
        tls = ads_tls.load(args)
    except TlsError as exc:
        log.error("%s", exc)
        return 1
    ads = AdsServer(table, verify_node_identity=tls is not None and tls.mutual)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    xds_port = ads_tls.add_port(server, args.xds_listen, tls)
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
