"""Entry point of the zero-policy engine (the runtime as shipped: no policy compiled in).

A builder-generated binary has its own entry point that passes its generated registry.
"""

from __future__ import annotations

import sys

from engine.cli import run_cli
from engine.main import main
from engine.registry import PolicyRegistry

__all__ = ["run"]


def run() -> int:
    """Run the engine CLI with an empty registry."""
    return main(sys.argv[1:], registry=PolicyRegistry(()))


if __name__ == "__main__":
    sys.exit(run_cli(run))
