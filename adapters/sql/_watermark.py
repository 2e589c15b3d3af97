"""The incremental source's stored watermark: fenced by the lease, and never going back.

Only the holder of the source's lease polls, but a holder can be slow to notice it lost the
lease (a long pause, a partition). Its last write must then not undo the new holder's work,
so the watermark is stored beside the fencing token of the lease it was written under:

    {"fence": 42, "watermark": [["int", "1500"]]}

and every write is a compare-and-set on the key's revision that first checks the stored value:

* a stored `fence` greater than ours means a newer holder wrote it: refused (`FencedOut`), and
  the caller stops polling until it wins the lease again;
* a stored watermark greater than ours would move reading backwards: refused, and the higher
  one is kept (and adopted by the caller);
* the revision moved between the read and the write: read again and decide again.

A value written before fencing existed (the bare list of pairs) counts as fence 0.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from busway import RetryableError, SourceContext, StateEntry
from busway.adapters.sql._types import decode_watermark, encode_watermark

__all__ = ["FencedOut", "load_watermark", "store_watermark"]

_KEY = "watermark"
_ATTEMPTS = 5


class FencedOut(RetryableError):
    """A newer lease holder has written the watermark: this daemon must stop polling."""


def _decode(entry: StateEntry) -> tuple[int, list[Any]]:
    document = orjson.loads(entry.value)
    if isinstance(document, list):  # written before fencing
        return 0, decode_watermark(entry.value)
    return int(document["fence"]), decode_watermark(orjson.dumps(document["watermark"]))


async def load_watermark(context: SourceContext) -> list[Any] | None:
    """The stored watermark (reading resumes after it), or None before the first row."""
    entry = await context.state.entry(_KEY)
    return None if entry is None else _decode(entry)[1]


async def store_watermark(
    context: SourceContext, watermark: list[Any], *, fence: int, logger: logging.Logger
) -> list[Any]:
    """Store `watermark` under `fence`; returns the watermark now stored (ours or a higher one).

    Raises FencedOut if a newer holder wrote it, RetryableError if JetStream does not answer.
    """
    value = orjson.dumps({"fence": fence, "watermark": orjson.loads(encode_watermark(watermark))})
    for _ in range(_ATTEMPTS):
        entry = await context.state.entry(_KEY)
        if entry is not None:
            stored_fence, stored = _decode(entry)
            if stored_fence > fence:
                context.stats.count_error("fenced_out")
                raise FencedOut(
                    f"the watermark was written by a newer lease holder (fencing token "
                    f"{stored_fence} > ours, {fence}): this daemon lost the lease"
                )
            if _behind(watermark, stored):
                context.stats.count_error("watermark_behind")
                logger.warning(
                    "not storing watermark %s: the stored one, %s, is further; resuming after it",
                    watermark,
                    stored,
                )
                return stored
        if await context.state.compare_and_set(
            _KEY, value, revision=entry.revision if entry is not None else 0
        ):
            return watermark
    raise RetryableError("the stored watermark keeps changing under this daemon; retrying")


def _behind(ours: list[Any], stored: list[Any]) -> bool:
    try:
        return bool(ours < stored)
    except TypeError:  # values of another type (a changed column): the fence decides alone
        return False
