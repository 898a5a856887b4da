"""engine.logformat: --log-format json writes one JSON object per line, request id included."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from engine import logformat


def _logger(kind: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logformat.formatter(kind))
    logger = logging.getLogger(f"test.logformat.{kind}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, out


def test_json_is_one_object_per_line_even_for_tracebacks() -> None:
    logger, out = _logger("json")
    logger.info("two\nlines")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed %s", "here")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "two\nlines"
    assert first["level"] == "INFO"
    assert first["logger"] == "test.logformat.json"
    assert first["time"].endswith("Z")
    assert "request_id" not in first
    assert second["message"] == "failed here"
    assert "ValueError: boom" in second["exception"]


def test_request_id_from_the_task_or_the_call() -> None:
    logger, out = _logger("json")

    async def request(request_id: str) -> None:
        logformat.REQUEST_ID.set(request_id)
        await asyncio.sleep(0)
        logger.warning("policy failed")

    async def both() -> None:  # two requests interleaved: each line keeps its own id
        await asyncio.gather(request("req-1"), request("req-2"))

    asyncio.run(both())
    logger.info("explicit", extra={"request_id": "req-3"})
    logger.info("outside a request")
    ids = [json.loads(line).get("request_id") for line in out.getvalue().splitlines()]
    assert ids == ["req-1", "req-2", "req-3", None]


def test_text_stays_the_default_format() -> None:
    logger, out = _logger("text")
    logger.info("hello")
    assert " INFO [" in out.getvalue()
    assert out.getvalue().rstrip().endswith("test.logformat.text: hello")
    with pytest.raises(ValueError, match="--log-format"):
        logformat.formatter("xml")
