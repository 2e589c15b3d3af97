"""Pure pieces of the delivery contract: a delivery's place, back-off, dead-letter headers."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus, RetryPolicy
from busway._delivery.contract import dead_letter_headers, delivery_of, nak_payload, retry_delay
from busway._delivery.delivery import Delivery
from busway._routing.worker import RouteWorker
from tests.support import NatsServer, decode_test_config, stream_messages, wait_settled


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


@pytest.mark.anyio
async def test_a_delivery_settled_twice_sends_once_and_counts_the_bug(
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ack travels with the delivery and the record allows one settle: a second one (a
    bug in a handler) sends nothing, frees no second slot, and is counted."""
    handle = RouteWorker.handle

    async def settles_twice(self: RouteWorker, delivery: Delivery) -> None:
        if b"twice" not in delivery.data:
            await handle(self, delivery)
            return
        await delivery.ack()
        await delivery.nak(0.1)  # refused: a nak after the ack would redeliver an acked message

    monkeypatch.setattr(RouteWorker, "handle", settles_twice)
    config = decode_test_config(
        f"""
[nats]
servers = ["{nats_server.url}"]

[[streams]]
name = "IN_{unique}"
subjects = ["in{unique}.>"]

[[streams]]
name = "OUT_{unique}"
subjects = ["out{unique}.>"]

[[routes]]
name = "r{unique}"
from = "in{unique}.x"
to = ["out{unique}.y"]
""",
        tmp_path,
    )
    js = nc.jetstream()
    async with Bus(config) as bus:
        await js.publish(f"in{unique}.x", b'{"twice": true}')
        await js.publish(f"in{unique}.x", b'{"once": true}')
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        stats = bus.metrics.stats[0]
        assert stats.errors.get("settled_twice") == 1
        assert stats.received == 2
        assert stats.in_flight == 0
    info = await js.consumer_info(f"IN_{unique}", f"busway-route-r{unique}")
    assert info.num_redelivered == 0 and info.num_ack_pending == 0
    assert [m.data for m in await stream_messages(nc, f"OUT_{unique}")] == [b'{"once": true}']
