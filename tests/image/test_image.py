"""The engine image end to end: build outputs, push to a real registry, inspect it back.

Inputs come from tests/image/BUILD.bazel (``engine_image(name = "image")`` on the
zero-policy engine) through environment variables naming runfiles.
"""

from __future__ import annotations

import json
import os
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
ENTRYPOINT = ["/opt/policy-engine/engine"]
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
    assert config["config"]["WorkingDir"] == "/opt/policy-engine"
    labels = config["config"]["Labels"]
    assert labels["io.policy-engine.policies"] == ""
    assert labels["io.policy-engine.target"] == "//tests/image:image"
    assert labels["io.policy-engine.test"] == "image"
    assert labels["org.opencontainers.image.revision"] == "unstamped"
    assert labels["org.opencontainers.image.base.digest"].startswith("sha256:")
    assert config["created"] == labels["org.opencontainers.image.created"] == "1970-01-01T00:00:00Z"
    assert _manifest()["annotations"]["io.policy-engine.target"] == "//tests/image:image"


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """The image's file system, unpacked layer by layer as a container runtime would."""
    root = tmp_path / "rootfs"
    for layer in _manifest()["layers"]:
        with tarfile.open(
            IMAGE / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        ) as tar:
            tar.extractall(root, filter="tar")
    return root


def test_entrypoint_runs_from_the_unpacked_layers(rootfs: Path) -> None:
    # The engine layers carry the complete runfiles tree: the launcher works from them
    # (with this machine's python3; the offline base has no Python of its own).
    launcher = rootfs / ENTRYPOINT[0].lstrip("/")
    result = subprocess.run(
        [str(launcher), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ["PATH"]},
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


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
    assert f"FROM {base}\n" in text
    assert "ADD image_layer_deps.tar /\nADD image_layer_app.tar /\n" in text
    assert f"ENTRYPOINT {json.dumps(ENTRYPOINT)}\n" in text


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
