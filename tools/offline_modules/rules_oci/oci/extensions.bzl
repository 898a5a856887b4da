"""Offline stand-in for `@rules_oci//oci:extensions.bzl`: the `oci` extension.

Tag classes and attributes are those of rules_oci 2.x (`pull`, `toolchains`), so one
MODULE.bazel serves both worlds. Offline, `oci.pull` checks the pin (a sha256 digest is
required unless `tag` with `reproducible = False`) and creates, instead of downloading:

* `<name>`: the image for the first platform (rules_oci: an alias selecting the platform),
* `<name>_<os>_<arch>[_<variant>]` for each entry of `platforms` (rules_oci's names),

each a locally built minimal base (see private/pull.bzl). `oci.toolchains` is accepted and
ignored: the stand-in needs no crane/regctl download (push uses crane from PATH).
"""

load("//oci/private:pull.bzl", "offline_pull")

_pull = tag_class(attrs = {
    "name": attr.string(doc = "Name of the generated repository"),
    "image": attr.string(doc = "the remote image without a tag, such as gcr.io/bazel-public/bazel"),
    "platforms": attr.string_list(doc = "platforms of a multi-architecture image, e.g. linux/amd64"),
    "digest": attr.string(doc = "the digest string, starting with \"sha256:\""),
    "tag": attr.string(doc = "a tag to choose an image from the registry (not reproducible)"),
    "reproducible": attr.bool(default = True, doc = "False silences the warning about `tag`"),
    "config": attr.label(doc = "Label to a .docker/config.json file (unused offline)"),
})

_toolchains = tag_class(attrs = {
    "name": attr.string(default = "oci"),
    "crane_version": attr.string(),
    "zot_version": attr.string(),
})

def _platform_parts(platform):
    parts = platform.split("/")
    if len(parts) < 2:
        fail("oci.pull: platform {!r} must be os/arch[/variant]".format(platform))
    return parts[0], parts[1], parts[2] if len(parts) > 2 else ""

def _oci_extension(module_ctx):
    direct = []
    for mod in module_ctx.modules:
        for pull in mod.tags.pull:
            if bool(pull.digest) == bool(pull.tag):
                fail("oci.pull(name = {!r}): exactly one of 'digest' and 'tag' must be set".format(pull.name))
            if pull.digest:
                hexdigest = pull.digest[len("sha256:"):]
                if not pull.digest.startswith("sha256:") or len(hexdigest) != 64 or hexdigest.lower() != hexdigest or not hexdigest.isalnum():
                    fail("oci.pull(name = {!r}): digest {!r} is not sha256:<64 hex>".format(pull.name, pull.digest))
                ref = "{}@{}".format(pull.image, pull.digest)
            else:
                if pull.reproducible:
                    # buildifier: disable=print
                    print("WARNING: oci.pull(name = {!r}) uses tag {!r}: not reproducible; pin a digest.".format(pull.name, pull.tag))
                ref = "{}:{}".format(pull.image, pull.tag)
            platforms = pull.platforms or ["linux/amd64"]
            for index, platform in enumerate(platforms):
                os, arch, variant = _platform_parts(platform)
                names = ["_".join([pull.name, os, arch] + ([variant] if variant else []))]
                if index == 0:
                    names.append(pull.name)
                for repo in names:
                    offline_pull(name = repo, target_name = repo, ref = ref, os = os, architecture = arch, variant = variant)
            if mod.is_root:
                direct.append(pull.name)
    return module_ctx.extension_metadata(root_module_direct_deps = direct, root_module_direct_dev_deps = [])

oci = module_extension(
    implementation = _oci_extension,
    tag_classes = {"pull": _pull, "toolchains": _toolchains},
)
