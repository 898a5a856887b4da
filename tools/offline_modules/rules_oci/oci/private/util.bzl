"""Helpers shared by the stand-in's rules."""

def rlocation(ctx, f):
    """Path of `f` relative to a runfiles directory (`<repo>/<path>`)."""
    if f.short_path.startswith("../"):
        return f.short_path[3:]
    return ctx.workspace_name + "/" + f.short_path
