"""The builder's version, embedded in every engine's build metadata."""

BUILDER_VERSION = "0.1.0"
