"""Micro section of the benchmark: the library choices behind the engine, re-measured.

* Envoy protos: xds-protos (upb C protobuf; the engine's) vs envoy-data-plane (betterproto2,
  pure Python): parse one 10-header ``ProcessingRequest`` and turn its headers into a dict;
  build and serialize a ``ProcessingResponse`` with one set and one removed header.
* CEL: cel-expr-python (cel-cpp; the engine's) vs cel-python (pure Python): compile and
  evaluate ``request.metadata.authenticated == true && request.headers["x-env"] != "prod"``
  from a plain dict.
* JSON on the 100 KB body: stdlib json vs orjson vs msgspec, loads + dumps.

The alternatives are not dependencies of the project: they are installed into a throw-away
venv under ``~/.cache/policy-engine/bench-micro-venv`` (pip, the machine's index) and measured
there by this same file (``python micro.py --alternatives``). If that install fails the row
says "skipped" with the reason. Figures are medians in microseconds per call.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

__all__ = ["format_lines", "run"]

_VENV: Final = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "policy-engine"
    / "bench-micro-venv"
)
_ALTERNATIVES: Final = ("envoy-data-plane", "cel-python", "orjson", "msgspec")
_EXPR: Final = 'request.metadata.authenticated == true && request.headers["x-env"] != "prod"'
_DATA: Final = {
    "request": {
        "path": "/api/v1/orders",
        "method": "GET",
        "headers": {"x-env": "staging", "accept": "*/*"},
        "metadata": {"authenticated": True},
    }
}
_HEADERS: Final = [(":method", "GET"), (":path", "/api/v1/orders"), (":authority", "api.test")] + [
    (f"x-header-{i}", f"value-{i}") for i in range(7)
]


def _median_us(fn: Callable[[], object], iterations: int) -> float:
    for _ in range(min(200, iterations)):
        fn()
    batches = 20
    per = max(1, iterations // batches)
    samples = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(per):
            fn()
        samples.append((time.perf_counter() - start) / per * 1e6)
    return round(statistics.median(samples), 2)


def _body() -> bytes:
    items = [{"id": i, "name": f"user-{i}", "email": f"user{i}@example.com"} for i in range(1400)]
    return json.dumps({"password": "x", "items": items}).encode()


# ------------------------------------------------------------------------- in the project env


def _xds_protos(iterations: int) -> dict[str, float]:
    from envoy.config.core.v3 import base_pb2  # noqa: PLC0415
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: PLC0415

    request = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in _HEADERS]
            )
        )
    )
    wire = request.SerializeToString()

    def parse() -> object:
        message = pb.ProcessingRequest.FromString(wire)
        return {h.key: h.raw_value.decode() for h in message.request_headers.headers.headers}

    def build() -> object:
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(
                        set_headers=[
                            base_pb2.HeaderValueOption(
                                header=base_pb2.HeaderValue(key="x-a", raw_value=b"1")
                            )
                        ],
                        remove_headers=["x-b"],
                    )
                )
            )
        ).SerializeToString()

    return {"parse_us": _median_us(parse, iterations), "build_us": _median_us(build, iterations)}


def _cel_expr_python(iterations: int) -> dict[str, float]:
    from cel_expr_python import cel  # noqa: PLC0415

    env = cel.NewEnv(
        variables={n: cel.Type.Map(cel.Type.STRING, cel.Type.DYN) for n in ("request",)}
    )
    program = env.compile(_EXPR)
    assert program.eval(data=_DATA).value() is True
    return {
        "compile_us": _median_us(lambda: env.compile(_EXPR), max(50, iterations // 10)),
        "eval_us": _median_us(lambda: program.eval(data=_DATA), iterations),
    }


def _json_stdlib(iterations: int) -> dict[str, float]:
    body = _body()
    return {
        "roundtrip_us": _median_us(lambda: json.dumps(json.loads(body)), max(20, iterations // 50))
    }


# ------------------------------------------------------------------------- alternatives venv


def _envoy_data_plane(iterations: int) -> dict[str, float]:
    from envoy_data_plane.envoy.config.core.v3 import (  # type: ignore[import-not-found]  # noqa: PLC0415
        HeaderMap,
        HeaderValue,
        HeaderValueOption,
    )
    from envoy_data_plane.envoy.service.ext_proc.v3 import (  # type: ignore[import-not-found]  # noqa: PLC0415
        CommonResponse,
        HeaderMutation,
        HeadersResponse,
        HttpHeaders,
        ProcessingRequest,
        ProcessingResponse,
    )

    wire = bytes(
        ProcessingRequest(
            request_headers=HttpHeaders(
                headers=HeaderMap(
                    headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in _HEADERS]
                )
            )
        )
    )

    def parse() -> object:
        message = ProcessingRequest().parse(wire)
        return {h.key: h.raw_value.decode() for h in message.request_headers.headers.headers}

    def build() -> object:
        return bytes(
            ProcessingResponse(
                request_headers=HeadersResponse(
                    response=CommonResponse(
                        header_mutation=HeaderMutation(
                            set_headers=[
                                HeaderValueOption(header=HeaderValue(key="x-a", raw_value=b"1"))
                            ],
                            remove_headers=["x-b"],
                        )
                    )
                )
            )
        )

    n = max(100, iterations // 10)
    return {"parse_us": _median_us(parse, n), "build_us": _median_us(build, n)}


def _cel_python(iterations: int) -> dict[str, float]:
    import celpy  # type: ignore[import-not-found]  # noqa: PLC0415

    env = celpy.Environment()
    ast = env.compile(_EXPR)
    program = env.program(ast)
    n = max(50, iterations // 20)

    def evaluate() -> object:
        return program.evaluate({"request": celpy.json_to_cel(_DATA["request"])})

    assert bool(evaluate())
    return {
        "compile_us": _median_us(lambda: env.program(env.compile(_EXPR)), max(20, n // 5)),
        "eval_us": _median_us(evaluate, n),
    }


def _orjson(iterations: int) -> dict[str, float]:
    orjson = importlib.import_module("orjson")  # not a project dependency (maybe)

    body = _body()
    return {
        "roundtrip_us": _median_us(
            lambda: orjson.dumps(orjson.loads(body)), max(20, iterations // 50)
        )
    }


def _msgspec(iterations: int) -> dict[str, float]:
    msgspec = importlib.import_module("msgspec")

    body = _body()
    decoder, encoder = msgspec.json.Decoder(), msgspec.json.Encoder()
    return {
        "roundtrip_us": _median_us(
            lambda: encoder.encode(decoder.decode(body)), max(20, iterations // 50)
        )
    }


def _try(fn: Callable[[int], dict[str, float]], iterations: int) -> dict[str, Any]:
    try:
        return fn(iterations)
    except Exception as exc:  # an alternative that cannot run is reported, not fatal
        return {"skipped": f"{type(exc).__name__}: {exc}"[:200]}


def _alternatives(iterations: int) -> dict[str, Any]:
    return {
        "envoy-data-plane": _try(_envoy_data_plane, iterations),
        "cel-python": _try(_cel_python, iterations),
        "orjson": _try(_orjson, iterations),
        "msgspec": _try(_msgspec, iterations),
    }


def _alternatives_venv(iterations: int) -> dict[str, Any]:
    """Run :func:`_alternatives` in the throw-away venv (created/updated on demand)."""
    python = _VENV / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(_VENV)], check=True, capture_output=True
            )
        missing = subprocess.run(
            [str(python), "-c", "import envoy_data_plane, celpy, orjson, msgspec"],
            capture_output=True,
            check=False,
        )
        if missing.returncode != 0:
            print(f"bench: installing {', '.join(_ALTERNATIVES)} into {_VENV} (micro section only)")
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", *_ALTERNATIVES],
                check=True,
                capture_output=True,
                timeout=600,
            )
        result = subprocess.run(
            [str(python), __file__, "--alternatives", str(iterations)],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        reason = getattr(exc, "stderr", b"") or str(exc)
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        note = {"skipped": f"throw-away venv failed: {str(reason).strip()[-200:]}"}
        return {name: note for name in ("envoy-data-plane", "cel-python", "orjson", "msgspec")}


def run(iterations: int, *, alternatives: bool = True) -> dict[str, Any]:
    """Every micro measurement: {library: {measure: median us}}. ``alternatives=False``
    (``--quick``) skips the throw-away venv."""
    if alternatives:
        others = _alternatives_venv(iterations)
    else:
        note = {"skipped": "not measured in --quick mode"}
        others = {name: note for name in _ALTERNATIVES}
    return {
        "protos": {
            "xds-protos": _try(_xds_protos, iterations),
            "envoy-data-plane": others["envoy-data-plane"],
        },
        "cel": {
            "cel-expr-python": _try(_cel_expr_python, iterations),
            "cel-python": others["cel-python"],
        },
        "json_100kb": {
            "json (stdlib)": _try(_json_stdlib, iterations),
            "orjson": others["orjson"],
            "msgspec": others["msgspec"],
        },
    }


def format_lines(results: dict[str, Any]) -> Iterator[str]:
    """The micro section as table lines."""
    if not results:
        return
    yield ""
    yield "| micro (median us per call) | library | figures |"
    yield "|---|---|---|"
    for section, libraries in results.items():
        for library, figures in libraries.items():
            text = (
                figures["skipped"]
                if "skipped" in figures
                else ", ".join(f"{k.removesuffix('_us')} {v:,.1f}" for k, v in figures.items())
            )
            yield f"| {section} | {library} | {text} |"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--alternatives":
    print(json.dumps(_alternatives(int(sys.argv[2]))))
