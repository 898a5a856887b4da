"""``python3.11 -m engine.healthcheck``: ask a running engine over the gRPC health protocol.

For container health checks (Dockerfile ``HEALTHCHECK``, Kubernetes ``exec`` probes, which
cannot speak gRPC themselves): calls ``grpc.health.v1.Health/Check`` on ``--address`` for
``--service`` (default ``""``, the whole server; ``envoy.service.ext_proc.v3.ExternalProcessor``
is also reported) and exits

* 0 when the answer is ``SERVING``,
* 1 for any other answer (``NOT_SERVING`` while the first configuration is loading or while
  draining on shutdown, ``SERVICE_UNKNOWN``), and
* 2 when the engine cannot be reached within ``--timeout`` seconds.

One line on stdout says which (probes log it). No policy code is imported: the check is as
cheap as a gRPC channel.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["DEFAULT_ADDRESS", "check", "main"]

DEFAULT_ADDRESS: Final = "127.0.0.1:9002"
"""The engine's default ``--listen`` (engine.main.DEFAULT_LISTEN) and the image's port."""


def check(address: str, service: str = "", timeout: float = 3.0) -> tuple[int, str]:
    """(exit code, message) of one Health/Check call; never raises for RPC failures."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            code = error.code()
            details = error.details()
            if code == grpc.StatusCode.NOT_FOUND:
                return 1, f"{address}: service {service!r} unknown"
            return 2, f"{address}: unreachable ({code.name}: {details})"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return (0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1), (
        f"{address} {service or '(server)'}: {status}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run one check, print its result; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python3.11 -m engine.healthcheck",
        description="gRPC health check of a running policy engine (exit 0 = SERVING).",
    )
    parser.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"HOST:PORT (default {DEFAULT_ADDRESS})"
    )
    parser.add_argument("--service", default="", help="health service name (default: the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.timeout > 0:
        parser.error("--timeout must be greater than 0")
    code, message = check(args.address, args.service, args.timeout)
    print(message, file=sys.stdout if code == 0 else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
