"""Log formats: JSON lines carry the fields a log shipper needs."""

from __future__ import annotations

import logging

import orjson

from busway._observe.logging import JsonFormatter


def test_json_formatter_writes_one_object_with_level_logger_message_and_extras() -> None:
    record = logging.LogRecord(
        "busway.route.r1", logging.WARNING, __file__, 1, "retrying %s", ("seq 7",), None
    )
    record.component = "r1"
    entry = orjson.loads(JsonFormatter().format(record))
    assert entry["level"] == "warning"
    assert entry["logger"] == "busway.route.r1"
    assert entry["message"] == "retrying seq 7"
    assert entry["component"] == "r1"
    assert entry["ts"].endswith("Z")
