"""Command line of the policy engine.

The runtime ships with ZERO policies: the caller injects the registry. A builder-generated
binary calls ``main(sys.argv[1:], registry=<generated registry>, build_info=<stamped info>)``;
``engine/bin.py`` is the zero-policy engine.

Exit codes: 0 ok (or ``--validate`` found no error), 1 invalid configuration, unusable
TLS files or server failure, 2 bad command line (argparse).

Listeners beyond loopback are authenticated by default: ``--listen``, ``--listen-http``
and ``--metrics-listen`` on any address but loopback need ``--tls-cert``, ``--tls-key`` and
``--tls-client-ca`` (mTLS: only clients with a certificate from that CA get in), and
``--xds`` beyond loopback needs ``--xds-ca``; ``--insecure`` is the explicit way out
(each such link is then logged as a warning at startup).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Final, TextIO

from engine import explain_cli, logformat, metrics
from engine.config import load_config_file
from engine.cpus import available_cpus
from engine.envoy_metadata import DEFAULT_KEYS, DEFAULT_NAMESPACE, EnvoyMetadata
from engine.errors import ConfigError, EngineError, TlsError
from engine.registry import PolicyRegistry
from engine.route_names import RouteNamePattern
from engine.store import DEFAULT_SETTLE, ConfigSource, ConfigStore, FileConfigSource
from engine.tls import ServerTls, ServerTlsFiles, is_loopback
from engine.transport.grpc_service import DEFAULT_MAX_BODY_BYTES, PolicyProcessor
from engine.transport.server import run_loop, serve, serve_workers
from engine.xds import cli as xds_cli

__all__ = ["DEFAULT_LISTEN", "ENGINE_VERSION", "build_parser", "main", "parse_args"]

ENGINE_VERSION: Final = "0.1.0"
DEFAULT_LISTEN: Final = "127.0.0.1:9002"
"""Loopback by default: Envoy normally runs next to the engine (same host or pod)."""

log = logging.getLogger("engine")
# gRPC message lengths are 32-bit: 2 * body + headroom must stay below 2 GiB.
_MAX_BODY_LIMIT: Final = 1024 * 1024 * 1024 - 1024 * 1024


def _route_name_pattern(text: str) -> RouteNamePattern:
    try:
        return RouteNamePattern(text)
    except ValueError as exc:  # argparse: "argument --route-name-pattern: <message>"
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (also the source of docs/reference/cli.md)."""
    parser = argparse.ArgumentParser(
        prog="policy-engine", description="Envoy ext_proc policy engine."
    )
    parser.add_argument("--config", metavar="FILE", help="route/policy-chain configuration file")
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=DEFAULT_LISTEN,
        help=f"gRPC listen address (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--listen-http",
        metavar="HOST:PORT",
        default=None,
        help="also serve Envoy's HTTP ext_proc transport (http_service: header phases as JSON "
        "POSTs; work in progress in Envoy) on this address, from the same process, snapshot "
        "and workers; TLS as --listen (default: off). See docs/operators/http-transport.md",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="server processes sharing the port with SO_REUSEPORT (default: the CPUs this "
        "process may use: affinity mask and cgroup CPU quota)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight streams may drain (default 5)",
    )
    parser.add_argument(
        "--drain",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM, report NOT_SERVING but keep serving this long before stopping, so "
        "Envoy's health checks move traffic away first (default 5; a second SIGTERM cuts it "
        "short)",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="BYTES",
        help="largest request/response body a policy sees; bigger request bodies get 413 "
        f"(default {DEFAULT_MAX_BODY_BYTES}, 10 MiB); keep Envoy's buffer limit at or below it",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often the config file is checked for changes (default 1)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=DEFAULT_SETTLE,
        metavar="SECONDS",
        help="a changed config file is loaded once unchanged this long (default "
        f"{DEFAULT_SETTLE:g}); replace the file atomically (temp file + mv) all the same",
    )
    parser.add_argument(
        "--validate", action="store_true", help="check the configuration and exit (0 valid, 1 not)"
    )
    parser.add_argument("--version", action="store_true", help="print build information and exit")
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO)",
    )
    logformat.add_argument(parser)
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics (GET /metrics) on this address; with --workers > 1 "
        "every worker binds it (SO_REUSEPORT) and each answer sums all workers (default: off)",
    )
    parser.add_argument(
        "--metrics-dir",
        metavar="DIR",
        help="where workers keep their metric files (prometheus-client multiprocess mode; "
        "default: a private temporary directory, removed at exit)",
    )
    parser.add_argument(
        "--envoy-metadata-namespace",
        default=DEFAULT_NAMESPACE,
        metavar="NAMESPACE",
        help="dynamic metadata namespace for the decisions Envoy may log (list it in the "
        f"ext_proc filter's metadata_options.receiving_namespaces; default {DEFAULT_NAMESPACE})",
    )
    parser.add_argument(
        "--envoy-metadata-keys",
        default=",".join(DEFAULT_KEYS),
        metavar="KEY,...",
        help="request metadata keys sent to Envoy as dynamic metadata (scalars only; empty: "
        f"none; default {','.join(DEFAULT_KEYS)})",
    )
    parser.add_argument(
        "--route-name-pattern",
        type=_route_name_pattern,
        metavar="REGEX",
        help="derive the chain key from Envoy's xds.route_name attribute: this regular "
        "expression (Python re) must match the whole route name and its group (?P<key>...) "
        "is the key; names it does not match are used as they are; x-policy-route metadata "
        "is never rewritten (for Envoy Gateway and Istio, whose route names are generated: "
        "see docs/operators/gateways.md; default: the route name is the key)",
    )
    tls = parser.add_argument_group("TLS (the ext_proc and metrics listeners)")
    tls.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="serve TLS with this certificate chain (PEM); re-read when it changes",
    )
    tls.add_argument("--tls-key", metavar="FILE", help="the --tls-cert private key (PEM)")
    tls.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="require client certificates that chain to this CA bundle (PEM): mTLS",
    )
    tls.add_argument(
        "--health-listen",
        metavar="HOST:PORT",
        help="also serve the gRPC health service alone, plaintext, on this loopback address "
        "(for probes inside the container when --listen requires client certificates)",
    )
    tls.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext or unauthenticated links beyond loopback: --listen / "
        "--listen-http / --metrics-listen without mTLS, --xds without --xds-ca (default: refused)",
    )
    xds_cli.add_arguments(parser)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line; exits 2 with a usage message on errors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.version and not args.config and not args.xds:
        parser.error("--config or --xds is required")
    if args.validate and not args.config:
        parser.error("--validate needs --config")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    for flag in ("--listen", "--listen-http", "--metrics-listen", "--health-listen"):
        address = getattr(args, flag[2:].replace("-", "_"))
        port = (address or ":0").rpartition(":")[2]
        # Checked here: out of range, the listeners wrapped it (99999 listened on 34463).
        if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):
            parser.error(f"{flag} {address}: expected HOST:PORT, a port from 0 to 65535")
    for flag in _unauthenticated_listeners(args):
        if not args.insecure:
            remedy = (
                "it is always plaintext: keep it on 127.0.0.1"
                if flag == "--health-listen"
                else "give --tls-cert, --tls-key and --tls-client-ca (mTLS)"
            )
            parser.error(
                f"{flag} {getattr(args, flag[2:].replace('-', '_'))} is not a loopback address:"
                f" {remedy}, or --insecure to accept unauthenticated connections there"
            )
    xds_cli.check_arguments(parser, args)
    if args.workers is None:  # read once, at startup
        args.workers = available_cpus()
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 1 <= args.max_body_bytes <= _MAX_BODY_LIMIT:
        parser.error(f"--max-body-bytes must be between 1 and {_MAX_BODY_LIMIT}")
    # 0 would poll in a busy loop, inf never; `not` also rejects nan
    if not 0 < args.poll_interval < math.inf:
        parser.error("--poll-interval must be a finite number greater than 0")
    if not 0 <= args.settle < math.inf:  # inf would never load a change; `not` rejects nan
        parser.error("--settle must be a finite number of seconds, 0 or more")
    if not args.grace >= 0:
        parser.error("--grace must be 0 or more")
    if not args.drain >= 0:
        parser.error("--drain must be 0 or more")
    # prometheus-client opens its files there only when the first metric exists: a
    # traceback naming no flag, before this check.
    if args.metrics_dir is not None and not (
        os.path.isdir(args.metrics_dir) and os.access(args.metrics_dir, os.W_OK | os.X_OK)
    ):
        parser.error(f"--metrics-dir {args.metrics_dir}: not a directory this process can write")
    if args.workers > 1 and args.listen.rpartition(":")[2] == "0":
        parser.error("--workers > 1 needs a fixed port (port 0 would give each worker its own)")
    if args.workers > 1 and args.listen_http and args.listen_http.rpartition(":")[2] == "0":
        parser.error("--workers > 1 needs a fixed --listen-http port")
    return args


def _unauthenticated_listeners(args: argparse.Namespace) -> list[str]:
    """The listener flags whose address is beyond loopback without mTLS."""
    mutual = args.tls_cert is not None and args.tls_client_ca is not None
    flags = []
    if not mutual:
        flags += ["--listen"] if args.listen and not is_loopback(args.listen) else []
        if args.listen_http and not is_loopback(args.listen_http):
            flags.append("--listen-http")
        if args.metrics_listen and not is_loopback(args.metrics_listen):
            flags.append("--metrics-listen")
    if args.health_listen and not is_loopback(args.health_listen):  # never authenticated
        flags.append("--health-listen")
    return flags


def server_tls(args: argparse.Namespace) -> ServerTls | None:
    """The listeners' TLS files, loaded and checked (``None`` without ``--tls-cert``).
    Raises :class:`~engine.errors.TlsError` naming the file and flag."""
    if args.tls_cert is None:
        return None
    return ServerTls(ServerTlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca))


def build_lines(registry: PolicyRegistry, build_info: Mapping[str, str] | None) -> list[str]:
    """Human-readable build information: engine version, build info, compiled-in policies."""
    lines = [f"policy-engine {ENGINE_VERSION}"]
    lines += [f"{key}: {value}" for key, value in (build_info or {}).items()]
    policies = [
        f"{name} {version}" for name in registry.names() for version in registry.versions(name)
    ]
    lines.append(f"policies: {', '.join(policies) if policies else 'none'}")
    return lines


class _NoTraceback(logging.Formatter):
    """Log lines without tracebacks: ``--validate`` output is for operators."""

    def formatException(self, ei: Any) -> str:
        return ""

    def formatStack(self, stack_info: str) -> str:
        return ""


def _brief(exc: BaseException) -> str:
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:  # a broken __str__ must not turn the report into a crash
        text = type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _validate(config: str, registry: PolicyRegistry, level: str, out: TextIO, err: TextIO) -> int:
    """``--validate``: every problem on ``err`` (one line each, naming the file), never a
    traceback, whatever the file holds; ``OK: N routes`` on ``out``. Returns 0 or 1."""
    # Policy constructors that crash are logged with their traceback while serving;
    # here the config error already says what failed, so log lines carry none.
    handler = logging.StreamHandler(err)
    handler.setFormatter(_NoTraceback("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        snapshot = load_config_file(config, registry)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=err)
        return 1
    except (OSError, EngineError) as exc:
        print(str(exc), file=err)
        return 1
    except Exception as exc:  # a loader bug: one line, never a traceback
        print(f"{config}: internal error while validating: {_brief(exc)}", file=err)
        return 1
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
    print(f"OK: {len(snapshot.routes)} routes", file=out)
    return 0


def main(
    argv: Sequence[str],
    *,
    registry: PolicyRegistry,
    build_info: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the engine CLI with ``registry`` compiled in; return the process exit code."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    if list(argv[:1]) == ["explain"]:  # `<engine> explain ...`: engine/explain_cli.py
        return explain_cli.main(argv[1:], registry=registry, stdout=out, stderr=err)
    args = parse_args(argv)
    if args.version:
        print("\n".join(build_lines(registry, build_info)), file=out)
        return 0

    if args.validate:
        return _validate(args.config, registry, args.log_level, out, err)

    logformat.configure(args.log_level, err, args.log_format)
    for line in build_lines(registry, build_info):
        log.info("%s", line)
    try:
        tls = server_tls(args)
    except TlsError as exc:
        log.error("%s", exc)
        return 1
    for flag in _unauthenticated_listeners(args):  # only with --insecure
        log.warning("--insecure: %s accepts unauthenticated connections", flag)
    if xds_cli.plaintext_remote(args):
        log.warning("--insecure: configuration from %s in plaintext, unauthenticated", args.xds)

    if args.metrics_listen:
        # Before the config loads (the store records it) and before workers fork.
        metrics.enable(args.metrics_dir)
    keys = [k.strip() for k in args.envoy_metadata_keys.split(",") if k.strip()]
    envoy_metadata = EnvoyMetadata(args.envoy_metadata_namespace, keys) if keys else None

    store = ConfigStore()
    source: ConfigSource | None = None
    if args.config:
        source = FileConfigSource(
            args.config, registry, store, poll_interval=args.poll_interval, settle=args.settle
        )
    try:
        if source is not None:  # with --xds: the warm start, never polled afterwards
            source.load_initial()
        if args.xds:
            source = xds_cli.make_source(args, registry, store, ENGINE_VERSION)
    except ConfigError as exc:
        for line in exc.lines():
            log.error("%s", line)
        return 1
    except TlsError as exc:
        log.error("%s", exc)
        return 1
    except (OSError, EngineError) as exc:
        log.error("cannot load configuration: %s", exc)
        return 1
    except Exception as exc:  # a loader bug: reported, with the traceback in the log
        log.error("%s: internal error while loading: %s", args.config, _brief(exc), exc_info=exc)
        return 1

    async def run(reuse_port: bool) -> None:
        # In the worker (after fork): its metrics thread never lives in the forking parent.
        stop_metrics = None
        if args.metrics_listen:
            stop_metrics = metrics.serve(args.metrics_listen, reuse_port=reuse_port, tls=tls)
            scheme = "http" if tls is None else "https"
            log.info("metrics on %s://%s/metrics", scheme, args.metrics_listen)
        processor = PolicyProcessor(
            store,
            max_body_bytes=args.max_body_bytes,
            envoy_metadata=envoy_metadata,
            route_names=args.route_name_pattern,
        )
        try:
            await serve(
                args.listen,
                store,
                source=source,
                grace=args.grace,
                drain=args.drain,
                reuse_port=reuse_port,
                processor=processor,
                tls=tls,
                health_listen=args.health_listen,
                http_listen=args.listen_http,
            )
        finally:
            if stop_metrics is not None:
                stop_metrics()

    try:
        if args.metrics_listen and args.workers > 1:
            # Workers bind it with SO_REUSEPORT; a port someone else holds is an error now,
            # not a worker crash loop later.
            metrics.serve(args.metrics_listen)()
        if args.workers == 1:
            run_loop(run(reuse_port=False))
            return 0
        return serve_workers(
            args.workers, lambda: run(reuse_port=True), grace=args.grace, drain=args.drain
        )
    except (OSError, RuntimeError) as exc:
        log.error("server failed: %s", exc)
        return 1
    finally:
        metrics.disable()  # removes the metrics directory (workers never get here)
