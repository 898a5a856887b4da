"""engine.framing: whole units out of arbitrary pieces (bytes, lines, SSE events)."""

from __future__ import annotations

import itertools

import pytest

from engine.framing import Framer, SseEvent, Unit, framer, parse_sse_event

STREAM = (
    b"\xef\xbb\xbf: hello\n\n"
    b"event: greeting\r\nid: 7\r\ndata: first\r\ndata:  second\r\n\r\n"
    b"data\rretry: 1500\r\r"
    b'data: {"a": 1}\n\n'
    b"data: tail without end"
)


def feed_all(f: Framer, pieces: list[bytes]) -> list[Unit]:
    units: list[Unit] = []
    for piece in pieces:
        units += f.feed(piece)
    last = f.finish()
    if last is not None:
        units.append(last)
    return units


def split_at(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def test_sse_events_parsed_per_whatwg() -> None:
    units = feed_all(framer("sse"), [STREAM])
    events = [u.event for u in units]
    assert events[0] == SseEvent(comments=("hello",))  # BOM dropped, comment only
    assert events[1] == SseEvent(
        data="first\n second", event="greeting", id="7", has_data=True
    )  # one space dropped after the colon, CRLF lines
    assert events[2] == SseEvent(data="", retry=1500, has_data=True)  # "data" with no colon
    assert events[3] == SseEvent(data='{"a": 1}', has_data=True)
    assert events[4] is None  # never ended by a blank line: a client discards it
    assert b"".join(u.data for u in units) == STREAM  # raw bytes kept exactly


@pytest.mark.parametrize("kind", ["sse", "lines", "bytes"])
def test_every_split_gives_the_same_units(kind: str) -> None:
    f = framer(kind)  # type: ignore[arg-type]
    whole = feed_all(f, [STREAM])
    for cut in range(1, len(STREAM)):
        for second in (cut + 1, cut + 3):
            f = framer(kind)  # type: ignore[arg-type]
            units = feed_all(f, split_at(STREAM, (cut, min(second, len(STREAM)))))
            assert b"".join(u.data for u in units) == STREAM, (cut, second)
            if kind != "bytes":
                assert units == whole, (cut, second)


def test_byte_at_a_time() -> None:
    f = framer("sse")
    units = feed_all(f, [STREAM[i : i + 1] for i in range(len(STREAM))])
    assert units == feed_all(framer("sse"), [STREAM])


@pytest.mark.parametrize(
    ("pieces", "lines"),
    [
        ([b'{"a":1}\n{"b"', b":2}\n"], [b'{"a":1}\n', b'{"b":2}\n']),
        ([b"one\r", b"\ntwo\r", b"three"], [b"one\r\n", b"two\r", b"three"]),
        ([b"a\r\rb\n"], [b"a\r", b"\r", b"b\n"]),
        ([b"", b"x\n", b""], [b"x\n"]),
    ],
    ids=["ndjson-split", "cr-then-lf-split", "lone-crs", "empty-pieces"],
)
def test_lines(pieces: list[bytes], lines: list[bytes]) -> None:
    assert [u.data for u in feed_all(framer("lines"), pieces)] == lines


def test_trailing_cr_waits_for_the_next_byte() -> None:
    f = framer("lines")
    assert f.feed(b"line\r") == []
    assert f.pending == 5
    assert f.feed(b"\n") == [Unit(b"line\r\n")]
    assert f.pending == 0


def test_pending_counts_the_unfinished_unit() -> None:
    f = framer("sse")
    assert f.feed(b"data: a\n") == []
    assert f.pending == 8
    assert [u.event for u in f.feed(b"\ndata: b")] == [SseEvent(data="a", has_data=True)]
    assert f.pending == 7
    assert framer("bytes").feed(b"abc") == [Unit(b"abc")]


def test_bom_split_across_pieces_and_blank_first_line() -> None:
    f = framer("sse")
    assert f.feed(b"\xef") == []
    assert f.feed(b"\xbb") == []
    units = f.feed(b"\xbf\ndata: x\n\n")
    assert [u.data for u in units] == [b"\xef\xbb\xbf\n", b"data: x\n\n"]
    assert units[0].event == SseEvent()
    assert units[1].event == SseEvent(data="x", has_data=True)


def test_bom_only_at_the_start() -> None:
    event = feed_all(framer("sse"), [b"data: a\n\n\xef\xbb\xbfdata: b\n\n"])[1].event
    assert event is not None
    assert not event.has_data  # a BOM later is part of the field name "\ufeffdata"


def test_parse_rules() -> None:
    assert parse_sse_event(b"id: a\0b\nretry: 1x\nevent:\ndata\n\n") == SseEvent(
        data="", has_data=True
    )  # id with NUL ignored, non-digit retry ignored, empty event type -> message
    assert parse_sse_event(b"data:no-space\ndata:\n").data == "no-space\n"
    assert parse_sse_event(b"unknown: x\n").has_data is False


def test_unknown_kind_refused() -> None:
    with pytest.raises(ValueError, match="unknown framing 'xml'"):
        framer("xml")  # type: ignore[arg-type]
