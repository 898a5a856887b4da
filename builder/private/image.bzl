"""`engine_image`: the OCI image of a policy engine (rules_oci + rules_pkg).

Called by `policy_engine` (//builder/private:engine.bzl) with `name = "image"`, so every
generated engine package has `image`, `image_push` and `image_load` (CONVENTIONS.md).

The base is `//builder/private:python_base`: Debian bookworm's Python 3.11 and CA
certificates, unpacked from the `.deb` files pinned in `base_debs.lock.json`
(builder/private/debian_base.bzl, base_rootfs.py), the same in the offline and the connected
world. Layout of the image:

    /usr/bin/python3.11, /usr/lib/...       the base layer (no shell, no package manager)
    /opt/policy-engine/<binary>             the py_binary launcher (what `bazel run` runs)
    /opt/policy-engine/<binary>.runfiles/   its runfiles tree, exactly as `bazel run` sees it
    /etc/policy-engine/config.yaml          where the configuration is mounted (CONFIG_PATH)
    /etc/policy-engine/tls/{tls.crt,tls.key,ca.crt}   the TLS secret the default command needs

Engine layers: two, third-party first (it changes least): `<name>_layer_deps` (external
repositories: wheels, bazel_tools) and `<name>_layer_app` (the runtime, the policies, the
generated registry). The entrypoint is `/usr/bin/python3.11 <runfiles>/<main>.py` with the
launcher's PYTHONPATH (image_metadata.py says why not the launcher itself); the default
command reads CONFIG_PATH and listens on 0.0.0.0:9002 with mTLS only (the files of a
Kubernetes TLS secret mounted at TLS_DIR: without them it exits 1 naming the missing file),
and serves the health service alone in plaintext on 127.0.0.1:9003 for the probe. User 65532 (`nonroot`); nothing is
written to the root file system (no bytecode caches), so `--read-only` works. Labels carry
the build metadata (`<engine>_build_info.json`, stamped under `--stamp`), the policy list
and the base's digest; unstamped builds are reproducible.

Next to the image: `<name>.Dockerfile` and `<name>_docker_context.tar` (Dockerfile + the
base and engine layer tars), for people without Bazel:
`docker build -t engine - < <name>_docker_context.tar`.
"""

load("@rules_oci//oci:defs.bzl", "oci_image", "oci_load", "oci_push")
load("@rules_pkg//pkg:providers.bzl", "PackageFilegroupInfo", "PackageFilesInfo")
load("@rules_pkg//pkg:tar.bzl", "pkg_tar")

# The base image and its layer (builder/private/BUILD.bazel).
BASE = "//builder/private:python_base"
BASE_LAYER = "//builder/private:python_base_layer"
BASE_LOCK = "//builder/private:base_debs.lock.json"
BASE_NAME = "policy-engine/python-base:3.11-bookworm"

# The base's environment (also written into the Dockerfile, which starts FROM scratch).
BASE_ENV = {
    "LANG": "C.UTF-8",
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
}

# Where the engine lives inside the image.
ENGINE_DIR = "opt/policy-engine"

# Non-root: `nonroot` of the base's /etc/passwd. Numeric, so Kubernetes' runAsNonRoot
# can verify it without reading /etc/passwd.
IMAGE_USER = "65532:65532"

# The configuration file the default command reads: mount it here (read-only is fine).
CONFIG_PATH = "/etc/policy-engine/config.yaml"

# Ports the image exposes. ext_proc + gRPC health share one listener. Prometheus metrics
# are off by default (they need a writable --metrics-dir, and the root is read-only):
# `--metrics-listen 0.0.0.0:9090 --metrics-dir DIR` on a tmpfs/emptyDir (README).
EXT_PROC_PORT = 9002
METRICS_PORT = 9090
IMAGE_PORTS = ["%d/tcp" % EXT_PROC_PORT, "%d/tcp" % METRICS_PORT]

# The TLS secret the default command reads (the file names of a Kubernetes TLS secret, as
# cert-manager writes it): the certificate and key the engine presents, and the CA that
# client certificates (Envoy's, Prometheus's) must chain to. Mount it read-only here.
TLS_DIR = "/etc/policy-engine/tls"

# Health alone, plaintext, on loopback: what the in-container probe reaches (it has no client
# certificate). Not exposed.
HEALTH_PORT = 9003

# Default arguments of the entrypoint (`podman run IMAGE --other --flags` replaces them).
# Nothing beyond 127.0.0.1 without mTLS (README, "Decisions": the engine refuses otherwise).
IMAGE_CMD = [
    "--config",
    CONFIG_PATH,
    "--listen",
    "0.0.0.0:%d" % EXT_PROC_PORT,
    "--tls-cert",
    TLS_DIR + "/tls.crt",
    "--tls-key",
    TLS_DIR + "/tls.key",
    "--tls-client-ca",
    TLS_DIR + "/ca.crt",
    "--health-listen",
    "127.0.0.1:%d" % HEALTH_PORT,
]

# The health probe (Dockerfile HEALTHCHECK; Kubernetes exec probe): gRPC Health/Check.
HEALTHCHECK = ["/usr/bin/python3.11", "-m", "engine.healthcheck", "--address", "127.0.0.1:%d" % HEALTH_PORT]

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

    # Bytecode of every .py (the image cannot write __pycache__): a tar pkg_tar merges in.
    listing = ctx.actions.declare_file(ctx.label.name + ".pyfiles.txt")
    pyc_tar = ctx.actions.declare_file(ctx.label.name + ".pyc.tar")
    sources = {dest: f for dest, f in (files.items() + executables.items()) if dest.endswith(".py")}
    ctx.actions.write(listing, "".join(["%s\t%s\n" % (dest, sources[dest].path) for dest in sorted(sources)]))
    ctx.actions.run(
        executable = ctx.executable._pyc_tool,
        arguments = ["--files", listing.path, "--output", pyc_tar.path],
        inputs = [listing] + sources.values(),
        outputs = [pyc_tar],
        # --action_env's PATH: the Python 3.11 the wheels are for (pyc.py checks it).
        use_default_shell_env = True,
        mnemonic = "EnginePyc",
        progress_message = "Bytecode of %{label}",
    )

    # Starlark cannot tell which runfiles are executable (bazel_tools' py3wrapper.sh is,
    # and the launcher execs it), so every file gets 0755, as Bazel's outputs have r-x.
    file_entries = [
        (PackageFilesInfo(dest_src_map = files, attributes = {"mode": "0755"}), ctx.label),
        (PackageFilesInfo(dest_src_map = executables, attributes = {"mode": "0755"}), ctx.label),
    ]
    return [
        DefaultInfo(files = depset(files.values() + executables.values())),
        PackageFilegroupInfo(pkg_files = file_entries, pkg_dirs = [], pkg_symlinks = []),
        OutputGroupInfo(pyc = depset([pyc_tar])),
    ]

_engine_files = rule(
    implementation = _engine_files_impl,
    doc = "One part (`deps` = external repositories, `app` = the rest) of a binary's runfiles tree, for pkg_tar.",
    attrs = {
        "binary": attr.label(mandatory = True, executable = True, cfg = "target"),
        "part": attr.string(mandatory = True, values = ["deps", "app"]),
        "directory": attr.string(mandatory = True),
        "_pyc_tool": attr.label(default = "//builder/private:runfiles_pyc", executable = True, cfg = "exec"),
    },
)

def _image_metadata_impl(ctx):
    labels = ctx.actions.declare_file(ctx.label.name + ".labels.txt")
    entrypoint = ctx.actions.declare_file(ctx.label.name + ".entrypoint.txt")
    env = ctx.actions.declare_file(ctx.label.name + ".env.txt")
    dockerfile = ctx.actions.declare_file(ctx.attr.image_name + ".Dockerfile")
    launcher = ctx.attr.binary[DefaultInfo].files_to_run.executable
    args = ctx.actions.args()
    args.add("--labels-out", labels)
    args.add("--entrypoint-out", entrypoint)
    args.add("--env-out", env)
    args.add("--dockerfile-out", dockerfile)
    args.add("--target", ctx.attr.image_target)
    args.add("--launcher", launcher)
    args.add("--runfiles-dir", "/%s/%s.runfiles" % (ctx.attr.directory, launcher.basename))
    args.add("--base-name", ctx.attr.base_name)
    args.add("--base-layout", ctx.file.base.path)
    args.add("--workdir", "/" + ctx.attr.directory)
    args.add("--user", ctx.attr.user)
    args.add_all(ctx.attr.cmd, format_each = "--cmd=%s")
    args.add_all(ctx.attr.ports, before_each = "--port")
    args.add_all(ctx.attr.healthcheck, format_each = "--healthcheck=%s")
    args.add_all(["%s=%s" % kv for kv in ctx.attr.base_env.items()], before_each = "--env")
    args.add_all(["%s=%s" % kv for kv in ctx.attr.labels.items()], before_each = "--label")
    args.add_all(ctx.attr.policies, before_each = "--policy")
    args.add_all([f.basename for f in ctx.files.layers], before_each = "--layer")
    inputs = [launcher, ctx.file.base]
    if ctx.file.base_lock:
        args.add("--base-lock", ctx.file.base_lock)
        inputs.append(ctx.file.base_lock)
    if ctx.file.build_info:
        args.add("--build-info", ctx.file.build_info)
        inputs.append(ctx.file.build_info)
    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = [args],
        inputs = inputs,
        outputs = [labels, entrypoint, env, dockerfile],
        mnemonic = "EngineImageMetadata",
        progress_message = "Image labels, entrypoint and Dockerfile of %{label}",
    )
    return [
        DefaultInfo(files = depset([labels, entrypoint, env, dockerfile])),
        OutputGroupInfo(
            labels = depset([labels]),
            entrypoint = depset([entrypoint]),
            env = depset([env]),
            dockerfile = depset([dockerfile]),
        ),
    ]

_image_metadata = rule(
    implementation = _image_metadata_impl,
    doc = "OCI labels, entrypoint and environment (files for oci_image) and the equivalent Dockerfile.",
    attrs = {
        "image_name": attr.string(mandatory = True),
        "image_target": attr.string(mandatory = True),
        "binary": attr.label(mandatory = True, executable = True, cfg = "target"),
        "directory": attr.string(mandatory = True),
        "base": attr.label(mandatory = True, allow_single_file = True),
        "base_name": attr.string(mandatory = True),
        "base_lock": attr.label(allow_single_file = [".json"]),
        "base_env": attr.string_dict(),
        "build_info": attr.label(allow_single_file = [".json"]),
        "policies": attr.string_list(),
        "labels": attr.string_dict(),
        "cmd": attr.string_list(),
        "user": attr.string(),
        "ports": attr.string_list(),
        "healthcheck": attr.string_list(),
        "layers": attr.label_list(allow_files = [".tar"], doc = "Every layer tar, the base's first (Dockerfile)."),
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
      <name>_layer_deps, <name>_layer_app: the engine layers (pkg_tar).
      <name>.Dockerfile, <name>_docker_context: the same image for `docker build` without Bazel.

    Args:
      name: "image" by convention.
      binary: the engine py_binary.
      build_info: the engine's `<engine>_build_info.json` (build time, revision, policies);
        without it the labels say "unstamped" and list `policies`.
      policies: "name@version" strings, used when there is no build_info.
      labels: extra OCI labels; they override the generated ones.
      repository: default push repository (`--repository` overrides it).
      remote_tags: tags `<name>_push` applies after pushing.
      repo_tags: `repository:tag`s for `<name>_load` (default `policy-engine:latest`).
      tags: Bazel tags for every target.
      visibility: of `<name>`, `<name>_push`, `<name>_load`.
    """
    for part in ["deps", "app"]:
        _engine_files(
            name = "%s_%s_files" % (name, part),
            binary = binary,
            part = part,
            directory = ENGINE_DIR,
            tags = tags,
            visibility = ["//visibility:private"],
        )
        native.filegroup(
            name = "%s_%s_pyc" % (name, part),
            srcs = [":%s_%s_files" % (name, part)],
            output_group = "pyc",
            tags = tags,
            visibility = ["//visibility:private"],
        )
        pkg_tar(
            name = "%s_layer_%s" % (name, part),
            srcs = [":%s_%s_files" % (name, part)],
            deps = [":%s_%s_pyc" % (name, part)],
            tags = tags,
            visibility = ["//visibility:private"],
        )
    layers = [":%s_layer_deps" % name, ":%s_layer_app" % name]

    _image_metadata(
        name = name + "_metadata",
        image_name = name,
        image_target = "//%s:%s" % (native.package_name(), name),
        binary = binary,
        directory = ENGINE_DIR,
        base = BASE,
        base_name = BASE_NAME,
        base_lock = BASE_LOCK,
        base_env = BASE_ENV,
        build_info = build_info,
        policies = policies,
        labels = labels,
        cmd = IMAGE_CMD,
        user = IMAGE_USER,
        ports = IMAGE_PORTS,
        healthcheck = HEALTHCHECK,
        layers = [BASE_LAYER] + layers,
        tags = tags,
        visibility = ["//visibility:private"],
    )
    for group in ["labels", "entrypoint", "env"]:
        native.filegroup(
            name = "%s_%s" % (name, group),
            srcs = [":%s_metadata" % name],
            output_group = group,
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
        srcs = [BASE_LAYER] + layers,
        files = {":%s_dockerfile" % name: "Dockerfile"},
        tags = tags,
        visibility = visibility,
    )

    oci_image(
        name = name,
        base = BASE,
        tars = layers,
        entrypoint = ":%s_entrypoint" % name,
        cmd = IMAGE_CMD,
        env = ":%s_env" % name,
        user = IMAGE_USER,
        exposed_ports = IMAGE_PORTS,
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
