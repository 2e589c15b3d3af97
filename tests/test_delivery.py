"""Pure pieces of the delivery contract: a delivery's place, back-off, dead-letter headers."""

from __future__ import annotations

import pytest

from busway import RetryPolicy
from busway._delivery.contract import dead_letter_headers, delivery_of, nak_payload, retry_delay


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("$JS.ACK.ORDERS.busway-route-r.3.1234.1200.1700000000000000000.5", ("1234", 3)),
        ("$JS.ACK.hub.ACCHASH.ORDERS.busway-route-r.1.77.70.1700000000000000000.0.x7", ("77", 1)),
        ("$JS.ACK._.ACCHASH.ORDERS.r.12.9.9.1700000000000000000.0.abc", ("9", 12)),
    ],
)
def test_delivery_of_reads_sequence_and_attempt_from_both_reply_forms(
    reply: str, expected: tuple[str, int]
) -> None:
    assert delivery_of(reply) == expected


def test_retry_delay_grows_exponentially_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(backoff=1.0, max_backoff=10.0)
    for attempt, base in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)):
        assert 0.8 * base <= retry_delay(attempt, policy) <= 1.2 * base
    assert retry_delay(20, policy) <= 12.0


def test_retry_after_from_the_peer_wins_when_longer_but_stays_capped() -> None:
    policy = RetryPolicy(backoff=0.1, max_backoff=30.0)
    assert retry_delay(1, policy, retry_after=5.0) == 5.0
    assert retry_delay(1, policy, retry_after=500.0) == 30.0


def test_an_explicit_schedule_replaces_the_exponential_back_off() -> None:
    policy = RetryPolicy(schedule=[1.0, 10.0, 60.0], max_backoff=30.0)  # type: ignore[list-item]
    for attempt, base in ((1, 1.0), (2, 10.0), (3, 30.0), (9, 30.0)):
        assert 0.8 * base <= retry_delay(attempt, policy) <= 1.2 * base


def test_policy_lists_override_the_default_classification() -> None:
    policy = RetryPolicy(permanent=["enrich"], transient=["validation"])
    assert not policy.is_transient("enrich", default=True)
    assert policy.is_transient("validation", default=False)
    assert policy.is_transient("python", default=True)
    assert not policy.is_transient("decode", default=False)


def test_nak_payload_carries_the_delay_in_nanoseconds() -> None:
    assert nak_payload(1.5) == b'-NAK {"delay": 1500000000}'


def test_dead_letter_headers_name_what_failed_and_keep_the_originals() -> None:
    headers = dead_letter_headers(
        component="r",
        kind="route",
        reason="decode",
        error="body is not\nvalid JSON",
        subject="orders.in",
        stream="ORDERS",
        sequence="42",
        attempt=2,
        headers={"Trace-Id": "t1", "Nats-Msg-Id": "api:k1"},
    )
    assert headers["Nats-Msg-Id"] == "deadletter:ORDERS:42:r"
    assert headers["Busway-Error"] == "body is not valid JSON"
    assert headers["Busway-Original-Msg-Id"] == "api:k1"
    assert headers["Trace-Id"] == "t1"
    assert headers["Busway-Attempts"] == "2"
