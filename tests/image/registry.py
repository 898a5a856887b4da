"""A throw-away OCI registry (Debian's ``docker-registry``, registry v2) on 127.0.0.1.

Tests use :func:`running_registry`: it picks a free port, starts the registry with its
storage in a temporary directory, waits (bounded) until ``/v2/`` answers, and always stops
it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = ["REGISTRY_BINARY", "RegistryError", "push_layout", "running_registry"]

REGISTRY_BINARY = os.environ.get("DOCKER_REGISTRY", "/usr/bin/docker-registry")
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 5.0
_ATTEMPTS = 3

_CONFIG = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: policy-engine-tests
"""


class RegistryError(Exception):
    """The registry could not be started."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_registry(workdir: Path) -> Iterator[str]:
    """Yield ``127.0.0.1:PORT`` of a running registry; stop it on exit."""
    if not os.access(REGISTRY_BINARY, os.X_OK):
        raise RegistryError(
            f"{REGISTRY_BINARY} not found: install Debian's docker-registry "
            "(tools/bazel adds it to its offline root)"
        )
    log_path = workdir / "registry.log"
    for attempt in range(_ATTEMPTS):
        port = _free_port()
        config = workdir / f"registry-{attempt}.yml"
        storage = workdir / f"storage-{attempt}"
        storage.mkdir()
        config.write_text(_CONFIG.format(storage=storage, port=port))
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + _START_TIMEOUT
            while process.poll() is None and time.monotonic() < deadline:
                if _ready(port):
                    yield f"127.0.0.1:{port}"
                    return
                time.sleep(0.1)
        finally:
            _stop(process)
        # Exited early (port taken meanwhile?) or never answered: try another port.
    raise RegistryError(f"registry did not start; log:\n{log_path.read_text(errors='replace')}")


def push_layout(layout: Path, registry: str, repository: str, tag: str) -> str:
    """Push an OCI layout's image byte for byte (registry API v2); return its digest.

    Where crane is not installed (the host side of the podman test), this is what
    ``crane push`` does: every blob by a monolithic upload, then the manifest as stored
    in the layout, so the registry's digest is the layout's.
    """
    index = json.loads((layout / "index.json").read_text())
    descriptor = index["manifests"][0]
    blobs = layout / "blobs" / "sha256"
    manifest_bytes = (blobs / descriptor["digest"].split(":")[1]).read_bytes()
    manifest = json.loads(manifest_bytes)
    base = f"http://{registry}/v2/{repository}"
    for blob in [manifest["config"], *manifest["layers"]]:
        digest = blob["digest"]
        head = urllib.request.Request(f"{base}/blobs/{digest}", method="HEAD")
        try:
            with urllib.request.urlopen(head, timeout=30):
                continue  # already there
        except urllib.error.HTTPError as error:
            if error.code != 404:
                raise
        start = urllib.request.Request(f"{base}/blobs/uploads/", method="POST", data=b"")
        with urllib.request.urlopen(start, timeout=30) as response:
            location = response.headers["Location"]
        if location.startswith("/"):
            location = f"http://{registry}{location}"
        separator = "&" if "?" in location else "?"
        upload = urllib.request.Request(
            f"{location}{separator}digest={digest}",
            method="PUT",
            data=(blobs / digest.split(":")[1]).read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(upload, timeout=300):
            pass
    put = urllib.request.Request(
        f"{base}/manifests/{tag}",
        method="PUT",
        data=manifest_bytes,
        headers={"Content-Type": descriptor["mediaType"]},
    )
    with urllib.request.urlopen(put, timeout=60) as response:
        digest_header: str = response.headers["Docker-Content-Digest"]
    return digest_header
