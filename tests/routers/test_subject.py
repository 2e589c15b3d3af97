"""NATS subject matching, as the config check relies on it (pure, no server)."""

from __future__ import annotations

import pytest

from busway.routers.subject import covers, is_valid_subject, matches, overlaps


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("orders.>", "orders.big", True),
        ("orders.>", "orders.big.eu", True),
        ("orders.>", "orders", False),
        ("orders.*", "orders.big", True),
        ("orders.*", "orders.big.eu", False),
        ("orders.*.eu", "orders.big.eu", True),
        ("orders.big", "orders.big", True),
        ("orders.big", "orders.small", False),
        (">", "anything.at.all", True),
    ],
)
def test_matches(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected


@pytest.mark.parametrize(
    ("pattern", "other", "expected"),
    [
        ("orders.>", "orders.*", True),
        ("orders.>", "orders.*.eu", True),
        ("orders.*", "orders.>", False),
        ("orders.*", "orders.*", True),
        ("orders.big", "orders.*", False),
        ("*.big", "orders.big", True),
    ],
)
def test_covers(pattern: str, other: str, expected: bool) -> None:
    assert covers(pattern, other) is expected


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("orders.>", "orders.big", True),
        ("orders.*", "*.big", True),
        ("orders.>", "invoices.>", False),
        ("orders.>", "orders", False),
        ("a.b", "a.b.c", False),
        ("a.*", "a.>", True),
    ],
)
def test_overlaps_is_symmetric(first: str, second: str, expected: bool) -> None:
    assert overlaps(first, second) is expected
    assert overlaps(second, first) is expected


@pytest.mark.parametrize(
    ("subject", "wildcards", "expected"),
    [
        ("orders.big", False, True),
        ("orders.>", True, True),
        ("orders.>", False, False),
        ("orders.>.x", True, False),
        ("orders..x", True, False),
        ("orders big", False, False),
        ("orders.b*g", True, False),
        ("", False, False),
    ],
)
def test_is_valid_subject(subject: str, wildcards: bool, expected: bool) -> None:
    assert is_valid_subject(subject, wildcards=wildcards) is expected
