"""The engine images' base layer: pinned Debian packages unpacked into one deterministic tar.

Build action of ``//builder/private:python_base_layer``. Reads the lock file
(``base_debs.lock.json``) and the ``.deb`` files it pins (``@debian_base_debs``), and writes
``--output``, an uncompressed tar of the root file system:

* every package's ``data.tar`` unpacked as dpkg would (no maintainer scripts run), minus
  documentation (``usr/share/{doc,man,info,lintian,locale}``; each package's
  ``copyright`` file is kept, as the licences ask);
* ``var/lib/dpkg/status.d/<package>``: the package's control file, so image scanners see
  what is installed (the layout distroless images use);
* what maintainer scripts would have made and the image needs: ``etc/passwd`` and
  ``etc/group`` (root, ``nonroot`` 65532, ``nobody``), the CA bundle
  ``etc/ssl/certs/ca-certificates.crt`` (every Mozilla certificate ca-certificates ships,
  sorted, as ``update-ca-certificates`` would concatenate them), OpenSSL's default paths
  (``usr/lib/ssl/{cert.pem,certs}``, links into ``etc/ssl``), ``tmp`` (1777) and
  ``home/nonroot`` (owned by 65532);
* the standard library's bytecode (``__pycache__``, builder/private/pyc.py), which Debian's
  postinst would compile and a read-only image cannot.

Determinism contract: the output depends only on the lock and the ``.deb`` bytes. Entries
are sorted by path, every parent directory is present, mtimes are
:data:`MTIME` (pkg_tar's), owners 0:0 without names (except ``home/nonroot``), hard links
become copies (sorting may put a link before its target). A ``.deb`` that does not match its
pin (name, version) is an error; two packages shipping different content at one path is an
error.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import sys
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from builder.private.pyc import compile_pyc, pyc_path

__all__ = ["MTIME", "NONROOT", "Entry", "build_rootfs", "main", "read_deb"]

MTIME = 946684800  # 2000-01-01T00:00:00Z, what rules_pkg's pkg_tar writes
NONROOT = 65532
_DROPPED = (
    "usr/share/doc/",
    "usr/share/man/",
    "usr/share/info/",
    "usr/share/lintian/",
    "usr/share/locale/",
)
_CERTS = "usr/share/ca-certificates/mozilla/"
_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
_STDLIB = "usr/lib/python3.11/"

_PASSWD = f"""root:x:0:0:root:/root:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/usr/sbin/nologin
"""
_GROUP = f"""root:x:0:
nobody:x:65534:
nonroot:x:{NONROOT}:
"""


class DebError(Exception):
    """A .deb is malformed, does not match its pin, or conflicts with another."""


@dataclass
class Entry:
    """One member of the layer: a directory, a regular file or a symbolic link."""

    kind: bytes  # tarfile.DIRTYPE, REGTYPE or SYMTYPE
    mode: int
    data: bytes = b""
    target: str = ""
    owner: int = 0
    package: str = ""


def _ar_members(data: bytes, name: str) -> Iterator[tuple[str, bytes]]:
    if not data.startswith(b"!<arch>\n"):
        raise DebError(f"{name}: not a .deb (ar archive)")
    offset = 8
    while offset + 60 <= len(data):
        header = data[offset : offset + 60]
        member = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        offset += 60
        yield member, data[offset : offset + size]
        offset += size + (size % 2)


def _decompress(member: str, payload: bytes, name: str) -> bytes:
    if member.endswith(".xz"):
        return lzma.decompress(payload)
    if member.endswith(".gz"):
        return zlib.decompress(payload, 16 + zlib.MAX_WBITS)
    if member.endswith(".tar"):
        return payload
    raise DebError(f"{name}: {member}: unsupported compression (bookworm uses xz)")


def read_deb(path: Path) -> tuple[dict[str, str], bytes]:
    """(control fields, uncompressed data.tar) of a .deb."""
    control: dict[str, str] = {}
    data_tar = b""
    control_text = ""
    for member, payload in _ar_members(path.read_bytes(), path.name):
        if member.startswith("control.tar"):
            raw = _decompress(member, payload, path.name)
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                for info in tar:
                    if info.name in ("./control", "control"):
                        handle = tar.extractfile(info)
                        assert handle is not None
                        control_text = handle.read().decode()
        elif member.startswith("data.tar"):
            data_tar = _decompress(member, payload, path.name)
    if not control_text or not data_tar:
        raise DebError(f"{path.name}: no control file or data.tar")
    key = ""
    for line in control_text.splitlines():
        if line[:1].isspace() and key:
            control[key] += "\n" + line
        elif ":" in line:
            key, _, value = line.partition(":")
            control[key] = value.strip()
    control["_text"] = control_text
    return control, data_tar


def _clean(name: str) -> str:
    """``./usr/bin/x`` -> ``usr/bin/x``; the archive root -> ``""``."""
    path = str(PurePosixPath("/" + name.removeprefix("./")))
    return path.lstrip("/")


def _keep(path: str) -> bool:
    if path.startswith("usr/share/doc/") and path.endswith("/copyright"):
        return True
    return not any(path.startswith(prefix) or path + "/" == prefix for prefix in _DROPPED)


def _add(entries: dict[str, Entry], path: str, entry: Entry) -> None:
    existing = entries.get(path)
    if existing is None:
        entries[path] = entry
        return
    if existing.kind == entry.kind == tarfile.DIRTYPE:
        return
    if (existing.kind, existing.data, existing.target) != (entry.kind, entry.data, entry.target):
        raise DebError(f"{path}: shipped differently by {existing.package} and {entry.package}")


def _unpack(entries: dict[str, Entry], package: str, data_tar: bytes) -> None:
    with tarfile.open(fileobj=io.BytesIO(data_tar)) as tar:
        members = {_clean(m.name): m for m in tar.getmembers()}
        for path, info in members.items():
            if not path or not _keep(path):
                continue
            if info.isdir():
                _add(entries, path, Entry(tarfile.DIRTYPE, info.mode & 0o7777, package=package))
            elif info.issym():
                _add(
                    entries,
                    path,
                    Entry(tarfile.SYMTYPE, 0o777, target=info.linkname, package=package),
                )
            elif info.isreg() or info.islnk():
                source = members[_clean(info.linkname)] if info.islnk() else info
                handle = tar.extractfile(source)
                assert handle is not None
                _add(
                    entries,
                    path,
                    Entry(tarfile.REGTYPE, source.mode & 0o7777, handle.read(), package=package),
                )
            else:
                raise DebError(f"{package}: {path}: unsupported member type {info.type!r}")


def build_rootfs(lock: dict[str, object], debs: dict[str, Path]) -> dict[str, Entry]:
    """The layer's entries by path (unsorted), from the lock and the files it pins."""
    entries: dict[str, Entry] = {}
    packages = lock["packages"]
    assert isinstance(packages, list)
    for pin in sorted(packages, key=lambda p: p["name"]):
        name = pin["name"]
        if name not in debs:
            raise DebError(f"{name}: pinned in the lock but no .deb was given")
        control, data_tar = read_deb(debs[name])
        if (control.get("Package"), control.get("Version")) != (name, pin["version"]):
            raise DebError(
                f"{debs[name].name}: is {control.get('Package')} {control.get('Version')}, "
                f"the lock pins {name} {pin['version']}"
            )
        _unpack(entries, name, data_tar)
        status = control["_text"].rstrip("\n") + "\nStatus: install ok installed\n"
        entries[f"var/lib/dpkg/status.d/{name}"] = Entry(tarfile.REGTYPE, 0o644, status.encode())
    extra = set(debs) - {p["name"] for p in packages}
    if extra:
        raise DebError(f"not in the lock: {', '.join(sorted(extra))}")

    for path in sorted(entries):
        entry = entries[path]
        if path.startswith(_STDLIB) and path.endswith(".py") and entry.kind == tarfile.REGTYPE:
            pyc = compile_pyc(entry.data, "/" + path)
            if pyc is not None:
                entries[pyc_path(path)] = Entry(tarfile.REGTYPE, 0o644, pyc, package=entry.package)

    certificates = sorted(p for p in entries if p.startswith(_CERTS) and p.endswith(".crt"))
    if not certificates:
        raise DebError(f"no certificates under {_CERTS}: is ca-certificates pinned?")
    bundle = b"".join(entries[p].data.rstrip(b"\n") + b"\n" for p in certificates)
    generated = {
        "etc/passwd": Entry(tarfile.REGTYPE, 0o644, _PASSWD.encode()),
        "etc/group": Entry(tarfile.REGTYPE, 0o644, _GROUP.encode()),
        _BUNDLE: Entry(tarfile.REGTYPE, 0o644, bundle),
        "usr/lib/ssl/cert.pem": Entry(tarfile.SYMTYPE, 0o777, target="/" + _BUNDLE),
        "usr/lib/ssl/certs": Entry(tarfile.SYMTYPE, 0o777, target="/etc/ssl/certs"),
        "tmp": Entry(tarfile.DIRTYPE, 0o1777),
        "home/nonroot": Entry(tarfile.DIRTYPE, 0o755, owner=NONROOT),
    }
    for path, entry in generated.items():
        entry.package = "(generated)"
        entries[path] = entry

    for path in list(entries):
        parent = PurePosixPath(path).parent
        while str(parent) != ".":
            entries.setdefault(str(parent), Entry(tarfile.DIRTYPE, 0o755, package="(parent)"))
            parent = parent.parent
    return entries


def write_layer(entries: dict[str, Entry], output: Path) -> None:
    """Write the entries as a tar, sorted by path, with fixed metadata."""
    with tarfile.open(output, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            entry = entries[path]
            info = tarfile.TarInfo(path)
            info.type = entry.kind
            info.mode = entry.mode
            info.mtime = MTIME
            info.uid = info.gid = entry.owner
            info.uname = info.gname = ""
            if entry.kind == tarfile.SYMTYPE:
                info.linkname = entry.target
                tar.addfile(info)
            elif entry.kind == tarfile.REGTYPE:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                tar.addfile(info)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="base_rootfs", description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("debs", nargs="+", type=Path, help="<package>.deb files")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        lock = json.loads(args.lock.read_text())
        debs = {path.name.removesuffix(".deb"): path for path in args.debs}
        write_layer(build_rootfs(lock, debs), args.output)
    except (DebError, OSError, KeyError, ValueError, tarfile.TarError, lzma.LZMAError) as error:
        print(f"base_rootfs: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
