"""Re-pin the Debian packages of the engine images' base (builder/private/base_debs.lock.json).

Run on a Debian bookworm machine (``tools/pin_base_debs.sh`` does, after ``apt-get update``):
it resolves the dependency closure of :data:`ROOTS` with this machine's apt (candidate
versions, so point releases and security updates are picked up), and writes one entry per
package: name, version, architecture, the path inside the archive (``Filename``), size and
sha256. The build (builder/private/debian_base.bzl) downloads exactly those files from the
mirror(s) named by ``POLICY_ENGINE_DEBIAN_MIRRORS`` and checks every sha256.

Closure rules (``Depends`` and ``Pre-Depends`` only, like ``apt-get install
--no-install-recommends``): of an ``a | b`` group the first alternative that has a candidate
is taken; :data:`EXCLUDED` packages are dropped with their dependencies, because the image
never runs maintainer scripts or package tools (the reason is written next to each).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EXCLUDED", "ROOTS", "Deb", "main", "resolve"]

ROOTS: tuple[str, ...] = (
    "python3.11-minimal",  # the interpreter, /usr/bin/python3.11
    "libpython3.11-stdlib",  # asyncio, ssl, json, logging, ...: the engine imports them
    "ca-certificates",  # JWKS and other HTTPS fetches; the bundle is generated at build time
    "libstdc++6",  # C++ extension modules (cel-expr-python) link it dynamically
)

EXCLUDED: dict[str, str] = {
    "debconf": "configuration prompts of maintainer scripts, which never run in the image",
    "debconf-2.0": "virtual debconf",
    "openssl": "only update-ca-certificates uses the CLI; the bundle is made at build time",
    "perl-base": "maintainer scripts only",
    "dpkg": "no package manager in the image",
    "install-info": "maintainer scripts only",
    "media-types": "mimetypes falls back to its built-in table",
    "mime-support": "virtual media-types",
    "readline-common": "inputrc for interactive shells only",
    "tzdata": "the engine logs in UTC and uses no time zones",
}

LOCK = Path(__file__).resolve().parents[1] / "builder" / "private" / "base_debs.lock.json"
_NAME = re.compile(r"^\s*([a-z0-9][a-z0-9+.-]*)(?::[a-z0-9]+)?")


@dataclass(frozen=True)
class Deb:
    """One pinned package (the candidate version of this machine's apt)."""

    name: str
    version: str
    architecture: str
    filename: str
    size: int
    sha256: str
    depends: tuple[tuple[str, ...], ...]


def _show(name: str) -> Deb | None:
    result = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not result.stdout.strip():
        return None
    fields: dict[str, str] = {}
    key = ""
    for line in result.stdout.split("\n\n")[0].splitlines():
        if line[:1].isspace() and key:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    groups: list[tuple[str, ...]] = []
    for field in ("Pre-Depends", "Depends"):
        for group in filter(None, (g.strip() for g in fields.get(field, "").split(","))):
            names = []
            for alternative in group.split("|"):
                match = _NAME.match(alternative)
                if match:
                    names.append(match.group(1))
            groups.append(tuple(names))
    return Deb(
        name=fields["Package"],
        version=fields["Version"],
        architecture=fields["Architecture"],
        filename=fields["Filename"],
        size=int(fields["Size"]),
        sha256=fields["SHA256"],
        depends=tuple(groups),
    )


def resolve(roots: Sequence[str], excluded: dict[str, str]) -> list[Deb]:
    """The closure of ``roots`` (first installable alternative), sorted by name."""
    found: dict[str, Deb] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in found or name in excluded:
            continue
        deb = _show(name)
        if deb is None:
            raise SystemExit(f"pin_base_debs: apt has no candidate for {name!r} (apt-get update?)")
        found[name] = deb
        for group in deb.depends:
            if any(alternative in found for alternative in group):
                continue
            if any(alternative in excluded for alternative in group):
                continue
            for alternative in group:
                if _show(alternative) is not None:
                    todo.append(alternative)
                    break
            else:
                raise SystemExit(f"pin_base_debs: {name}: nothing installs {' | '.join(group)}")
    return sorted(found.values(), key=lambda d: d.name)


def render(debs: Sequence[Deb], suite: str) -> str:
    """The lock file: stable JSON (sorted keys, one package per entry)."""
    document = {
        "comment": "Generated by tools/pin_base_debs.sh; do not edit. See debian_base.bzl.",
        "suite": suite,
        "roots": list(ROOTS),
        "excluded": dict(sorted(EXCLUDED.items())),
        "packages": [
            {
                "name": d.name,
                "version": d.version,
                "architecture": d.architecture,
                "filename": d.filename,
                "size": d.size,
                "sha256": d.sha256,
            }
            for d in debs
        ],
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pin_base_debs", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=LOCK)
    parser.add_argument("--check", action="store_true", help="exit 1 if the lock would change")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    codename = subprocess.run(
        ["sh", "-c", ". /etc/os-release && echo $VERSION_CODENAME"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if codename != "bookworm":
        print(
            f"pin_base_debs: this machine is {codename!r}; run it on Debian bookworm",
            file=sys.stderr,
        )
        return 1
    text = render(resolve(ROOTS, EXCLUDED), codename)
    if args.check:
        same = args.output.exists() and args.output.read_text() == text
        print(f"pin_base_debs: {args.output} is {'up to date' if same else 'out of date'}")
        return 0 if same else 1
    args.output.write_text(text)
    packages = json.loads(text)["packages"]
    total = sum(p["size"] for p in packages)
    print(
        f"pin_base_debs: {len(packages)} packages ({total / 1e6:.1f} MB of .deb) -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
