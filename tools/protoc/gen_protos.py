"""Generate the Python code of ``proto/`` with protoc from the ``grpcio-tools`` wheel.

Never committed: Bazel runs this as the ``//proto:policy_engine_v1_py_gen`` action, and
plain pytest runs :func:`ensure_generated` from the root ``conftest.py`` (output in
``generated/python/``, ignored by git), which is also what to run by hand before a
plain ``mypy`` or ``python -m``::

    python -m tools.protoc.gen_protos            # -> generated/python/
    python -m tools.protoc.gen_protos --out DIR proto/policy_engine/v1/route_chain.proto

Why grpcio-tools: Bazel's rules_proto and protoc come from the Bazel Central Registry,
which these machines cannot reach; the wheel is in the lock and bundles protoc and the
well-known types (google/protobuf/*.proto) as ``grpc_tools/_proto``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Final

__all__ = ["DEFAULT_OUT", "PROTO_ROOT", "ensure_generated", "generate", "main"]

REPO: Final = Path(__file__).resolve().parents[2]
PROTO_ROOT: Final = REPO / "proto"
DEFAULT_OUT: Final = REPO / "generated" / "python"


def _protos(root: Path) -> list[Path]:
    return sorted(root.rglob("*.proto"))


def generate(out: Path, protos: Sequence[Path], proto_root: Path = PROTO_ROOT) -> None:
    """Write ``<name>_pb2.py`` and ``<name>_pb2.pyi`` for each of ``protos`` under ``out``.

    Raises ``RuntimeError`` with protoc's exit status if it fails (protoc has already
    printed the file, line and column to stderr).
    """
    from grpc_tools import protoc  # noqa: PLC0415 - only needed when generating

    well_known = resources.files("grpc_tools").joinpath("_proto")
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        *(str(p) for p in protos),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} for {', '.join(map(str, protos))}")


def ensure_generated(out: Path = DEFAULT_OUT) -> Path:
    """Generate ``proto/`` into ``out`` unless every output is newer than every .proto.

    Returns ``out`` (put it on ``sys.path``).
    """
    protos = _protos(PROTO_ROOT)
    outputs = [
        out / p.relative_to(PROTO_ROOT).with_name(p.stem + suffix)
        for p in protos
        for suffix in ("_pb2.py", "_pb2.pyi")
    ]
    newest_input = max(p.stat().st_mtime_ns for p in protos)
    if not all(o.exists() and o.stat().st_mtime_ns >= newest_input for o in outputs):
        generate(out, protos)
    return out


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--proto-root", type=Path, default=PROTO_ROOT)
    parser.add_argument("protos", nargs="*", type=Path, help="default: every proto/ file")
    args = parser.parse_args(argv)
    protos = args.protos or _protos(args.proto_root)
    try:
        generate(args.out, protos, args.proto_root)
    except RuntimeError as exc:
        print(f"gen_protos: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
