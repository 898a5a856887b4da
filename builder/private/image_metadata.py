"""An engine image's metadata: labels, entrypoint, environment and the equivalent Dockerfile.

Build action of ``engine_image`` (builder/private/image.bzl). Writes:

* ``--labels-out``: ``key=value`` lines, the file ``oci_image(labels = ...)`` takes;
* ``--entrypoint-out`` (one element per line) and ``--env-out`` (``key=value`` lines): how
  the image starts the engine (:func:`python_entry`);
* ``--dockerfile-out``: a Dockerfile that builds the same image without Bazel from a
  context holding the layer tars (``<name>_docker_context.tar``).

The entrypoint runs the image's own ``/usr/bin/python3.11`` on the binary's main file, with
the ``PYTHONPATH`` Bazel's launcher would compute. The launcher itself is not used: it
re-executes ``python3`` found on ``PATH`` through a ``/bin/sh`` wrapper (bazel_tools'
``py3wrapper.sh``), and the base has neither a shell nor a ``python3`` name. Main file and
import paths are read from the launcher (Bazel's ``python_stub_template``), so the image runs
exactly what ``bazel run`` runs.

Labels come from the engine's build metadata (``<engine>_build_info.json``, written by
``gen_registry``; stamped under ``--stamp``), else from ``--policy`` flags; ``--label``
values override them. The output depends only on the arguments and that file, so
unstamped builds are reproducible.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["PYTHON", "PythonEntry", "image_labels", "main", "python_entry", "render_dockerfile"]

EPOCH = "1970-01-01T00:00:00Z"
PYTHON = "/usr/bin/python3.11"
"""The base's interpreter (builder/private/base_debs.lock.json pins python3.11-minimal)."""
_STUB_MAIN = re.compile(r"^\s*main_rel_path = '([^']+)'$", re.MULTILINE)
_STUB_IMPORTS = re.compile(r"^\s*python_imports = '([^']*)'$", re.MULTILINE)
POLICIES_LABEL = "io.policy-engine.policies"
_POLICY_KEY_PREFIX = "policy "


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise SystemExit(f"image_metadata: {flag} {value!r}: expected KEY=VALUE")
        result[key] = rest
    return result


class PythonEntry:
    """How the image starts a py_binary: ``entrypoint`` and the environment it needs."""

    def __init__(self, entrypoint: list[str], env: dict[str, str]) -> None:
        self.entrypoint = entrypoint
        self.env = env


def python_entry(launcher_text: str, runfiles_dir: str) -> PythonEntry:
    """Entrypoint + environment equivalent to Bazel's launcher at ``runfiles_dir``.

    ``launcher_text`` is the py_binary's launcher (Bazel's python stub); its
    ``main_rel_path`` and ``python_imports`` give the main file and the import roots. As the
    launcher does: ``sys.path`` is the runfiles root, the main repository, then each import
    root; ``PYTHONSAFEPATH`` keeps the main file's folder off it; ``RUNFILES_DIR`` is set.
    ``PYTHONDONTWRITEBYTECODE`` because the image runs with a read-only root file system.
    """
    main_match = _STUB_MAIN.search(launcher_text)
    imports_match = _STUB_IMPORTS.search(launcher_text)
    if main_match is None or imports_match is None:
        raise SystemExit(
            "image_metadata: the launcher has no main_rel_path/python_imports line: "
            "not Bazel's python stub (a Bazel or rules_python change?)"
        )
    main_rel = main_match.group(1)
    paths = [runfiles_dir, f"{runfiles_dir}/{main_rel.split('/')[0]}"]
    paths += [f"{runfiles_dir}/{p}" for p in imports_match.group(1).split(":") if p]
    env = {
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": ":".join(dict.fromkeys(paths)),
        "PYTHONSAFEPATH": "1",
        "PYTHONUNBUFFERED": "1",
        "RUNFILES_DIR": runfiles_dir,
    }
    return PythonEntry([PYTHON, f"{runfiles_dir}/{main_rel}"], env)


def image_labels(
    *,
    target: str,
    base_ref: str,
    build_info: Mapping[str, str] | None,
    policies: Sequence[str],
    extra: Mapping[str, str],
) -> dict[str, str]:
    """OCI labels (org.opencontainers.image.* and io.policy-engine.*), sorted by key.

    ``policies`` ("name@version") is used only without ``build_info``, whose
    ``policy <name> <version>`` entries are authoritative.
    """
    base_name, _, base_digest = base_ref.partition("@")
    labels = {
        "org.opencontainers.image.title": "policy-engine",
        "org.opencontainers.image.description": "Envoy Policy Engine (ext_proc service)",
        "org.opencontainers.image.base.name": base_name,
        "org.opencontainers.image.base.digest": base_digest,
        "org.opencontainers.image.created": EPOCH,
        "org.opencontainers.image.revision": "unstamped",
        "io.policy-engine.target": target,
        POLICIES_LABEL: ",".join(policies),
    }
    if build_info is not None:
        listed = []
        for key, value in build_info.items():
            if key.startswith(_POLICY_KEY_PREFIX):
                name, _, version = key[len(_POLICY_KEY_PREFIX) :].partition(" ")
                listed.append(f"{name}@{version}")
                labels[f"io.policy-engine.policy.{name}.{version}.sha256"] = value
        labels[POLICIES_LABEL] = ",".join(listed)
        labels["org.opencontainers.image.created"] = build_info.get("build_time", EPOCH)
        labels["org.opencontainers.image.revision"] = build_info.get("source_revision", "unknown")
        labels["io.policy-engine.target"] = build_info.get("target", target)
        for key in ("builder_version", "manifest_sha256", "stamped"):
            if key in build_info:
                labels["io.policy-engine." + key.replace("_", "-")] = build_info[key]
    labels.update(extra)
    for key, value in labels.items():
        if "\n" in key or "\n" in value or "=" in key:
            raise SystemExit(f"image_metadata: label {key!r} cannot be written as key=value")
    return dict(sorted(labels.items()))


def render_dockerfile(
    *,
    target: str,
    layers: Sequence[str],
    workdir: str,
    env: Mapping[str, str],
    labels: Mapping[str, str],
    entrypoint: Sequence[str],
    cmd: Sequence[str] = (),
    user: str = "",
    ports: Sequence[str] = (),
    healthcheck: Sequence[str] = (),
) -> str:
    """The Dockerfile equivalent of the Bazel-built image (same layers and config).

    ``layers`` are the tar files in order, the base first: ``FROM scratch`` plus one
    ``ADD`` per tar gives the same file system as the Bazel image (``ADD`` unpacks a local
    tar; only the layer digests differ, as Docker writes its own tars).
    """
    lines = [
        f"# Generated by {target} (builder/private/image.bzl); do not edit.",
        "# The same image as the Bazel target, for machines without Bazel. Context: the",
        "# Dockerfile plus the layer tars (the target's _docker_context.tar), e.g.",
        "#   docker build -t policy-engine - < image_docker_context.tar",
        "FROM scratch",
    ]
    lines += [f"ADD {layer} /" for layer in layers]
    lines.append(f"WORKDIR {workdir}")
    lines += [f"ENV {key}={json.dumps(value)}" for key, value in sorted(env.items())]
    if labels:
        label_lines = [f"{json.dumps(k)}={json.dumps(v)}" for k, v in labels.items()]
        lines.append("LABEL " + " \\\n      ".join(label_lines))
    lines += [f"EXPOSE {port}" for port in ports]
    if user:
        lines.append(f"USER {user}")
    if healthcheck:
        lines.append(f"HEALTHCHECK --interval=10s --timeout=5s CMD {json.dumps(list(healthcheck))}")
    lines.append(f"ENTRYPOINT {json.dumps(list(entrypoint))}")
    if cmd:
        lines.append(f"CMD {json.dumps(list(cmd))}")
    return "\n".join(lines) + "\n"


def base_digest(layout: Path) -> str:
    """The manifest digest of an OCI layout's (single) image."""
    index = json.loads((layout / "index.json").read_text())
    digest: str = index["manifests"][0]["digest"]
    return digest


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="image_metadata", description=__doc__.splitlines()[0])
    parser.add_argument("--labels-out", type=Path, required=True)
    parser.add_argument("--dockerfile-out", type=Path, required=True)
    parser.add_argument("--entrypoint-out", type=Path, required=True)
    parser.add_argument("--env-out", type=Path, required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--launcher", type=Path, required=True, help="the py_binary's launcher")
    parser.add_argument("--runfiles-dir", required=True, help="its runfiles tree in the image")
    parser.add_argument("--base-name", required=True, help="the base's name (label)")
    parser.add_argument("--base-layout", type=Path, required=True, help="the base's OCI layout")
    parser.add_argument("--base-lock", type=Path, help="the Debian pins the base is built from")
    parser.add_argument("--build-info", type=Path, help="<engine>_build_info.json")
    parser.add_argument("--policy", action="append", default=[], help="name@version")
    parser.add_argument("--label", action="append", default=[], help="KEY=VALUE (overrides)")
    parser.add_argument("--layer", action="append", default=[], help="layer tar, base first")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE (base image's)")
    parser.add_argument("--cmd", action="append", default=[])
    parser.add_argument("--user", default="")
    parser.add_argument("--port", action="append", default=[], help="e.g. 9002/tcp")
    parser.add_argument("--healthcheck", action="append", default=[], help="argv element")
    parser.add_argument("--workdir", required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    build_info = None
    if args.build_info is not None:
        build_info = json.loads(args.build_info.read_text("utf-8"))
    extra = {}
    if args.base_lock is not None:
        extra["io.policy-engine.base.debs-sha256"] = hashlib.sha256(
            args.base_lock.read_bytes()
        ).hexdigest()
    extra.update(_pairs(args.label, "--label"))
    labels = image_labels(
        target=args.target,
        base_ref=f"{args.base_name}@{base_digest(args.base_layout)}",
        build_info=build_info,
        policies=args.policy,
        extra=extra,
    )
    entry = python_entry(args.launcher.read_text("utf-8"), args.runfiles_dir)
    args.labels_out.write_text("".join(f"{k}={v}\n" for k, v in labels.items()), "utf-8")
    args.entrypoint_out.write_text("".join(f"{e}\n" for e in entry.entrypoint), "utf-8")
    args.env_out.write_text("".join(f"{k}={v}\n" for k, v in entry.env.items()), "utf-8")
    dockerfile = render_dockerfile(
        target=args.target,
        layers=args.layer,
        workdir=args.workdir,
        env={**_pairs(args.env, "--env"), **entry.env},
        labels=labels,
        entrypoint=entry.entrypoint,
        cmd=args.cmd,
        user=args.user,
        ports=args.port,
        healthcheck=args.healthcheck,
    )
    args.dockerfile_out.write_text(dockerfile, "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
