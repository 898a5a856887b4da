"""Deterministic OCI image-layout writer: the offline stand-in for rules_oci's image tooling.

Real rules_oci drives `regctl`, `jq` and `crane` (downloaded from GitHub). This module does the
same jobs with the standard library only, so the offline world can build images hermetically:

* ``image``: base (an OCI layout directory, or scratch) + layer tars + config changes
  -> a new OCI layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/*``).
* ``tarball``: an OCI layout -> a tarball that ``docker load`` accepts (``manifest.json``
  with ``RepoTags`` next to the OCI layout files).
* ``image-id``: the config digest (what ``docker images --no-trunc`` shows as the ID).

Determinism contract: the same inputs give byte-identical outputs. JSON is written with
sorted keys and no whitespace, layers are stored exactly as given (an uncompressed ``.tar``
stays an uncompressed layer, as in rules_oci), timestamps are fixed (``1970-01-01T00:00:00Z``
unless the base says otherwise) and tar members have mtime 0 and uid/gid 0.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import shutil
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Descriptor", "main"]

OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
EPOCH = "1970-01-01T00:00:00Z"
CREATED_BY = "rules_oci offline stand-in"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ENV_REF = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_CHUNK = 1 << 20

JSON = dict[str, Any]


class LayoutError(Exception):
    """An input is not what the rule promised (bad layout, unsupported layer, bad file)."""


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (media type, digest, size)."""

    media_type: str
    digest: str
    size: int

    def to_json(self) -> JSON:
        return {"digest": self.digest, "mediaType": self.media_type, "size": self.size}


def canonical_json(value: object) -> bytes:
    """The one JSON encoding used for every document: sorted keys, no whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class Layout:
    """An OCI image layout directory being written (or read)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"

    def blob_path(self, digest: str) -> Path:
        algorithm, _, hexdigest = digest.partition(":")
        if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
            raise LayoutError(f"unsupported digest {digest!r} (only sha256 is supported)")
        return self.blobs / hexdigest

    def read_json(self, digest: str) -> JSON:
        data: JSON = json.loads(self.blob_path(digest).read_bytes())
        return data

    def write_bytes(self, media_type: str, data: bytes) -> Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.blob_path(digest).write_bytes(data)
        return Descriptor(media_type, digest, len(data))

    def write_json(self, media_type: str, value: object) -> Descriptor:
        return self.write_bytes(media_type, canonical_json(value))

    def copy_blob(self, source: Layout, digest: str) -> None:
        target = self.blob_path(digest)
        if not target.exists():
            self.blobs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.blob_path(digest), target)

    def finish(self, manifest: Descriptor, annotations: dict[str, str] | None = None) -> None:
        entry = manifest.to_json()
        if annotations:
            entry["annotations"] = annotations
        index = {"manifests": [entry], "mediaType": MEDIA_INDEX, "schemaVersion": 2}
        (self.root / "index.json").write_bytes(canonical_json(index))
        (self.root / "oci-layout").write_bytes(canonical_json(OCI_LAYOUT))


def image_manifest(layout: Layout, platform: str = "linux/amd64") -> tuple[Descriptor, JSON]:
    """The (single-platform) image manifest a layout's index.json points at."""
    try:
        index: JSON = json.loads((layout.root / "index.json").read_bytes())
    except (OSError, ValueError) as error:
        raise LayoutError(f"{layout.root} is not an OCI image layout: {error}") from error
    entries: list[JSON] = index.get("manifests", [])
    while True:
        if not entries:
            raise LayoutError(f"{layout.root}: index.json lists no image for {platform}")
        entry = entries[0]
        if len(entries) > 1:
            wanted = platform.split("/")
            matches = [
                e
                for e in entries
                if [e.get("platform", {}).get("os"), e.get("platform", {}).get("architecture")]
                == wanted[:2]
            ]
            if not matches:
                raise LayoutError(f"{layout.root}: no manifest for platform {platform}")
            entry = matches[0]
        descriptor = Descriptor(entry["mediaType"], entry["digest"], entry["size"])
        document = layout.read_json(descriptor.digest)
        if descriptor.media_type in (MEDIA_INDEX, DOCKER_MANIFEST_LIST):
            entries = document.get("manifests", [])
            continue
        return descriptor, document


def _hash_stream(stream: io.BufferedIOBase | gzip.GzipFile) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def add_layer(layout: Layout, tar_path: Path) -> tuple[Descriptor, str]:
    """Store a layer tar as a blob unchanged; return its descriptor and diff_id."""
    with tar_path.open("rb") as handle:
        magic = handle.read(4)
    if magic.startswith(_ZSTD_MAGIC):
        raise LayoutError(f"{tar_path}: zstd layers are not supported by the offline stand-in")
    compressed = magic.startswith(_GZIP_MAGIC)
    with tar_path.open("rb") as handle:
        blob_digest = _hash_stream(handle)
    if compressed:
        with gzip.open(tar_path, "rb") as handle:
            diff_id = _hash_stream(handle)
    else:
        diff_id = blob_digest
    layout.blobs.mkdir(parents=True, exist_ok=True)
    target = layout.blob_path(blob_digest)
    if not target.exists():
        shutil.copyfile(tar_path, target)
    media_type = MEDIA_LAYER_GZIP if compressed else MEDIA_LAYER
    return Descriptor(media_type, blob_digest, tar_path.stat().st_size), diff_id


def read_key_values(path: Path) -> dict[str, str]:
    """A rules_oci DICT file: one ``key=value`` per line; the first ``=`` splits."""
    result: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise LayoutError(f"{path}:{number}: expected key=value, got {line!r}")
        result[key] = value
    return result


def read_list(path: Path) -> list[str]:
    """A rules_oci LIST file: one entry per line (``%5Cn`` encodes a newline inside one)."""
    return [line.replace("%5Cn", "\n") for line in path.read_text().splitlines()]


def read_ports(path: Path) -> list[str]:
    """rules_oci's exposed_ports file: comma-separated (newlines accepted too)."""
    return [p.strip() for p in path.read_text().replace("\n", ",").split(",") if p.strip()]


def expand_env(value: str, base: dict[str, str]) -> str:
    """``$KEY`` / ``${KEY}`` refer to the base image's value, as in rules_oci."""
    return _ENV_REF.sub(lambda m: base.get(m.group(1) or m.group(2), ""), value)


def _env_dict(entries: Sequence[str]) -> dict[str, str]:
    return dict(entry.partition("=")[::2] for entry in entries)


@dataclass(frozen=True)
class ImageChanges:
    """What ``oci_image`` adds to its base."""

    layers: Sequence[Path]
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: dict[str, str] | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    workdir: str | None = None
    user: str | None = None
    exposed_ports: list[str] | None = None


def scratch_config(os_name: str, architecture: str, variant: str | None) -> JSON:
    config: JSON = {
        "architecture": architecture,
        "config": {},
        "created": EPOCH,
        "history": [],
        "os": os_name,
        "rootfs": {"diff_ids": [], "type": "layers"},
    }
    if variant:
        config["variant"] = variant
    return config


def build_image(
    output: Path,
    changes: ImageChanges,
    base: Path | None = None,
    platform: tuple[str, str, str | None] = ("linux", "amd64", None),
) -> Descriptor:
    """Write ``output`` as an OCI layout: ``base`` (or scratch) plus ``changes``."""
    if output.exists():
        shutil.rmtree(output)
    output.mkdir(parents=True)
    layout = Layout(output)
    layers: list[JSON] = []
    if base is not None:
        source = Layout(base)
        _, base_manifest = image_manifest(source)
        config = source.read_json(base_manifest["config"]["digest"])
        for layer in base_manifest.get("layers", []):
            layout.copy_blob(source, layer["digest"])
            layers.append(layer)
    else:
        config = scratch_config(*platform)

    settings: JSON = dict(config.get("config") or {})
    history: list[JSON] = list(config.get("history") or [])
    diff_ids: list[str] = list(config["rootfs"]["diff_ids"])
    for tar_path in changes.layers:
        descriptor, diff_id = add_layer(layout, tar_path)
        layers.append(descriptor.to_json())
        diff_ids.append(diff_id)
        history.append({"created": EPOCH, "created_by": CREATED_BY})

    if changes.entrypoint is not None:
        settings["Entrypoint"] = changes.entrypoint
        # As a Dockerfile ENTRYPOINT does: the base's Cmd belonged to the base's entrypoint.
        settings.pop("Cmd", None)
    if changes.cmd is not None:
        settings["Cmd"] = changes.cmd
    if changes.env:
        env = _env_dict(settings.get("Env") or [])
        for key, value in changes.env.items():
            env[key] = expand_env(value, env)
        settings["Env"] = [f"{key}={value}" for key, value in env.items()]
    if changes.labels:
        settings["Labels"] = {**(settings.get("Labels") or {}), **changes.labels}
    if changes.workdir is not None:
        settings["WorkingDir"] = changes.workdir
    if changes.user is not None:
        settings["User"] = changes.user
    if changes.exposed_ports:
        ports = dict(settings.get("ExposedPorts") or {})
        for port in changes.exposed_ports:
            ports[port if "/" in port else port + "/tcp"] = {}
        settings["ExposedPorts"] = dict(sorted(ports.items()))

    config["config"] = settings
    config["history"] = history
    config["rootfs"] = {"diff_ids": diff_ids, "type": "layers"}
    config_descriptor = layout.write_json(MEDIA_CONFIG, config)
    manifest: JSON = {
        "config": config_descriptor.to_json(),
        "layers": layers,
        "mediaType": MEDIA_MANIFEST,
        "schemaVersion": 2,
    }
    if changes.annotations:
        manifest["annotations"] = changes.annotations
    manifest_descriptor = layout.write_json(MEDIA_MANIFEST, manifest)
    layout.finish(manifest_descriptor)
    return manifest_descriptor


def _tar_members(
    layout: Layout, manifest: JSON, repo_tags: list[str]
) -> Iterator[tuple[str, bytes | Path]]:
    config_digest = manifest["config"]["digest"]
    layer_digests = [layer["digest"] for layer in manifest["layers"]]
    docker_manifest = [
        {
            "Config": f"blobs/sha256/{config_digest.split(':')[1]}",
            "Layers": [f"blobs/sha256/{digest.split(':')[1]}" for digest in layer_digests],
            "RepoTags": repo_tags,
        }
    ]
    yield "manifest.json", canonical_json(docker_manifest)
    yield "oci-layout", (layout.root / "oci-layout").read_bytes()
    yield "index.json", (layout.root / "index.json").read_bytes()
    seen: set[str] = set()
    for path in sorted(layout.blobs.iterdir()):
        if path.name not in seen:
            seen.add(path.name)
            yield f"blobs/sha256/{path.name}", path


def write_tarball(image: Path, repo_tags: list[str], output: Path) -> None:
    """A ``docker load`` tarball (docker-archive + OCI layout, as Docker 25+ writes)."""
    layout = Layout(image)
    _, manifest = image_manifest(layout)
    with tarfile.open(output, "w", format=tarfile.PAX_FORMAT) as archive:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            archive.addfile(info)
        for name, content in _tar_members(layout, manifest, repo_tags):
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            if isinstance(content, Path):
                info.size = content.stat().st_size
                with content.open("rb") as handle:
                    archive.addfile(info, handle)
            else:
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))


def _optional(path: str | None, reader: Any) -> Any:
    return reader(Path(path)) if path else None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="oci_layout", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    image = commands.add_parser("image", help="assemble an OCI layout")
    image.add_argument("--output", required=True, type=Path)
    image.add_argument("--base", type=Path, help="base OCI layout directory (default: scratch)")
    image.add_argument("--os", default="linux")
    image.add_argument("--architecture", default="amd64")
    image.add_argument("--variant")
    image.add_argument("--layer", action="append", default=[], type=Path)
    image.add_argument("--entrypoint", help="LIST file")
    image.add_argument("--cmd", help="LIST file")
    image.add_argument("--env", help="DICT file")
    image.add_argument("--labels", help="DICT file")
    image.add_argument("--annotations", help="DICT file")
    image.add_argument("--workdir", help="file with one line")
    image.add_argument("--user")
    image.add_argument("--exposed-ports", help="file: comma-separated ports")
    image.add_argument("--digest-out", type=Path, help="write the manifest digest here")
    tarball = commands.add_parser("tarball", help="write a docker-loadable tarball")
    tarball.add_argument("--image", required=True, type=Path)
    tarball.add_argument("--repo-tags", required=True, type=Path, help="LIST file")
    tarball.add_argument("--output", required=True, type=Path)
    image_id = commands.add_parser("image-id", help="write the config digest")
    image_id.add_argument("--image", required=True, type=Path)
    image_id.add_argument("--output", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "image":
            workdir = _optional(args.workdir, lambda p: p.read_text().strip())
            changes = ImageChanges(
                layers=args.layer,
                entrypoint=_optional(args.entrypoint, read_list),
                cmd=_optional(args.cmd, read_list),
                env=_optional(args.env, read_key_values),
                labels=_optional(args.labels, read_key_values),
                annotations=_optional(args.annotations, read_key_values),
                workdir=workdir,
                user=args.user,
                exposed_ports=_optional(args.exposed_ports, read_ports),
            )
            descriptor = build_image(
                args.output, changes, args.base, (args.os, args.architecture, args.variant)
            )
            if args.digest_out:
                args.digest_out.write_text(descriptor.digest + "\n")
        elif args.command == "tarball":
            write_tarball(args.image, read_list(args.repo_tags), args.output)
        else:
            _, manifest = image_manifest(Layout(args.image))
            args.output.write_text(manifest["config"]["digest"] + "\n")
    except (LayoutError, OSError) as error:
        print(f"oci_layout: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
