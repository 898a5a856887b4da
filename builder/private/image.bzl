"""`engine_image`: the OCI image of a policy engine (rules_oci + rules_pkg).

Called by `policy_engine` (//builder/private:engine.bzl) with `name = "image"`, so every
generated engine package has `image`, `image_push` and `image_load` (CONVENTIONS.md).

Layout of the image (on the base pinned by digest in MODULE.bazel, `oci.pull(name = "python_base")`):

    /opt/policy-engine/<binary>             the py_binary launcher (the entrypoint)
    /opt/policy-engine/<binary>.runfiles/   its runfiles tree, exactly as `bazel run` sees it

in two layers, third-party first (it changes least): `<name>_layer_deps` (external
repositories: wheels, bazel_tools) and `<name>_layer_app` (the runtime, the policies, the
generated registry). Labels carry the build metadata (`<engine>_build_info.json`, which is
stamped under `--stamp`) and the policy list; unstamped builds are reproducible.

Next to the image: `<name>.Dockerfile` and `<name>_docker_context.tar` (Dockerfile + the
two layer tars), for people without Bazel: `docker build -t engine - < <name>_docker_context.tar`.
"""

load("@rules_oci//oci:defs.bzl", "oci_image", "oci_load", "oci_push")
load("@rules_pkg//pkg:providers.bzl", "PackageFilegroupInfo", "PackageFilesInfo")
load("@rules_pkg//pkg:tar.bzl", "pkg_tar")

# Keep in step with `oci.pull(name = "python_base")` in MODULE.bazel (the Dockerfile's FROM;
# //tests/image:image_test checks that the image carries it).
PYTHON_BASE_REF = "docker.io/library/python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91"

# Where the engine lives inside the image.
ENGINE_DIR = "opt/policy-engine"

def _runfiles_path(workspace_name, short_path):
    """`<repo>/<path>` inside a runfiles tree, from a File.short_path-like path."""
    if short_path.startswith("../"):
        return short_path[3:]
    return workspace_name + "/" + short_path

def _engine_files_impl(ctx):
    binary = ctx.attr.binary[DefaultInfo]
    executable = binary.files_to_run.executable
    root = "%s/%s" % (ctx.attr.directory, executable.basename)
    runfiles_root = root + ".runfiles/"
    want_external = ctx.attr.part == "deps"
    executables = {}
    files = {}

    if not want_external:
        executables[root] = executable
        mapping = binary.files_to_run.repo_mapping_manifest
        if mapping:
            files[runfiles_root + "_repo_mapping"] = mapping
    for f in binary.default_runfiles.files.to_list():
        if f.short_path.startswith("../") != want_external:
            continue
        dest = runfiles_root + _runfiles_path(ctx.workspace_name, f.short_path)
        if f == executable:
            executables[dest] = f
        else:
            files[dest] = f

    # Empty files Bazel creates in runfiles (e.g. __init__.py of legacy_create_init).
    empty = ctx.actions.declare_file(ctx.label.name + ".empty")
    ctx.actions.write(empty, "")
    for path in binary.default_runfiles.empty_filenames.to_list():
        if path.startswith("external/") != want_external:
            continue
        files[runfiles_root + _runfiles_path(ctx.workspace_name, path)] = empty

    # Starlark cannot tell which runfiles are executable (bazel_tools' py3wrapper.sh is,
    # and the launcher execs it), so every file gets 0755, as Bazel's outputs have r-x.
    file_entries = [
        (PackageFilesInfo(dest_src_map = files, attributes = {"mode": "0755"}), ctx.label),
        (PackageFilesInfo(dest_src_map = executables, attributes = {"mode": "0755"}), ctx.label),
    ]
    return [
        DefaultInfo(files = depset(files.values() + executables.values())),
        PackageFilegroupInfo(pkg_files = file_entries, pkg_dirs = [], pkg_symlinks = []),
    ]

_engine_files = rule(
    implementation = _engine_files_impl,
    doc = "One part (`deps` = external repositories, `app` = the rest) of a binary's runfiles tree, for pkg_tar.",
    attrs = {
        "binary": attr.label(mandatory = True, executable = True, cfg = "target"),
        "part": attr.string(mandatory = True, values = ["deps", "app"]),
        "directory": attr.string(mandatory = True),
    },
)

def _image_metadata_impl(ctx):
    labels = ctx.actions.declare_file(ctx.label.name + ".labels.txt")
    dockerfile = ctx.actions.declare_file(ctx.attr.image_name + ".Dockerfile")
    args = ctx.actions.args()
    args.add("--labels-out", labels)
    args.add("--dockerfile-out", dockerfile)
    args.add("--target", ctx.attr.image_target)
    args.add("--base-ref", ctx.attr.base_ref)
    args.add("--workdir", ctx.attr.workdir)
    args.add_all(ctx.attr.entrypoint, before_each = "--entrypoint")
    args.add_all(["%s=%s" % kv for kv in ctx.attr.env.items()], before_each = "--env")
    args.add_all(["%s=%s" % kv for kv in ctx.attr.labels.items()], before_each = "--label")
    args.add_all(ctx.attr.policies, before_each = "--policy")
    args.add_all([f.basename for f in ctx.files.layers], before_each = "--layer")
    inputs = []
    if ctx.file.build_info:
        args.add("--build-info", ctx.file.build_info)
        inputs.append(ctx.file.build_info)
    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = [args],
        inputs = inputs,
        outputs = [labels, dockerfile],
        mnemonic = "EngineImageMetadata",
        progress_message = "Image labels and Dockerfile of %{label}",
    )
    return [
        DefaultInfo(files = depset([labels, dockerfile])),
        OutputGroupInfo(labels = depset([labels]), dockerfile = depset([dockerfile])),
    ]

_image_metadata = rule(
    implementation = _image_metadata_impl,
    doc = "OCI labels (key=value file for oci_image) and the equivalent Dockerfile.",
    attrs = {
        "image_name": attr.string(mandatory = True),
        "image_target": attr.string(mandatory = True),
        "base_ref": attr.string(mandatory = True),
        "build_info": attr.label(allow_single_file = [".json"]),
        "policies": attr.string_list(),
        "labels": attr.string_dict(),
        "entrypoint": attr.string_list(mandatory = True),
        "env": attr.string_dict(),
        "workdir": attr.string(mandatory = True),
        "layers": attr.label_list(allow_files = [".tar"]),
        "_tool": attr.label(default = "//builder/private:image_metadata", executable = True, cfg = "exec"),
    },
)

def _target_name(label):
    """The py_binary's name (its launcher's file name) from a label string."""
    if ":" in label:
        return label.split(":")[-1]
    return label.split("/")[-1]

def engine_image(
        name,
        binary,
        build_info = None,
        policies = [],
        labels = {},
        base = "@python_base",
        base_ref = PYTHON_BASE_REF,
        repository = "",
        remote_tags = [],
        repo_tags = None,
        tags = [],
        visibility = None):
    """The OCI image of an engine binary, its push and load targets, and its Dockerfile.

    Targets:
      <name>:                    oci_image (an OCI layout directory); `<name>.digest` holds its digest.
      <name>_push:               `bazel run` pushes it (`-- --repository REG/REPO [--tag T]`).
      <name>_load:               `bazel run` loads it into docker/podman
                                 (`--output_groups=+tarball` builds the `docker load` tarball).
      <name>_layer_deps, <name>_layer_app: the layers (pkg_tar).
      <name>.Dockerfile, <name>_docker_context: the same image for `docker build` without Bazel.

    Args:
      name: "image" by convention.
      binary: the engine py_binary.
      build_info: the engine's `<engine>_build_info.json` (build time, revision, policies);
        without it the labels say "unstamped" and list `policies`.
      policies: "name@version" strings, used when there is no build_info.
      labels: extra OCI labels; they override the generated ones.
      base: the base oci_image (default: the digest-pinned `@python_base`).
      base_ref: `image@sha256:...` of `base`, for the labels and the Dockerfile's FROM.
      repository: default push repository (`--repository` overrides it).
      remote_tags: tags `<name>_push` applies after pushing.
      repo_tags: `repository:tag`s for `<name>_load` (default `policy-engine:latest`).
      tags: Bazel tags for every target.
      visibility: of `<name>`, `<name>_push`, `<name>_load`.
    """
    entry = "/%s/%s" % (ENGINE_DIR, _target_name(binary))
    env = {"PYTHONUNBUFFERED": "1"}
    for part in ["deps", "app"]:
        _engine_files(
            name = "%s_%s_files" % (name, part),
            binary = binary,
            part = part,
            directory = ENGINE_DIR,
            tags = tags,
            visibility = ["//visibility:private"],
        )
        pkg_tar(
            name = "%s_layer_%s" % (name, part),
            srcs = [":%s_%s_files" % (name, part)],
            tags = tags,
            visibility = ["//visibility:private"],
        )
    layers = [":%s_layer_deps" % name, ":%s_layer_app" % name]

    _image_metadata(
        name = name + "_metadata",
        image_name = name,
        image_target = "//%s:%s" % (native.package_name(), name),
        base_ref = base_ref,
        build_info = build_info,
        policies = policies,
        labels = labels,
        entrypoint = [entry],
        env = env,
        workdir = "/" + ENGINE_DIR,
        layers = layers,
        tags = tags,
        visibility = ["//visibility:private"],
    )
    native.filegroup(
        name = name + "_labels",
        srcs = [":%s_metadata" % name],
        output_group = "labels",
        tags = tags,
        visibility = ["//visibility:private"],
    )
    native.filegroup(
        name = name + "_dockerfile",
        srcs = [":%s_metadata" % name],
        output_group = "dockerfile",
        tags = tags,
        visibility = visibility,
    )
    pkg_tar(
        name = name + "_docker_context",
        srcs = layers,
        files = {":%s_dockerfile" % name: "Dockerfile"},
        tags = tags,
        visibility = visibility,
    )

    oci_image(
        name = name,
        base = base,
        tars = layers,
        entrypoint = [entry],
        env = env,
        workdir = "/" + ENGINE_DIR,
        labels = ":%s_labels" % name,
        annotations = ":%s_labels" % name,
        tags = tags,
        visibility = visibility,
    )
    oci_push(
        name = name + "_push",
        image = ":" + name,
        repository = repository,
        remote_tags = remote_tags,
        tags = tags,
        visibility = visibility,
    )
    oci_load(
        name = name + "_load",
        image = ":" + name,
        repo_tags = repo_tags or ["policy-engine:latest"],
        tags = tags,
        visibility = visibility,
    )
