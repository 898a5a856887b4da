"""Framing of a streamed body: whole units out of arbitrary network pieces.

Envoy hands a streamed body over in pieces cut wherever the network cut it: an SSE event
or an NDJSON line may arrive in two pieces, or ten events in one. A framer turns pieces
into whole *units* so a streaming policy (engine/streaming.py) never sees half of one:

* ``bytes``: every piece is a unit, as it came (nothing is held back).
* ``lines``: one line per unit, its terminator included (``\\n``, ``\\r\\n`` or a lone
  ``\\r``); NDJSON. A line ended by ``\\r`` at the end of a piece is held until the next
  byte shows whether ``\\n`` follows.
* ``sse``: one event per unit (``text/event-stream``, parsed by the WHATWG HTML rules,
  section 9.2.6 "Interpreting an event stream"): the raw bytes of every line up to and
  including the blank line that ends the event, plus the parsed :class:`SseEvent`
  (fields ``data``/``event``/``id``/``retry``, comments, a leading UTF-8 BOM ignored,
  one space after the colon dropped, a line without a colon a field with an empty value).
  A block of comments only (a keep-alive ``: ping``) is a unit too, with ``has_data``
  false: the client's parser dispatches nothing for it.

Units keep their raw bytes exactly (BOM, terminators, comments), so a policy that passes
a unit on unchanged passes the very bytes it received. What a framer holds (the start of
an unfinished unit) is :attr:`Framer.pending`; the caller enforces the cap. At the end of
the stream, :meth:`Framer.finish` returns what is left as a last unit (an SSE event never
ended by a blank line, which a client would discard, comes with ``event=None``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

__all__ = [
    "FRAMINGS",
    "Framer",
    "FramingKind",
    "SseEvent",
    "Unit",
    "framer",
    "parse_sse_event",
]

FramingKind: TypeAlias = Literal["bytes", "lines", "sse"]
FRAMINGS: Final[tuple[FramingKind, ...]] = ("bytes", "lines", "sse")

_BOM: Final = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One parsed server-sent event (WHATWG field semantics).

    ``data``: the ``data`` lines joined with ``\\n`` (the last newline removed);
    ``event``: the type, ``"message"`` when absent or empty; ``id``/``retry``: set when the
    block carried a valid one; ``has_data``: whether a client dispatches this block (it
    had at least one ``data`` line); ``comments``: the text of ``:`` lines.
    """

    data: str = ""
    event: str = "message"
    id: str | None = None
    retry: int | None = None
    has_data: bool = False
    comments: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unit:
    """One whole unit: its raw bytes and, for SSE, the parsed event."""

    data: bytes
    event: SseEvent | None = None


def parse_sse_event(raw: bytes) -> SseEvent:
    """Parse the lines of one event block (``raw`` without its BOM, terminators included)."""
    data_lines: list[str] = []
    has_data = False
    event_type = ""
    event_id: str | None = None
    retry: int | None = None
    comments: list[str] = []
    for line in _split_lines(raw.decode("utf-8", "replace")):
        if not line:
            continue
        if line[0] == ":":
            comments.append(line[1:].removeprefix(" "))
            continue
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            data_lines.append(value)
            has_data = True
        elif name == "event":
            event_type = value
        elif name == "id":
            if "\0" not in value:
                event_id = value
        elif name == "retry" and value and value.isascii() and value.isdigit():
            retry = int(value)
    return SseEvent(
        data="\n".join(data_lines),
        event=event_type or "message",
        id=event_id,
        retry=retry,
        has_data=has_data,
        comments=tuple(comments),
    )


def _split_lines(text: str) -> list[str]:
    # Only CRLF, LF and CR end lines in an event stream (str.splitlines knows more).
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


@dataclass(slots=True)
class Framer:
    """Turns pieces of one body into units of ``kind``. One framer per stream and policy."""

    kind: FramingKind
    _buffer: bytearray = field(default_factory=bytearray)
    _scan: int = 0  # where the search for the next line end resumes
    _line_start: int = 0  # start of the current (unfinished) line in the buffer
    _started: bool = False  # SSE: the BOM check is done
    _first_line: bool = True  # SSE: the next complete line is the stream's first

    @property
    def pending(self) -> int:
        """Bytes held: the start of an unfinished unit."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Unit]:
        """The units completed by ``data`` (possibly none)."""
        if self.kind == "bytes":
            return [Unit(data)] if data else []
        self._buffer += data
        if self.kind == "lines":
            return [Unit(line) for line in self._lines()]
        return self._events()

    def finish(self) -> Unit | None:
        """End of stream: what is left as a last unit (None if nothing is)."""
        if not self._buffer:
            return None
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._scan = self._line_start = 0
        if self.kind == "sse":
            return Unit(rest, None)  # never ended by a blank line: a client discards it
        return Unit(rest)

    def _next_line_end(self) -> int | None:
        """Index just past the next complete line's terminator, from ``_scan``; None if
        the buffer holds no complete line (a trailing CR waits for the next byte)."""
        buffer = self._buffer
        size = len(buffer)
        i = self._scan
        while i < size:
            lf = buffer.find(b"\n", i)
            cr = buffer.find(b"\r", i, lf if lf >= 0 else size)
            if cr >= 0:
                if cr + 1 == size:  # CR at the end: CRLF or a lone CR? wait and see
                    self._scan = cr
                    return None
                return cr + 2 if buffer[cr + 1] == 0x0A else cr + 1
            if lf >= 0:
                return lf + 1
            self._scan = size
            return None
        self._scan = size
        return None

    def _lines(self) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while (end := self._next_line_end()) is not None:
            lines.append(bytes(self._buffer[start:end]))
            start = self._scan = end
        if start:
            del self._buffer[:start]
            self._scan -= start
        return lines

    def _events(self) -> list[Unit]:
        units: list[Unit] = []
        if not self._started:
            if len(self._buffer) < len(_BOM) and _BOM.startswith(bytes(self._buffer)):
                return units  # maybe the start of a BOM: wait for more
            self._started = True
        start = 0  # start of the current event in the buffer
        while (end := self._next_line_end()) is not None:
            line = bytes(self._buffer[self._line_start : end])
            self._scan = self._line_start = end
            if self._first_line:
                self._first_line = False
                line = line.removeprefix(_BOM)  # the stream's BOM is not part of a line
            if line in (b"\n", b"\r\n", b"\r"):  # a blank line ends the event
                raw = bytes(self._buffer[start:end])
                body = raw[len(_BOM) :] if start == 0 and raw.startswith(_BOM) else raw
                units.append(Unit(raw, parse_sse_event(body)))
                start = end
        if start:
            del self._buffer[:start]
            self._scan -= start
            self._line_start -= start
        return units

    def __post_init__(self) -> None:
        if self.kind not in FRAMINGS:
            raise ValueError(f"unknown framing {self.kind!r} (one of {', '.join(FRAMINGS)})")


def framer(kind: FramingKind) -> Framer:
    """A new framer of ``kind`` (``bytes``, ``lines`` or ``sse``)."""
    return Framer(kind)
