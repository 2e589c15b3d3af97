"""The delivery contract's small pieces, shared by routes and sinks.

* `delivery_of` reads a JetStream delivery's stream sequence and attempt number straight from
  its reply subject (nats-py's `Msg.metadata` builds dataclasses and a datetime per message);
* `retry_delay` is the back-off of the n-th attempt, passed with each `nak` because a
  consumer's `backoff` list does not apply to explicit naks (nats-server 4726);
* `dead_letter_headers` is what a dead letter carries so an operator can tell what failed,
  where, and replay it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from busway._config.model import RetryPolicy
from busway._observe.redact import redact

__all__ = [
    "ACK",
    "DRAIN_NAK",
    "NAK",
    "REPLAY_FOR_HEADER",
    "REPLAY_MSG_ID_HEADER",
    "REPLAY_ORIGIN_HEADER",
    "TERM",
    "dead_letter_headers",
    "delivery_of",
    "passthrough_headers",
    "retry_delay",
]

ACK = b""
NAK = b"-NAK"
TERM = b"+TERM"
# What a stopping component naks with. Not an immediate nak: the stopping daemon's own pull
# requests stay open for up to a second (their expiry), and an immediate nak would bounce the
# message back into them, burning one delivery attempt per bounce. After 1.5 s they are gone,
# and a peer daemon (or the next start) takes the message.
DRAIN_NAK = b'-NAK {"delay": 1500000000}'

_MAX_ERROR_CHARS = 1024

REPLAY_FOR_HEADER = "Busway-Replay-For"
"""On a replayed dead letter: `<kind>:<name>` of the one route or sink it is for; every other
consumer of the subject acks it unprocessed (`ConsumerComponent._receive`)."""
REPLAY_MSG_ID_HEADER = "Busway-Replay-Msg-Id"
"""On a replayed dead letter: the original message's identity, which a sink keeps using as its
idempotency key (`Message.id`), so a partner sees the same key as for the first attempt."""

REPLAY_ORIGIN_HEADER = "Busway-Replay-Origin"
"""On a replayed dead letter: `<stream>:<sequence>` of the input a route first failed on; the
route derives its output ids from it instead of the copy's own place, so outputs it had already
stored before giving up keep their ids and the output stream drops them as duplicates."""

# Headers an output never inherits: NATS' own status ones (the `Nats-*` family is dropped by
# prefix) and the replay addressing, which belongs to the replayed input alone (an output
# carrying it would be skipped by its consumers, or share the input's idempotency key).
_NOT_INHERITED = frozenset(
    {"Status", "Description", REPLAY_FOR_HEADER, REPLAY_MSG_ID_HEADER, REPLAY_ORIGIN_HEADER}
)


def delivery_of(reply: str) -> tuple[str, int]:
    """(stream sequence, attempt) of a JetStream delivery, from its `$JS.ACK...` reply subject.

    The classic form ends `.<attempt>.<stream seq>.<consumer seq>.<time>.<pending>`; the newer
    one (with domain and account hash) adds a random token after `<pending>`.
    """
    tokens = reply.rsplit(
        ".", 6
    )  # [..., attempt, stream seq, consumer seq, time, pending, (token)]
    if reply.count(".") == 8:
        return tokens[3], int(tokens[2])
    return tokens[2], int(tokens[1])


def retry_delay(attempt: int, policy: RetryPolicy, retry_after: float | None = None) -> float:
    """Seconds before attempt `attempt + 1`: the policy's `schedule` entry, or exponential;
    ±20 % jitter, capped at `max_backoff`.

    A peer's own `retry_after` (e.g. HTTP Retry-After) wins when it is longer.
    """
    if policy.schedule:
        delay = float(policy.schedule[min(attempt, len(policy.schedule)) - 1])
    else:
        delay = float(policy.backoff) * 2.0 ** max(0, attempt - 1)
    delay = min(delay, float(policy.max_backoff)) * random.uniform(0.8, 1.2)
    if retry_after is not None and retry_after > delay:
        delay = min(retry_after, float(policy.max_backoff))
    return delay


def nak_payload(delay: float) -> bytes:
    """The `-NAK {"delay": ns}` ack payload that asks for redelivery after `delay` seconds."""
    return b'-NAK {"delay": %d}' % int(delay * 1e9)


def passthrough_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The headers an output inherits from its input: all but NATS' own (`Nats-*`, status),
    nats-server's MQTT markers (`Nmqtt-*`: they say "published by an MQTT client", and an
    output carrying them never reaches MQTT subscribers) and a replay's addressing
    (`Busway-Replay-For`, `Busway-Replay-Msg-Id`)."""
    if not headers:
        return {}
    return {
        key: value
        for key, value in headers.items()
        if not key.startswith(("Nats-", "Nmqtt-")) and key not in _NOT_INHERITED
    }


def dead_letter_headers(
    *,
    component: str,
    kind: str,
    reason: str,
    error: str,
    subject: str,
    stream: str,
    sequence: str,
    attempt: int,
    headers: Mapping[str, str] | None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Headers of a dead letter: what failed (`Busway-Error`), where, and the original's place.

    The id is deterministic so a dead letter re-sent after a crash is deduplicated.
    `Busway-Original-Msg-Id` (and `Busway-Replay-Origin`) name the first message even when a
    replayed copy failed again.
    """
    result = passthrough_headers(headers)
    result.update(
        {
            "Nats-Msg-Id": f"deadletter:{stream}:{sequence}:{component}",
            "Busway-Component": component,
            "Busway-Component-Kind": kind,
            "Busway-Error-Reason": reason,
            "Busway-Error": _one_line(redact(error)),
            "Busway-Original-Subject": subject,
            "Busway-Original-Stream": stream,
            "Busway-Original-Sequence": sequence,
            "Busway-Attempts": str(attempt),
        }
    )
    if headers:
        original = headers.get(REPLAY_MSG_ID_HEADER) or headers.get("Nats-Msg-Id")
        if original:
            result["Busway-Original-Msg-Id"] = original
        origin = headers.get(REPLAY_ORIGIN_HEADER)
        if origin:  # a replayed copy failed again: its next replay keeps the first place
            result[REPLAY_ORIGIN_HEADER] = origin
    if extra:
        result.update(extra)
    return result


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_ERROR_CHARS else flat[: _MAX_ERROR_CHARS - 1] + "…"
