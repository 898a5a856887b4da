"""``--log-format text|json``: how the engine and the control plane write their log lines.

``text`` (the default) is the classic one-line format. ``json`` writes ONE JSON object per
line (newlines inside a message or a traceback are escaped, so a line is always a whole
record) for log collectors:

    {"time": "2026-12-04T11:50:00.123Z", "level": "ERROR", "logger": "engine.chain",
     "pid": 7, "message": "request 1b2c...: request policy apiKey v1.0.0 failed: ...",
     "request_id": "1b2c..."}

``request_id`` is Envoy's ``x-request-id`` of the request the line is about, when there is
one: the ext_proc stream sets :data:`REQUEST_ID` for its task (every line logged while that
request's policies run carries it), or a call passes ``extra={"request_id": ...}``.
``exception`` holds the traceback when there is one. Messages are the same text as in the
``text`` format (secrets are scrubbed before they are logged, whatever the format).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from contextvars import ContextVar
from typing import Any, Final, TextIO

__all__ = [
    "FORMATS",
    "REQUEST_ID",
    "TEXT_FORMAT",
    "JsonFormatter",
    "add_argument",
    "configure",
    "formatter",
    "printable",
]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
FORMATS: Final = ("text", "json")

REQUEST_ID: ContextVar[str] = ContextVar("policy_engine_request_id", default="")
"""The request id of the request the current task serves ("" outside one)."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            entry["request_id"] = str(request_id)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


def printable(text: str) -> str:
    """``text`` (a value a client chose: a request path, a node id) as it may appear
    inside a log line: every character that is not printable (newline, carriage return,
    escape, NUL, a bidi override...) written as its Python escape (``\\n``,
    ``\\x1b``, ``\\u202e``), so it cannot end the line and start one that reads like
    another record, nor drive the terminal of whoever reads the log."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def formatter(kind: str) -> logging.Formatter:
    """The formatter of ``--log-format kind`` (``text`` or ``json``)."""
    if kind == "json":
        return JsonFormatter()
    if kind == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"--log-format: {kind!r} is not one of {', '.join(FORMATS)}")


def configure(level: str, stream: TextIO, kind: str = "text") -> None:
    """``logging.basicConfig`` with the chosen format (once per process, like it)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(kind))
    logging.basicConfig(level=level, handlers=[handler])


def add_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--log-format`` to a command line."""
    parser.add_argument(
        "--log-format",
        default="text",
        choices=FORMATS,
        help="text (default): one readable line per record; json: one JSON object per line "
        "(time, level, logger, pid, message, request_id when the line is about a request)",
    )
