"""The benchmark's external tools: Debian's ``nginx`` (the upstream) and ``wrk`` (closed-loop load).

:func:`find_tools` looks for them, in order: ``$BENCH_NGINX`` / ``$BENCH_WRK``; ``PATH`` (and
``/usr/sbin``); a private unpack of the Debian packages under
``~/.cache/policy-engine/bench-tools``. If neither is found it **unpacks them there itself**
(``apt-get download nginx wrk libluajit-5.1-2`` + ``dpkg-deb -x``, after an ``apt-get update``
when the lists are stale) and says so. Unpacking instead of ``apt-get install`` is deliberate: it
runs no maintainer scripts (Debian's nginx would start a daemon on port 80), needs no healthy
dpkg state (the offline Bazel root is configured with ``--force-depends``, so ``apt-get install``
refuses there), and works the same on a Debian host and inside the root ``tools/bazel run``
uses. Their libraries (libssl, pcre2, zlib) are in any Debian base; ``libluajit-5.1-2`` is
unpacked beside them and found through ``LD_LIBRARY_PATH``.

:func:`run_wrk` runs wrk with a Lua script whose ``done`` callback prints a JSON summary
(requests, errors, non-2xx, latency percentiles), so nothing is scraped from wrk's text.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = ["Tools", "WrkResult", "find_tools", "run_wrk"]

_PACKAGES: Final = ("nginx", "wrk", "libluajit-5.1-2")
_CACHE: Final = Path(
    os.environ.get("POLICY_ENGINE_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "policy-engine"
)


@dataclass(frozen=True)
class Tools:
    """Where nginx and wrk are, the environment they need, and how they were found."""

    nginx: Path
    wrk: Path
    env: dict[str, str]
    how: str
    versions: dict[str, str] = field(default_factory=dict)


def _which(name: str) -> Path | None:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    return Path(found) if found else None


def _unpacked(root: Path) -> tuple[Path, Path, dict[str, str]] | None:
    nginx, wrk = root / "usr/sbin/nginx", root / "usr/bin/wrk"
    if not (nginx.exists() and wrk.exists()):
        return None
    libs = sorted(str(p) for p in (root / "usr/lib").glob("*-linux-gnu*") if p.is_dir())
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).strip(
        os.pathsep
    )
    return nginx, wrk, env


def _unpack(root: Path) -> None:
    """Download the Debian packages with apt-get and unpack them under ``root``."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise RuntimeError(
            "nginx and wrk are not installed and this is not a Debian system with apt-get: "
            "install nginx and wrk (or set BENCH_NGINX / BENCH_WRK) and run again"
        )
    debs = root.parent / "debs"
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    os.chmod(debs, 0o777)  # apt-get download drops privileges to _apt when it can

    def download() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["apt-get", "download", *_PACKAGES],
            cwd=debs,
            capture_output=True,
            text=True,
            check=False,
        )

    result = download()
    if result.returncode != 0:  # stale package lists (sid moves daily): refresh once
        print("bench: apt-get update (package lists are stale)", flush=True)
        subprocess.run(
            ["apt-get", "-o", "Acquire::Check-Valid-Until=false", "update"],
            capture_output=True,
            check=False,
        )
        result = download()
    if result.returncode != 0:
        raise RuntimeError(f"apt-get download {' '.join(_PACKAGES)} failed:\n{result.stderr}")
    tmp = Path(tempfile.mkdtemp(prefix="unpack-", dir=root.parent))
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    shutil.rmtree(debs, ignore_errors=True)


def _version(binary: Path, env: dict[str, str], flag: str) -> str:
    result = subprocess.run(
        [str(binary), flag], capture_output=True, text=True, env=env, check=False
    )
    text = (result.stdout + result.stderr).strip().splitlines()
    return text[0] if text else "?"


def find_tools() -> Tools:
    """nginx and wrk, found or unpacked (see the module docstring); raises RuntimeError."""
    env_nginx, env_wrk = os.environ.get("BENCH_NGINX"), os.environ.get("BENCH_WRK")
    tools: Tools | None = None
    if env_nginx and env_wrk:
        tools = Tools(Path(env_nginx), Path(env_wrk), dict(os.environ), "BENCH_NGINX/BENCH_WRK")
    else:
        nginx, wrk = _which("nginx"), _which("wrk")
        if nginx and wrk:
            tools = Tools(nginx, wrk, dict(os.environ), "found on PATH")
    if tools is None:
        root = _CACHE / "bench-tools" / "root"
        found = _unpacked(root)
        how = f"Debian packages unpacked earlier in {root}"
        if found is None:
            print(
                f"bench: nginx/wrk not found: unpacking Debian's {', '.join(_PACKAGES)} "
                f"into {root} (apt-get download + dpkg-deb -x)",
                flush=True,
            )
            _unpack(root)
            found = _unpacked(root)
            how = f"Debian packages unpacked now into {root} (apt-get download)"
            if found is None:
                raise RuntimeError(f"unpacking nginx and wrk into {root} left no binaries")
        tools = Tools(found[0], found[1], found[2], how)
    versions = {
        "nginx": _version(tools.nginx, tools.env, "-v"),
        "wrk": _version(tools.wrk, tools.env, "-v"),
    }
    if "nginx/" not in versions["nginx"] or "wrk" not in versions["wrk"]:
        raise RuntimeError(f"nginx/wrk do not run here ({tools.how}): {versions}")
    return Tools(tools.nginx, tools.wrk, tools.env, tools.how, versions)


# ------------------------------------------------------------------------------ wrk

_DONE_SCRIPT: Final = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH-JSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50": %d, "p95": %d, "p99": %d, "max": %d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput, errors (socket + non-2xx/3xx) and latency percentiles (ms)."""

    requests: int
    seconds: float
    rps: float
    errors: int
    non_2xx: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def _lua_string(data: str) -> str:
    return "[==[" + data + "]==]"


def run_wrk(
    tools: Tools,
    url: str,
    *,
    connections: int,
    seconds: float,
    threads: int = 1,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body_file: Path | None = None,
    timeout_s: float = 10.0,
) -> WrkResult:
    """Closed-loop load with wrk; raises RuntimeError if wrk fails to run."""
    lines = [f"wrk.method = {_lua_string(method)}"]
    for name, value in (headers or {}).items():
        lines.append(f"wrk.headers[ {_lua_string(name)} ] = {_lua_string(value)}")
    if body_file is not None:
        lines.append(f"local f = io.open({_lua_string(str(body_file))}, 'rb')")
        lines.append("wrk.body = f:read('*a'); f:close()")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines) + "\n" + _DONE_SCRIPT)
    try:
        result = subprocess.run(
            [
                str(tools.wrk),
                f"-t{max(1, min(threads, connections))}",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                f"--timeout={timeout_s:g}s",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            env=tools.env,
            timeout=seconds + timeout_s + 60,
            check=False,
        )
    finally:
        os.unlink(script.name)
    summary = next(
        (line for line in result.stdout.splitlines() if line.startswith("BENCH-JSON ")), None
    )
    if result.returncode != 0 or summary is None:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    data = json.loads(summary.removeprefix("BENCH-JSON "))
    secs = data["duration_us"] / 1e6
    socket_errors = data["connect"] + data["read"] + data["write"] + data["timeout"]
    return WrkResult(
        requests=data["requests"],
        seconds=secs,
        rps=data["requests"] / secs if secs else 0.0,
        errors=socket_errors + data["status"],
        non_2xx=data["status"],
        p50_ms=data["p50"] / 1000,
        p95_ms=data["p95"] / 1000,
        p99_ms=data["p99"] / 1000,
        max_ms=data["max"] / 1000,
    )
