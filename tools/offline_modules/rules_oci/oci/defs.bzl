"""Offline stand-in for `@rules_oci//oci:defs.bzl` (rules_oci 2.2.6): oci_image, oci_push, oci_load.

Only the attributes this project uses exist, with rules_oci's names and meaning:

* `oci_image(name, base, tars, entrypoint, cmd, env, workdir, user, exposed_ports, labels,
  annotations, os, architecture, variant)`: `labels`, `annotations` and `env` take a dict or a file of
  `key=value` lines; `entrypoint` and `cmd` a list or a file with one entry per line.
  Also creates `<name>.digest` (a file with the manifest digest), as rules_oci does.
* `oci_push(name, image, repository, repository_file, remote_tags)`: `remote_tags` takes a
  list or a file; `bazel run` accepts `--repository`, `--tag` and crane flags.
* `oci_load(name, image, repo_tags, format, loader)`: `repo_tags` takes a list or a file.

See ../README.md for what differs from the real rules.
"""

load("@bazel_skylib//lib:types.bzl", "types")
load("@bazel_skylib//rules:write_file.bzl", "write_file")
load("//oci/private:image.bzl", _oci_image_rule = "oci_image_rule")
load("//oci/private:load.bzl", _oci_load_rule = "oci_load_rule")
load("//oci/private:push.bzl", _oci_push_rule = "oci_push_rule")

oci_image_rule = _oci_image_rule
oci_push_rule = _oci_push_rule
oci_load_rule = _oci_load_rule

_COMMON = ["tags", "visibility", "testonly", "target_compatible_with"]

def _common(kwargs):
    return {k: kwargs[k] for k in _COMMON if k in kwargs and k != "visibility"}

def _write(name, kind, lines, kwargs):
    label = "_{}_write_{}".format(name, kind)
    write_file(
        name = label,
        out = "_{}.{}.txt".format(name, kind),
        content = lines,
        **_common(kwargs)
    )
    return label

def oci_image(name, labels = None, annotations = None, env = None, cmd = None, entrypoint = None, workdir = None, exposed_ports = None, **kwargs):
    """rules_oci's `oci_image` macro: dict/list values become files, then `oci_image_rule`.

    Args:
      name: target name; its output is an OCI layout directory.
      labels: dict or file of `key=value` lines (config labels).
      annotations: dict or file of `key=value` lines (manifest annotations).
      env: dict or file of `key=value` lines; `$KEY` expands from the base.
      cmd: list or file (one entry per line).
      entrypoint: list or file (one entry per line).
      workdir: working directory (string).
      exposed_ports: list (e.g. ["9002/tcp"]) or file of comma-separated ports.
      **kwargs: base, tars, user, os, architecture, variant and common attributes.
    """
    if types.is_dict(labels):
        labels = _write(name, "labels", ["{}={}".format(k, v) for k, v in labels.items()], kwargs)
    if types.is_dict(annotations):
        annotations = _write(name, "annotations", ["{}={}".format(k, v) for k, v in annotations.items()], kwargs)
    if types.is_dict(env):
        env = _write(name, "env", ["{}={}".format(k, v) for k, v in env.items()], kwargs)
    if types.is_list(cmd):
        cmd = _write(name, "cmd", [e.replace("\n", "%5Cn") for e in cmd], kwargs)
    if types.is_list(entrypoint):
        entrypoint = _write(name, "entrypoint", [e.replace("\n", "%5Cn") for e in entrypoint], kwargs)
    if workdir != None:
        workdir = _write(name, "workdir", [workdir], kwargs)
    if types.is_list(exposed_ports):
        exposed_ports = _write(name, "exposed_ports", [",".join(exposed_ports)], kwargs)
    oci_image_rule(
        name = name,
        labels = labels,
        annotations = annotations,
        env = env,
        cmd = cmd,
        entrypoint = entrypoint,
        workdir = workdir,
        exposed_ports = exposed_ports,
        **kwargs
    )
    native.filegroup(
        name = name + ".digest",
        srcs = [name],
        output_group = "digest",
        visibility = kwargs.get("visibility"),
        **_common(kwargs)
    )

def oci_push(name, remote_tags = None, **kwargs):
    """rules_oci's `oci_push` macro: `remote_tags` may be a list.

    Args:
      name: target name (`bazel run` it).
      remote_tags: list of tags, or a file with one per line.
      **kwargs: image, repository, repository_file and common attributes.
    """
    if types.is_list(remote_tags):
        remote_tags = _write(name, "tags", remote_tags, kwargs)
    oci_push_rule(name = name, remote_tags = remote_tags, **kwargs)

def oci_load(name, repo_tags = None, **kwargs):
    """rules_oci's `oci_load` macro: `repo_tags` may be a list.

    Args:
      name: target name (`bazel run` it, or build `--output_groups=+tarball`).
      repo_tags: list of `repository:tag`, or a file with one per line.
      **kwargs: image, format, loader and common attributes.
    """
    if types.is_list(repo_tags):
        repo_tags = _write(name, "tags", repo_tags, kwargs)
    oci_load_rule(name = name, repo_tags = repo_tags, **kwargs)
