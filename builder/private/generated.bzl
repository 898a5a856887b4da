"""Packages under generated/ (written by `bazel run //builder:build`, never committed)."""

def generated_tags():
    """["manual"] inside generated/, else [].

    Generated packages come and go with manifests: `bazel test //...` must not build
    them. The builder names their targets explicitly, which builds manual targets.
    """
    if native.package_name().startswith("generated/"):
        return ["manual"]
    return []
