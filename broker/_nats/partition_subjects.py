"""Subjects of a partitioned stream: its transform, and the filters that read it.

A partitioned stream stores every message with the partition of its key appended as the last
subject token, computed by nats-server on ingest through the stream's subject transform
(`events.*` → `events.{{wildcard(1)}}.{{partition(8,1)}}`). The partition is fixed once, when
the message is stored, from its subject alone: no busway code runs per message for it, any
publisher (busway or not) gets it, and a key's messages keep their stream order inside their
partition. Consumers then filter on the last token.
"""

from __future__ import annotations

from busway._config.model import StreamConfig

__all__ = ["consumer_filter", "partition_filter", "subject_transform"]


def subject_transform(stream: StreamConfig) -> tuple[str, str] | None:
    """The stream's subject transform (source, destination), or None if unpartitioned."""
    partition = stream.partition
    if partition is None:
        return None
    subject = stream.subjects[0]
    tokens = subject.split(".")
    wildcards = 0
    dest: list[str] = []
    for token in tokens:
        if token == "*":
            wildcards += 1
            dest.append(f"{{{{wildcard({wildcards})}}}}")
        else:
            dest.append(token)
    keys = partition.key or list(range(1, wildcards + 1))
    dest.append(f"{{{{partition({partition.count},{','.join(str(k) for k in keys)})}}}}")
    return subject, ".".join(dest)


def consumer_filter(from_: str, stream: StreamConfig | None) -> str:
    """The filter of an unpartitioned consumer of `from_`: on a partitioned stream, `from_`
    plus any partition (`events.*` → `events.*.*`; a trailing `>` already covers it)."""
    if stream is None or stream.partition is None or from_.endswith(">"):
        return from_
    return from_ + ".*"


def partition_filter(from_: str, index: int) -> str:
    """The filter of partition `index`'s consumer of `from_` (`events.*` → `events.*.3`)."""
    return f"{from_}.{index}"
