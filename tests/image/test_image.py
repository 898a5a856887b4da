"""The engine image end to end: build outputs, the engine on the image's own Python, push
to a real registry and inspect it back.

Inputs come from tests/image/BUILD.bazel (``engine_image(name = "image")`` on the
zero-policy engine) through environment variables naming runfiles. The image is run for
real under podman by test_podman.py (tools/test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.image.registry import running_registry

IMAGE = Path(os.environ["IMAGE_DIR"])
DIGEST = Path(os.environ["IMAGE_DIGEST"]).read_text().strip()
PUSH = Path(os.environ["IMAGE_PUSH"])
TARBALL = Path(os.environ["IMAGE_TARBALL"])
DOCKERFILE = Path(os.environ["IMAGE_DOCKERFILE"])
CRANE = os.environ.get("CRANE", "/usr/bin/crane")
ENTRYPOINT = ["/usr/bin/python3.11", "/opt/policy-engine/engine.runfiles/_main/engine/bin.py"]
TLS_DIR = "/etc/policy-engine/tls"
CMD = [
    *("--config", "/etc/policy-engine/config.yaml", "--listen", "0.0.0.0:9002"),
    *("--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"),
    *("--tls-client-ca", f"{TLS_DIR}/ca.crt", "--health-listen", "127.0.0.1:9003"),
]
USER = "65532:65532"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _blob(digest: str) -> bytes:
    return (IMAGE / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def _manifest() -> dict[str, Any]:
    index = json.loads((IMAGE / "index.json").read_text())
    result: dict[str, Any] = json.loads(_blob(index["manifests"][0]["digest"]))
    return result


def _config() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(_blob(_manifest()["config"]["digest"]))
    return result


def _crane(*args: str) -> str:
    result = subprocess.run(
        [CRANE, *args, "--insecure"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"crane {' '.join(args)}: {result.stderr}"
    return result.stdout


def test_layout_is_a_valid_oci_image() -> None:
    index = json.loads((IMAGE / "index.json").read_text())
    assert json.loads((IMAGE / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert [m["digest"] for m in index["manifests"]] == [DIGEST]
    manifest = _manifest()
    assert manifest["mediaType"] == OCI_MANIFEST
    config = _config()
    assert len(manifest["layers"]) == len(config["rootfs"]["diff_ids"]) == 3  # base + deps + app


def test_config_has_entrypoint_labels_and_fixed_timestamps() -> None:
    config = _config()
    assert config["config"]["Entrypoint"] == ENTRYPOINT
    assert config["config"]["Cmd"] == CMD
    assert config["config"]["User"] == USER
    assert config["config"]["ExposedPorts"] == {"9002/tcp": {}, "9090/tcp": {}}
    assert config["config"]["WorkingDir"] == "/opt/policy-engine"
    env = dict(e.partition("=")[::2] for e in config["config"]["Env"])
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # read-only root file system
    assert env["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"
    assert env["PYTHONPATH"].startswith("/opt/policy-engine/engine.runfiles:")
    labels = config["config"]["Labels"]
    assert labels["io.policy-engine.policies"] == ""
    assert labels["io.policy-engine.target"] == "//tests/image:image"
    assert labels["io.policy-engine.test"] == "image"
    assert labels["org.opencontainers.image.revision"] == "unstamped"
    assert labels["org.opencontainers.image.base.digest"].startswith("sha256:")
    assert config["created"] == labels["org.opencontainers.image.created"] == "1970-01-01T00:00:00Z"
    assert _manifest()["annotations"]["io.policy-engine.target"] == "//tests/image:image"


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's file system, unpacked layer by layer as a container runtime would."""
    root = tmp_path_factory.mktemp("image") / "rootfs"
    for layer in _manifest()["layers"]:
        with tarfile.open(
            IMAGE / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        ) as tar:
            tar.extractall(root, filter="fully_trusted")  # our own layers; absolute links
    return root


def _in_image(rootfs: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside the unpacked image (chroot) as its user, with its environment."""
    chroot = shutil.which("chroot", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if os.geteuid() != 0 or chroot is None:
        pytest.skip(
            "running the image's own Python needs root and chroot(8) (podman test: tools/test)"
        )
    env = dict(e.partition("=")[::2] for e in _config()["config"]["Env"])
    return subprocess.run(
        [chroot, f"--userspec={USER}", str(rootfs), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def test_base_is_debian_python_3_11(rootfs: Path) -> None:
    assert (rootfs / "usr/bin/python3.11").is_file()
    assert not (rootfs / "bin/sh").exists()  # no shell: nothing but Python and its libraries
    lock = json.loads(Path(os.environ["BASE_LOCK"]).read_text())
    status = sorted(p.name for p in (rootfs / "var/lib/dpkg/status.d").iterdir())
    assert status == sorted(p["name"] for p in lock["packages"])
    result = _in_image(rootfs, "/usr/bin/python3.11", "-c", "import sys, ssl; print(sys.version)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("3.11.")


def test_entrypoint_runs_the_engine_on_the_image_python(rootfs: Path) -> None:
    result = _in_image(rootfs, *ENTRYPOINT, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("policy-engine ")


def test_default_command_without_the_tls_secret_fails_naming_the_file(rootfs: Path) -> None:
    # The default listens beyond loopback, so only with mTLS: no secret mounted, no start.
    result = _in_image(rootfs, *ENTRYPOINT, *CMD)
    assert result.returncode == 1, result.stderr
    assert (
        f"--tls-cert {TLS_DIR}/tls.crt: cannot read the certificate: No such file or directory"
        in result.stderr
    )


def test_every_compiled_module_imports_on_the_image_python(rootfs: Path) -> None:
    # cp311 manylinux wheels (grpcio, protobuf's upb, cel-expr-python, pyyaml, ...) on
    # bookworm's 3.11.2 and its glibc: import every extension module the image ships.
    modules = []
    for so in sorted((rootfs / "opt/policy-engine").rglob("*.so")):
        parts = so.relative_to(rootfs).parts
        if "site-packages" not in parts:
            continue
        relative = parts[parts.index("site-packages") + 1 :]
        name = ".".join([*relative[:-1], relative[-1].split(".")[0]])
        if not name.split(".")[-1].startswith("lib"):  # bundled shared libraries
            modules.append(name)
    assert "google._upb._message" in modules
    assert any(m.startswith("grpc.") for m in modules)
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    result = _in_image(rootfs, "/usr/bin/python3.11", "-c", script, *modules)
    assert result.returncode == 0, f"{modules}: {result.stderr}"


def test_bytecode_is_precompiled(rootfs: Path) -> None:
    # The root file system is read-only at run time: pycs come with the image.
    assert (rootfs / "usr/lib/python3.11/__pycache__/asyncio.cpython-311.pyc").exists() or (
        rootfs / "usr/lib/python3.11/asyncio/__pycache__/base_events.cpython-311.pyc"
    ).exists()
    assert (
        rootfs / "opt/policy-engine/engine.runfiles/_main/engine/__pycache__/main.cpython-311.pyc"
    ).exists()
    result = _in_image(
        rootfs,
        "/usr/bin/python3.11",
        "-c",
        "import engine.main, sys; print(sys.modules['engine.main'].__cached__)",
    )
    assert result.returncode == 0, result.stderr


def test_docker_load_tarball_matches_the_image() -> None:
    with tarfile.open(TARBALL) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        names = set(tar.getnames())
    assert manifest[0]["RepoTags"] == ["policy-engine:latest"]
    config_digest = _manifest()["config"]["digest"].removeprefix("sha256:")
    assert manifest[0]["Config"] == f"blobs/sha256/{config_digest}"
    layers = [f"blobs/sha256/{d['digest'].removeprefix('sha256:')}" for d in _manifest()["layers"]]
    assert manifest[0]["Layers"] == layers
    assert set(manifest[0]["Layers"]) <= names


def test_dockerfile_pins_the_base_and_matches_the_config() -> None:
    text = DOCKERFILE.read_text()
    labels = _config()["config"]["Labels"]
    base = (
        labels["org.opencontainers.image.base.name"]
        + "@"
        + labels["org.opencontainers.image.base.digest"]
    )
    assert labels["org.opencontainers.image.base.name"] == "policy-engine/python-base:3.11-bookworm"
    assert base.split("@")[1] == Path(os.environ["BASE_DIGEST"]).read_text().strip()
    assert "FROM scratch\nADD python_base_layer.tar /\n" in text
    assert "ADD image_layer_deps.tar /\nADD image_layer_app.tar /\n" in text
    assert f"ENTRYPOINT {json.dumps(ENTRYPOINT)}\n" in text
    assert f"CMD {json.dumps(CMD)}\n" in text
    assert f"USER {USER}\n" in text
    assert "EXPOSE 9002/tcp\nEXPOSE 9090/tcp\n" in text
    for entry in _config()["config"]["Env"]:
        key, _, value = entry.partition("=")
        assert f"ENV {key}={json.dumps(value)}\n" in text


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    with running_registry(tmp_path) as address:
        yield address


def test_push_to_a_registry_and_inspect_it_back(registry: str) -> None:
    repository = f"{registry}/policy-engine"
    pushed = subprocess.run(
        [str(PUSH), "--repository", repository, "--tag", "ci", "--insecure"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert pushed.returncode == 0, pushed.stderr

    # remote_tags = ["latest"] from BUILD, --tag ci from the command line.
    for tag in ("latest", "ci"):
        assert _crane("digest", f"{repository}:{tag}").strip() == DIGEST
    remote_manifest = json.loads(_crane("manifest", f"{repository}@{DIGEST}"))
    assert remote_manifest == _manifest()
    remote_config = json.loads(_crane("config", f"{repository}:latest"))
    assert remote_config["config"]["Entrypoint"] == ENTRYPOINT
    assert remote_config["config"]["Labels"] == _config()["config"]["Labels"]
    assert len(remote_manifest["layers"]) == 3

    # The registry itself (not crane) reports the same digest.
    request = urllib.request.Request(
        f"http://{repository.replace('/', '/v2/', 1)}/manifests/latest",
        headers={"Accept": OCI_MANIFEST},
        method="HEAD",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Docker-Content-Digest"] == DIGEST


def test_push_refuses_a_repository_with_a_tag(registry: str) -> None:
    # rules_oci pushes by digest: a ":tag" in --repository would be dropped silently.
    result = subprocess.run(
        [str(PUSH), "--repository", f"{registry}/policy-engine:v1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "--tag" in result.stderr
