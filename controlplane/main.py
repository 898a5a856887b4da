"""Command line of the control plane.

    controlplane --definitions ENGINE_definitions.json [--config FILE|DIR] [--settle S]
                 [--xds-listen 127.0.0.1:18000] [--admin-listen 127.0.0.1:18001]
                 (--admin-token-file FILE | --admin-no-auth)
                 [--admin-tls-cert FILE --admin-tls-key FILE] [--admin-insecure]
                 [--admin-allowed-host HOST ...] [--admin-max-body BYTES]
                 [--admin-max-connections N] [--admin-timeout SECONDS]
                 [--xds-cert FILE --xds-key FILE [--xds-client-ca FILE]] [--xds-insecure]
                 [--metrics-listen HOST:PORT [--metrics-insecure]] [--log-format text|json]

``--metrics-listen`` serves :mod:`controlplane.metrics` (pushes, ACK/NACK per engine,
connected engines, admin changes) in the Prometheus format, with the ADS TLS files when
they are given; beyond loopback it needs their mTLS (``--xds-client-ca``) or, said
explicitly, ``--metrics-insecure``.

ADS TLS and the refusal of an unauthenticated non-loopback ADS listener:
:mod:`controlplane.ads_tls`.

Serves ADS (engines connect with ``--xds``) and the admin API (:mod:`controlplane.admin`)
on one event loop. ``--definitions`` is the file the builder wrote for the engine build
being deployed (``bazel-bin/generated/<...>/engine_definitions.json``). With ``--config``
the table starts from that file or directory and follows its changes; an invalid initial
config is an error (exit 1), an invalid later change is logged and ignored.

Run as ``<engine> controlplane`` (the builder's generated main passes ``policies``, the
engine's own policy loader), the policies declaring ``pure_constructor = True`` are also
constructed at submission (:func:`controlplane.definitions.checking_registry`): their
``ParameterError`` is a 400, not a NACK. With ``--definitions`` alone (``bazel run
//controlplane``) validation is definitions-only, as before.

The admin API fails closed (see :mod:`controlplane.admin`, :mod:`controlplane.auth`):

* it needs ``--admin-token-file`` (bearer tokens with a name and a role); running it
  without authentication takes ``--admin-no-auth``, said explicitly;
* on an address that is not loopback it needs TLS (``--admin-tls-cert`` and
  ``--admin-tls-key``) and authentication, unless ``--admin-insecure`` says otherwise;
* ``Host`` must be one of ``--admin-allowed-host`` (default: the listen host, plus the
  localhost forms for a loopback or wildcard bind).

Exit codes: 0 after SIGTERM/SIGINT, 1 bad definitions/config/token file/certificate or a
port in use, 2 usage (including the admin flag rules above).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from typing import Final

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from controlplane import ads_tls
from controlplane.admin import (
    AdminApi,
    AdminLimits,
    AdminServer,
    CertReloader,
    default_allowed_hosts,
)
from controlplane.ads import AdsLimits, AdsServer
from controlplane.auth import TokenFile, TokenFileError
from controlplane.definitions import checking_registry, load_validation_registry, pure_policies
from controlplane.gitops import ConfigWatcher
from controlplane.table import RouteTable
from engine import logformat
from engine import metrics as engine_metrics
from engine.cli import run_cli
from engine.errors import DefinitionError, EngineError, TlsError
from engine.registry import PolicyRegistry
from engine.settle import DEFAULT_SETTLE
from engine.tls import is_loopback

__all__ = ["build_parser", "main", "parse_args", "serve"]

log: Final = logging.getLogger("controlplane")


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (also the source of docs/reference/cli.md)."""
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
    parser.add_argument(  # ADS stream caps (controlplane.ads.AdsLimits); over one: refused
        "--xds-max-streams", type=int, default=AdsLimits.max_streams, metavar="N"
    )
    parser.add_argument(
        "--xds-max-streams-per-client",
        type=int,
        default=AdsLimits.max_streams_per_peer,
        metavar="N",
        help="per peer address and per node id",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=DEFAULT_SETTLE,
        metavar="SECONDS",
        help="a changed watched file (--config, token file, admin certificate) is loaded "
        f"once unchanged for this long (default {DEFAULT_SETTLE:g}; 0: at once)",
    )
    admin = parser.add_argument_group("admin API")
    admin.add_argument(
        "--admin-token-file",
        metavar="FILE",
        help="bearer tokens, one 'name role token' per line (role read-only or read-write); "
        "reloaded when it changes",
    )
    admin.add_argument(
        "--admin-no-auth",
        action="store_true",
        help="run the admin API WITHOUT authentication (anyone reaching the port may change "
        "every route); loopback only unless --admin-insecure",
    )
    admin.add_argument("--admin-tls-cert", metavar="FILE", help="PEM certificate (chain)")
    admin.add_argument("--admin-tls-key", metavar="FILE", help="PEM private key")
    admin.add_argument(
        "--admin-insecure",
        action="store_true",
        help="allow the admin API on a non-loopback address without TLS or without tokens",
    )
    admin.add_argument(
        "--admin-allowed-host",
        action="append",
        default=[],
        metavar="HOST",
        help="a Host header value (without port) the admin API answers; repeatable "
        "(default: the listen host, plus localhost forms for loopback/wildcard binds)",
    )
    admin.add_argument("--admin-max-body", type=int, default=8 * 1024 * 1024, metavar="BYTES")
    admin.add_argument("--admin-max-connections", type=int, default=32, metavar="N")
    admin.add_argument(
        "--admin-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="an admin connection is closed this long after it opened (slow clients)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    logformat.add_argument(parser)
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics (GET /metrics) on this address (default: off); HTTPS "
        "with the --xds-cert/--xds-key files when given, client certificates from "
        "--xds-client-ca required; beyond loopback only with that mTLS or --metrics-insecure",
    )
    parser.add_argument(
        "--metrics-insecure",
        action="store_true",
        help="allow --metrics-listen beyond loopback without mTLS (default: refused)",
    )
    ads_tls.add_arguments(parser)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line; exits 2 with a usage message on errors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.poll_interval > 0:
        parser.error("--poll-interval must be greater than 0")
    if args.xds_max_streams < 1 or args.xds_max_streams_per_client < 1:
        parser.error("--xds-max-streams and --xds-max-streams-per-client must be at least 1")
    if not 0 <= args.settle < 3600:
        parser.error("--settle must be between 0 and 3600 seconds")
    if not (args.admin_max_body > 0 and args.admin_max_connections > 0):
        parser.error("--admin-max-body and --admin-max-connections must be greater than 0")
    if not args.admin_timeout > 0:
        parser.error("--admin-timeout must be greater than 0")
    _check_admin_security(parser, args)
    ads_tls.check_arguments(parser, args)
    if args.metrics_listen:
        host, _, port = args.metrics_listen.rpartition(":")
        if not host or not port.isdigit():
            parser.error(f"--metrics-listen {args.metrics_listen}: expected HOST:PORT")
        if (
            not is_loopback(args.metrics_listen)
            and args.xds_client_ca is None
            and not args.metrics_insecure
        ):
            parser.error(
                f"--metrics-listen {args.metrics_listen} is not a loopback address: give "
                "--xds-cert, --xds-key and --xds-client-ca (the metrics are then served over "
                "mTLS), or --metrics-insecure to serve them to anyone who connects"
            )
    return args


def _check_admin_security(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The admin API's fail-closed rules (module docstring); parser.error() on a breach."""
    if bool(args.admin_token_file) == bool(args.admin_no_auth):
        parser.error(
            "the admin API needs --admin-token-file FILE (bearer tokens), or --admin-no-auth "
            "to run it without authentication (not both)"
        )
    if bool(args.admin_tls_cert) != bool(args.admin_tls_key):
        parser.error("--admin-tls-cert and --admin-tls-key go together")
    host = args.admin_listen.rpartition(":")[0]
    if not is_loopback(host) and not args.admin_insecure:
        if not args.admin_tls_cert:
            parser.error(
                f"--admin-listen {args.admin_listen} is not a loopback address: give "
                "--admin-tls-cert/--admin-tls-key, or --admin-insecure to serve plaintext"
            )
        if args.admin_no_auth:
            parser.error(
                f"--admin-no-auth on {args.admin_listen} (not loopback) needs --admin-insecure"
            )


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
    tokens = None
    if args.admin_token_file:
        tokens = TokenFile(
            args.admin_token_file, settle=args.settle, poll_interval=args.poll_interval
        )
        try:
            await asyncio.to_thread(tokens.load_initial)
        except TokenFileError as exc:
            for line in exc.errors:
                log.error("admin token file: %s", line)
            return 1
        log.info("admin API tokens from %s: %s", args.admin_token_file, ", ".join(tokens.names))
    else:
        log.warning("admin API WITHOUT authentication (--admin-no-auth)")
    certs = None
    if args.admin_tls_cert:
        try:
            certs = CertReloader(
                args.admin_tls_cert,
                args.admin_tls_key,
                interval=args.poll_interval,
                settle=args.settle,
            )
        except (OSError, ssl.SSLError) as exc:
            log.error(
                "admin TLS: cannot load %s / %s: %s", args.admin_tls_cert, args.admin_tls_key, exc
            )
            return 1
    watcher = None
    if args.config:
        watcher = ConfigWatcher(args.config, table, args.poll_interval, settle=args.settle)
        errors = await watcher.load_initial()
        if errors:
            return 1
    try:
        tls = ads_tls.load(args)
    except TlsError as exc:
        log.error("%s", exc)
        return 1
    per_client = args.xds_max_streams_per_client
    ads = AdsServer(
        table,
        AdsLimits(args.xds_max_streams, per_client, per_client),
        verify_node_identity=tls is not None and tls.mutual,
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    xds_port = ads_tls.add_port(server, args.xds_listen, tls)
    if xds_port == 0:
        log.error("cannot listen on %s", args.xds_listen)
        return 1
    host, _, port = args.admin_listen.rpartition(":")
    limits = AdminLimits(
        allowed_hosts=frozenset(h.strip("[]").lower() for h in args.admin_allowed_host)
        or default_allowed_hosts(host),
        tokens=tokens,
        max_body=args.admin_max_body,
        max_connections=args.admin_max_connections,
        timeout=args.admin_timeout,
    )
    admin = AdminServer(AdminApi(table, ads, limits), certs.context if certs is not None else None)
    if host.strip("[]") in ("", "0.0.0.0", "::") and not args.admin_allowed_host:
        log.warning(
            "admin API on %s answers only Host %s: name the host clients use with "
            "--admin-allowed-host",
            args.admin_listen,
            ", ".join(sorted(limits.allowed_hosts)),
        )
    try:
        admin_port = await admin.start(host.strip("[]"), int(port))
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.admin_listen, exc)
        return 1
    stop_metrics = None
    metrics_listen = args.metrics_listen
    if metrics_listen:
        try:
            stop_metrics = engine_metrics.serve(
                metrics_listen, tls=tls, exposition=ads.metrics.exposition
            )
        except OSError as exc:
            log.error("cannot listen on %s: %s", metrics_listen, exc)
            await admin.stop()
            return 1
        scheme = "https" if tls is not None else "http"
        log.info("metrics on %s://%s/metrics", scheme, metrics_listen)
        if not is_loopback(metrics_listen) and (tls is None or not tls.mutual):
            log.warning("--metrics-insecure: metrics on %s for anyone", metrics_listen)
    await server.start()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[None]] = []
    if watcher is not None:
        tasks.append(asyncio.create_task(watcher.run()))
    if tokens is not None:
        tasks.append(asyncio.create_task(tokens.run()))
    if certs is not None:
        tasks.append(asyncio.create_task(certs.run()))
    log.info(
        "control plane: ADS on %s (port %d), admin API on %s://%s:%d (Host: %s), version %s",
        args.xds_listen,
        xds_port,
        "https" if certs is not None else "http",
        host,
        admin_port,
        ", ".join(sorted(limits.allowed_hosts)),
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
        if stop_metrics is not None:
            stop_metrics()
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0


def main(argv: Sequence[str], *, policies: Callable[[], PolicyRegistry] | None = None) -> int:
    """``policies``: loads the code of the engine whose definitions ``--definitions`` names
    (``<engine> controlplane``); its pure constructors then run at submission."""
    args = parse_args(argv)
    logformat.configure(args.log_level, sys.stderr, args.log_format)
    try:
        definitions = load_validation_registry(args.definitions)
    except DefinitionError as exc:
        for line in exc.errors:
            log.error("%s", line)
        return 1
    names = ", ".join(f"{p.name} {p.version}" for p in definitions.registry) or "none"
    log.info("definitions %s: %s", args.definitions, names)
    registry = definitions.registry
    if policies is not None:
        try:
            registry = checking_registry(registry, policies())
        except EngineError as exc:  # DefinitionError, RegistryError: a broken build
            log.error("cannot load the engine's policies: %s", exc)
            return 1
        log.info(
            "constructor checks at submission for: %s", ", ".join(pure_policies(registry)) or "none"
        )
    return asyncio.run(serve(args, RouteTable(registry)))


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main(sys.argv[1:])))
