"""NDJSON ingest: every line published pipelined, then one answer listing each line's fate.

    {"accepted": 2, "failed": 1, "results": [
      {"line": 1, "status": 202, "id": "api:k1:1", "stream": "ORDERS", "seq": 7,
       "duplicate": false},
      {"line": 2, "status": 400, "type": "urn:busway:problem:invalid-json", "detail": "..."},
      {"line": 3, "status": 202, "id": "api:k1:3", "stream": "ORDERS", "seq": 8,
       "duplicate": false}]}

The status of the whole answer:

* 202 every line stored;
* 207 (Multi-Status) some stored, some not: the client retries only the failed lines (or
  the whole body with the same `Idempotency-Key`: stored lines come back `duplicate`);
* none stored: 503 with `Retry-After` if any line failed for want of JetStream (a retry can
  succeed), else 400 (every line is bad; retrying the same body cannot help).

Each line's `Nats-Msg-Id` is `<prefix>:<line number>`, so the numbering of a retried body,
blank lines included, must stay the same for the stream to deduplicate it. A line whose
publish was sent but not confirmed is `"type": "urn:busway:problem:not-confirmed"`: it may
be stored, and only a retry with the same `Idempotency-Key` is safe.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.responses import Response

from busway import PublishAck, PublishError, SourceContext
from busway.adapters.http.bodies import Item
from busway.adapters.http.problems import Problem, publish_failed

__all__ = ["Published", "publish_lines"]


@dataclass(frozen=True, slots=True)
class Published:
    """The answer to an NDJSON request, and whether any line is (or may be) stored."""

    response: Response
    anything_stored: bool


async def publish_lines(
    context: SourceContext,
    subject: str,
    lines: list[tuple[int, Item | Problem]],
    *,
    prefix: str,
    retry_after: int,
    keyed: bool,
) -> Published:
    """Publish the good lines without waiting in between, then await every PubAck."""
    results: dict[int, dict[str, Any]] = {}
    pending: list[tuple[int, str, Awaitable[PublishAck]]] = []
    first_error: PublishError | None = None
    for number, line in lines:
        if isinstance(line, Problem):
            results[number] = {"line": number, **line.body()}
            reason = "bad_json" if line.slug == "invalid-json" else line.slug.replace("-", "_")
            context.stats.count_error(reason)
            continue
        message_id = f"{prefix}:{number}"
        headers = {**line.headers, "Nats-Msg-Id": message_id}
        try:
            confirmation = await context.publisher.publish_pipelined(
                subject, line.data, headers=headers
            )
        except PublishError as exc:
            first_error = first_error or exc
            results[number] = _unavailable(context, number, exc, keyed)
            continue
        pending.append((number, message_id, confirmation))
    for number, message_id, confirmation in pending:
        try:
            ack = await confirmation
        except PublishError as exc:
            first_error = first_error or exc
            results[number] = _unavailable(context, number, exc, keyed)
            continue
        context.stats.published += 1
        results[number] = {
            "line": number,
            "status": 202,
            "id": message_id,
            "stream": ack.stream,
            "seq": ack.sequence,
            "duplicate": ack.duplicate,
        }
    ordered = [results[number] for number, _ in lines]
    accepted = sum(1 for result in ordered if result["status"] == 202)
    failed = len(ordered) - accepted
    answer_headers: dict[str, str] | None = None
    if failed == 0:
        status = 202
    elif accepted:
        status = 207
    elif any(result["status"] == 503 for result in ordered):
        status = 503
        answer_headers = {"Retry-After": str(retry_after)}
    else:
        status = 400
    if failed:
        context.logger.info(
            "NDJSON: %d line(s) stored, %d not (%d)%s",
            accepted,
            failed,
            status,
            f"; first publish error: {first_error}" if first_error else "",
        )
    body = {"accepted": accepted, "failed": failed, "results": ordered}
    response = Response(
        orjson.dumps(body),
        status_code=status,
        media_type="application/json",
        headers=answer_headers,
    )
    unconfirmed = any(r["type"] == _NOT_CONFIRMED for r in ordered if r["status"] == 503)
    return Published(response, anything_stored=accepted > 0 or unconfirmed)


_NOT_CONFIRMED = "urn:busway:problem:not-confirmed"


def _unavailable(
    context: SourceContext, number: int, exc: PublishError, keyed: bool
) -> dict[str, Any]:
    context.stats.count_error("publish_unconfirmed" if exc.unconfirmed else "publish")
    problem = publish_failed(unconfirmed=exc.unconfirmed, keyed=keyed, what="line", retry_after=0)
    return {"line": number, **problem.body()}
