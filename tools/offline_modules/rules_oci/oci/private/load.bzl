"""oci_load rule of the offline stand-in: a `docker load` tarball, and `bazel run` loads it."""

load(":util.bzl", "rlocation")

def _oci_load_impl(ctx):
    if ctx.attr.format != "docker":
        fail("the offline rules_oci stand-in only writes format = \"docker\" tarballs")
    image = ctx.file.image
    tarball = ctx.actions.declare_file(ctx.label.name + "/tarball.tar")
    image_id = ctx.actions.declare_file(ctx.label.name + "/image_id.txt")
    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = ["tarball", "--image", image.path, "--repo-tags", ctx.file.repo_tags.path, "--output", tarball.path],
        inputs = [image, ctx.file.repo_tags],
        outputs = [tarball],
        mnemonic = "OCITarball",
        progress_message = "OCI tarball %{label} (offline stand-in)",
    )
    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = ["image-id", "--image", image.path, "--output", image_id.path],
        inputs = [image],
        outputs = [image_id],
        mnemonic = "OCIImageId",
    )
    script = ctx.actions.declare_file(ctx.label.name + ".sh")
    runfiles = [tarball]
    loader = ""
    if ctx.attr.loader:
        loader = rlocation(ctx, ctx.executable.loader)
        runfiles.append(ctx.executable.loader)
    ctx.actions.expand_template(
        template = ctx.file._load_sh_tpl,
        output = script,
        substitutions = {"{{tarball}}": rlocation(ctx, tarball), "{{loader}}": loader},
        is_executable = True,
    )
    return [
        DefaultInfo(files = depset([image_id]), executable = script, runfiles = ctx.runfiles(files = runfiles)),
        OutputGroupInfo(tarball = depset([tarball])),
    ]

oci_load_rule = rule(
    implementation = _oci_load_impl,
    doc = "Load an oci_image into docker/podman with `bazel run`; `--output_groups=+tarball` builds the tarball.",
    executable = True,
    attrs = {
        "image": attr.label(mandatory = True, allow_single_file = True, doc = "An oci_image target."),
        "repo_tags": attr.label(mandatory = True, allow_single_file = [".txt"], doc = "File: one repository:tag per line."),
        "format": attr.string(default = "docker", values = ["docker", "oci"], doc = "Only `docker` is implemented."),
        "loader": attr.label(executable = True, cfg = "target", doc = "Container CLI to run `load` with (default: docker, podman)."),
        "_load_sh_tpl": attr.label(default = "//oci/private:load.sh.tpl", allow_single_file = True),
        "_tool": attr.label(default = "//oci/private:oci_layout", executable = True, cfg = "exec"),
    },
)
