"""Implementation of `policy_engine` (public doc: //builder:defs.bzl)."""

load("@rules_python//python:defs.bzl", "py_binary", "py_library", "py_test")
load(":generated.bzl", "generated_tags")
load(":image.bzl", "engine_image")
load(":version.bzl", "BUILDER_VERSION")

def _policy_registry_impl(ctx):
    name = ctx.attr.engine_name
    registry = ctx.outputs.registry_out
    main = ctx.outputs.main_out
    test = ctx.outputs.test_out
    info = ctx.outputs.info_out
    definitions = ctx.outputs.definitions_out
    config_schema = ctx.outputs.config_schema_out

    policies = []
    inputs = [ctx.file.manifest]
    for lib, files in zip(ctx.attr.policies, ctx.attr.policy_files):
        folder = lib.label.package
        if lib.label.workspace_name:
            fail("%s: policies must be in the main repository (copy it; see builder/README.md)" % lib.label)
        listed = files[DefaultInfo].files.to_list()
        inputs.extend(listed)
        policies.append(struct(
            label = str(lib.label),
            folder = folder,
            files = [
                struct(path = f.path, short = f.short_path)
                for f in sorted(listed, key = lambda f: f.short_path)
                if f.short_path.startswith(folder + "/")
            ],
        ))
    params = ctx.actions.declare_file(name + "_registry_params.json")
    ctx.actions.write(params, json.encode(policies))
    inputs.append(params)

    args = ctx.actions.args()
    args.add("--params", params)
    args.add("--target", "//%s:%s" % (ctx.label.package, name))
    args.add("--package", ctx.label.package)
    args.add("--name", name)
    args.add("--builder-version", BUILDER_VERSION)
    args.add("--manifest", ctx.file.manifest)
    args.add("--registry-out", registry)
    args.add("--main-out", main)
    args.add("--test-out", test)
    args.add("--info-out", info)
    args.add("--definitions-out", definitions)
    args.add("--config-schema-out", config_schema)
    if ctx.attr.stamp:
        args.add("--stable-status", ctx.info_file)
        args.add("--volatile-status", ctx.version_file)
        inputs.extend([ctx.info_file, ctx.version_file])

    ctx.actions.run(
        executable = ctx.executable._generator,
        arguments = [args],
        inputs = inputs,
        outputs = [registry, main, test, info, definitions, config_schema],
        mnemonic = "PolicyRegistry",
        progress_message = "Generating the policy registry of %{label}",
        # Lets --action_env=SOURCE_DATE_EPOCH reach an unstamped build.
        use_default_shell_env = True,
    )
    return [DefaultInfo(files = depset([registry, main, test, info, definitions, config_schema]))]

policy_registry = rule(
    implementation = _policy_registry_impl,
    doc = "Generates an engine's registry module, main, validation test and build metadata.",
    attrs = {
        "engine_name": attr.string(mandatory = True),
        "policies": attr.label_list(mandatory = True, doc = "policy_library targets"),
        "policy_files": attr.label_list(
            mandatory = True,
            allow_files = True,
            doc = "the `<lib>_files` filegroup of each policy, same order",
        ),
        "manifest": attr.label(mandatory = True, allow_single_file = True),
        "stamp": attr.bool(default = False),
        # Predeclared, so the macro's py_* targets can name each file.
        "registry_out": attr.output(mandatory = True),
        "main_out": attr.output(mandatory = True),
        "test_out": attr.output(mandatory = True),
        "info_out": attr.output(mandatory = True),
        "definitions_out": attr.output(mandatory = True),
        "config_schema_out": attr.output(mandatory = True),
        "_generator": attr.label(
            default = "//builder/private:gen_registry",
            executable = True,
            cfg = "exec",
        ),
    },
)

def _files_label(policy):
    """`//p:policy` -> `//p:policy_files` (the filegroup policy_library creates)."""
    if ":" not in policy:
        policy = policy + ":" + policy.rsplit("/", 1)[-1]
    return policy + "_files"

def policy_engine(name, policies, manifest, tags = [], visibility = None):
    """See //builder:defs.bzl."""
    tags = tags + generated_tags()
    policy_registry(
        name = name + "_registry_gen",
        engine_name = name,
        policies = policies,
        policy_files = [_files_label(p) for p in policies],
        manifest = manifest,
        registry_out = name + "_registry.py",
        main_out = name + "_main.py",
        test_out = "validation_test.py",
        info_out = name + "_build_info.json",
        definitions_out = name + "_definitions.json",
        # JSON Schema of this engine's route configuration, for editors.
        config_schema_out = name + "_config.schema.json",
        stamp = select({
            "//builder/private:stamp": True,
            "//conditions:default": False,
        }),
        tags = tags,
        visibility = ["//visibility:private"],
    )

    py_library(
        name = name + "_registry",
        srcs = [name + "_registry.py"],
        data = [
            name + "_build_info.json",
            name + "_definitions.json",
            name + "_config.schema.json",
        ],
        # controlplane: `<engine> controlplane ...` runs it with this engine's definitions.
        deps = [
            "//controlplane:controlplane_lib",
            "//engine:runtime",
        ] + policies,
        tags = tags,
        visibility = visibility,
    )
    py_binary(
        name = name,
        srcs = [name + "_main.py"],
        main = name + "_main.py",
        deps = [":" + name + "_registry"],
        tags = tags,
        visibility = visibility,
    )
    py_test(
        name = "validation_test",
        srcs = ["validation_test.py"],
        main = "validation_test.py",
        deps = [":" + name + "_registry"],
        tags = tags,
        visibility = visibility,
    )
    # The control plane for this engine, exactly `<engine> controlplane`: validates against
    # its definitions and runs its policies' pure constructors.
    # `bazel run //<package>:controlplane -- [--config FILE|DIR] [--xds-listen ...]`
    py_binary(
        name = "controlplane",
        srcs = [name + "_main.py"],
        main = name + "_main.py",
        args = ["controlplane"],
        deps = [":" + name + "_registry"],
        tags = tags,
        visibility = visibility,
    )
    engine_image(
        name = "image",
        binary = ":" + name,
        # Labels: build time, revision, builder version, each policy's version and hash.
        build_info = name + "_build_info.json",
        tags = tags,
        visibility = visibility,
    )
