"""oci_image rule of the offline stand-in: a hermetic action writes an OCI layout directory."""

_DOC = """Build an OCI image layout directory from an optional base layout and layer tars.

Same attribute names and meaning as rules_oci 2.x `oci_image_rule`, for the subset this
project uses. The files for `entrypoint`, `cmd` (one entry per line), `env`, `labels` and
`annotations` (`key=value` per line) are the ones the `oci_image` macro writes.
"""

def _oci_image_impl(ctx):
    if not ctx.attr.base and (not ctx.attr.os or not ctx.attr.architecture):
        fail("'os' and 'architecture' are mandatory when 'base' is unspecified.")
    if ctx.attr.base and (ctx.attr.os or ctx.attr.architecture or ctx.attr.variant):
        fail("'os', 'architecture' and 'variant' come from the image provided by 'base' and cannot be overridden.")

    output = ctx.actions.declare_directory(ctx.label.name)
    digest = ctx.actions.declare_file(ctx.label.name + ".json.sha256")
    args = ctx.actions.args()
    args.add("image")
    args.add("--output", output.path)
    args.add("--digest-out", digest)
    inputs = list(ctx.files.tars)
    if ctx.attr.base:
        args.add("--base", ctx.file.base.path)
        inputs.append(ctx.file.base)
    else:
        args.add("--os", ctx.attr.os)
        args.add("--architecture", ctx.attr.architecture)
        if ctx.attr.variant:
            args.add("--variant", ctx.attr.variant)
    for tar in ctx.files.tars:
        args.add("--layer", tar)
    for flag, attr in [
        ("--entrypoint", "entrypoint"),
        ("--cmd", "cmd"),
        ("--env", "env"),
        ("--labels", "labels"),
        ("--annotations", "annotations"),
        ("--workdir", "workdir"),
        ("--exposed-ports", "exposed_ports"),
    ]:
        f = getattr(ctx.file, attr)
        if f:
            args.add(flag, f)
            inputs.append(f)
    if ctx.attr.user:
        args.add("--user", ctx.attr.user)

    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = [args],
        inputs = inputs,
        outputs = [output, digest],
        mnemonic = "OCIImage",
        progress_message = "OCI Image %{label} (offline stand-in)",
    )
    return [
        DefaultInfo(files = depset([output]), runfiles = ctx.runfiles(files = [output])),
        OutputGroupInfo(digest = depset([digest])),
    ]

oci_image_rule = rule(
    implementation = _oci_image_impl,
    doc = _DOC,
    attrs = {
        "base": attr.label(allow_single_file = True, doc = "An oci_image (OCI layout directory) to build on."),
        "tars": attr.label_list(allow_files = [".tar", ".tar.gz", ".tgz"], doc = "Layers, in order (not sorted)."),
        "entrypoint": attr.label(allow_single_file = True, doc = "File: one entrypoint element per line."),
        "cmd": attr.label(allow_single_file = True, doc = "File: one cmd element per line."),
        "env": attr.label(allow_single_file = True, doc = "File: key=value per line; $KEY refers to the base."),
        "labels": attr.label(allow_single_file = True, doc = "File: key=value per line."),
        "annotations": attr.label(allow_single_file = True, doc = "File: key=value per line (manifest annotations)."),
        "workdir": attr.label(allow_single_file = True, doc = "File: the working directory on one line."),
        "exposed_ports": attr.label(allow_single_file = True, doc = "File: comma-separated ports, e.g. 9002/tcp."),
        "user": attr.string(doc = "User (name or uid[:gid]) the entrypoint runs as."),
        "os": attr.string(doc = "Only without base: e.g. linux."),
        "architecture": attr.string(doc = "Only without base: e.g. amd64."),
        "variant": attr.string(doc = "Only without base: e.g. v8."),
        "_tool": attr.label(default = "//oci/private:oci_layout", executable = True, cfg = "exec"),
    },
)
