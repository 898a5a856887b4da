"""oci_push rule of the offline stand-in: `bazel run` pushes with crane (from PATH)."""

load(":util.bzl", "rlocation")

def _oci_push_impl(ctx):
    if ctx.attr.repository and ctx.attr.repository_file:
        fail("'repository' and 'repository_file' are mutually exclusive")
    digest = ctx.attr.image[OutputGroupInfo].digest.to_list()[0]
    image = ctx.file.image
    script = ctx.actions.declare_file(ctx.label.name + ".sh")
    files = [image, digest]
    substitutions = {
        "{{image}}": rlocation(ctx, image),
        "{{digest}}": rlocation(ctx, digest),
        "{{repository}}": ctx.attr.repository,
        "{{repository_file}}": "",
        "{{tags}}": "",
    }
    if ctx.file.repository_file:
        substitutions["{{repository_file}}"] = rlocation(ctx, ctx.file.repository_file)
        files.append(ctx.file.repository_file)
    if ctx.file.remote_tags:
        substitutions["{{tags}}"] = rlocation(ctx, ctx.file.remote_tags)
        files.append(ctx.file.remote_tags)
    ctx.actions.expand_template(
        template = ctx.file._push_sh_tpl,
        output = script,
        substitutions = substitutions,
        is_executable = True,
    )
    return [DefaultInfo(executable = script, runfiles = ctx.runfiles(files = files))]

oci_push_rule = rule(
    implementation = _oci_push_impl,
    doc = "Push an oci_image to a registry with `bazel run` (crane push, then crane tag).",
    executable = True,
    attrs = {
        "image": attr.label(mandatory = True, allow_single_file = True, doc = "An oci_image target."),
        "repository": attr.string(doc = "Repository URL, e.g. `registry.example.com/team/app`; `--repository` overrides it."),
        "repository_file": attr.label(allow_single_file = True, doc = "File holding the repository URL."),
        "remote_tags": attr.label(allow_single_file = True, doc = "File: one tag per line, applied after the push."),
        "_push_sh_tpl": attr.label(default = "//oci/private:push.sh.tpl", allow_single_file = True),
    },
)
