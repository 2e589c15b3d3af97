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
blank lines included, must stay the same for the stream to deduplicate it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import orjson
from starlette.responses import Response

from busway import PublishAck, PublishError, SourceContext
from busway.adapters.http.bodies import Item
from busway.adapters.http.problems import Problem

__all__ = ["publish_lines"]


async def publish_lines(
    context: SourceContext,
    subject: str,
    lines: list[tuple[int, Item | Problem]],
    *,
    prefix: str,
    retry_after: int,
) -> Response:
    """Publish the good lines without waiting in between, then await every PubAck."""
    results: dict[int, dict[str, Any]] = {}
    pending: list[tuple[int, str, Awaitable[PublishAck]]] = []
    for number, line in lines:
        if isinstance(line, Problem):
            results[number] = {"line": number, **line.body()}
            context.stats.count_error("bad_json")
            continue
        message_id = f"{prefix}:{number}"
        headers = {**line.headers, "Nats-Msg-Id": message_id}
        try:
            confirmation = await context.publisher.publish_pipelined(
                subject, line.data, headers=headers
            )
        except PublishError as exc:
            results[number] = _unavailable(number, exc)
            context.stats.count_error("publish")
            continue
        pending.append((number, message_id, confirmation))
    for number, message_id, confirmation in pending:
        try:
            ack = await confirmation
        except PublishError as exc:
            results[number] = _unavailable(number, exc)
            context.stats.count_error("publish")
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
        context.logger.info("NDJSON: %d line(s) stored, %d not (%d)", accepted, failed, status)
    body = {"accepted": accepted, "failed": failed, "results": ordered}
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type="application/json",
        headers=answer_headers,
    )


def _unavailable(number: int, exc: PublishError) -> dict[str, Any]:
    problem = Problem(
        503, "unavailable", "Service Unavailable", f"the line was not stored, retry later: {exc}"
    )
    return {"line": number, **problem.body()}
