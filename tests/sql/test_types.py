"""The JSON mapping of database values, and watermarks that come back as the same values."""

from __future__ import annotations

import datetime
import decimal
import uuid

import orjson
import pytest

from busway.adapters.sql._types import (
    JsonText,
    decode_watermark,
    encode_row,
    encode_watermark,
    render_value,
)

UTC = datetime.UTC


def test_values_map_to_json_without_losing_digits_or_zones() -> None:
    columns = ["small", "big", "aware", "naive", "day", "span", "neg", "raw", "doc", "ref"]
    row = [
        decimal.Decimal("1E-7"),
        decimal.Decimal("123456789012345678901234.5"),
        datetime.datetime(
            2024,
            2,
            29,
            23,
            59,
            59,
            1,
            tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30)),
        ),
        datetime.datetime(2024, 1, 1, 10, 0),
        datetime.date(2024, 2, 29),
        datetime.timedelta(days=2, seconds=5, microseconds=250000),
        datetime.timedelta(seconds=-90),
        b"\x00\xff",
        JsonText('{"a": 1.10}'),
        uuid.UUID(int=1),
    ]
    assert encode_row(columns, row, frozenset()) == (
        b'{"small":"0.0000001","big":"123456789012345678901234.5",'
        b'"aware":"2024-02-29T23:59:59.000001+05:30","naive":"2024-01-01T10:00:00+00:00",'
        b'"day":"2024-02-29","span":"P2DT5.25S","neg":"-PT90S","raw":"AP8=",'
        b'"doc":{"a": 1.10},"ref":"00000000-0000-0000-0000-000000000001"}'
    )


def test_json_columns_are_embedded_and_bad_json_is_refused() -> None:
    assert orjson.loads(encode_row(["d"], ['{"x": [1]}'], frozenset({"d"}))) == {"d": {"x": [1]}}
    with pytest.raises(ValueError, match="column 'd' is not valid JSON"):
        encode_row(["d"], ["{nope"], frozenset({"d"}))


@pytest.mark.parametrize(
    "values",
    [
        [42],
        [datetime.datetime(2024, 1, 1, 10, 0, 0, 5, tzinfo=UTC), 7],
        [datetime.datetime(2024, 1, 1, 10, 0), "key"],
        [decimal.Decimal("1.50"), datetime.date(2024, 1, 1), uuid.UUID(int=5), 1.5, True],
    ],
)
def test_watermarks_round_trip_to_the_same_types(values: list[object]) -> None:
    decoded = decode_watermark(encode_watermark(values))
    assert decoded == values
    assert [type(v) for v in decoded] == [type(v) for v in values]


def test_message_id_parts_are_plain_text() -> None:
    assert render_value(42) == "42"
    assert render_value("a b") == "a b"
    assert render_value(datetime.datetime(2024, 1, 1, tzinfo=UTC)) == "2024-01-01T00:00:00+00:00"
    assert render_value(decimal.Decimal("2.50")) == "2.50"
