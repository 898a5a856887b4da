"""What every command-line entry point of this repository shares: a closed stdout.

``engine --version | head -1`` closes the pipe before the engine has written (or
flushed) everything. Python then raises :class:`BrokenPipeError` from ``print`` or, for
output still buffered, from the flush at interpreter exit, which prints a traceback
(or "Exception ignored ... BrokenPipeError"). Well-behaved CLIs (``seq``, ``git``) stop
quietly instead: :func:`run_cli` does what the Python documentation's note on SIGPIPE
recommends, and exits with 141, the status a shell reports for a process killed by
SIGPIPE. Restoring SIGPIPE's default action instead is not an option for a server
process: a write to a client's closed socket would kill it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Final

__all__ = ["EXIT_BROKEN_PIPE", "run_cli"]

EXIT_BROKEN_PIPE: Final = 141
"""128 + SIGPIPE: what a shell reports for a command whose reader went away."""


def run_cli(entry: Callable[[], int]) -> int:
    """Run ``entry`` (a CLI's ``main``) and return its exit code; when stdout's reader
    has gone, exit quietly with :data:`EXIT_BROKEN_PIPE` instead of a traceback.

    stdout is flushed here, also when ``entry`` raises :class:`SystemExit` (argparse's
    ``--help`` and usage errors), so nothing is left for the interpreter's own flush at
    exit to fail on."""
    try:
        try:
            code = entry()
        except SystemExit:
            sys.stdout.flush()
            raise
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Anything still buffered would fail again at exit: point stdout at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
