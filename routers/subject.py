"""NATS subject syntax: validation, wildcard matching, and whether one pattern covers another.

Streams capture subjects by pattern and consumers filter by pattern; busway checks at start-up
that every subject a route or sink reads or writes is captured by a declared stream, so a typo
is a config error and not a publish that JetStream answers with "no responders" forever.
"""

from __future__ import annotations

__all__ = ["covers", "is_valid_subject", "matches", "overlaps"]

_FORBIDDEN = frozenset(" \t\r\n")


def is_valid_subject(subject: str, *, wildcards: bool) -> bool:
    """True if `subject` is well formed: dot-separated non-empty tokens, no whitespace.

    With `wildcards`, `*` may stand for one whole token and `>` for the last token only.
    """
    if not subject or _FORBIDDEN.intersection(subject):
        return False
    tokens = subject.split(".")
    last = len(tokens) - 1
    for index, token in enumerate(tokens):
        if not token:
            return False
        if token in ("*", ">"):
            if not wildcards or (token == ">" and index != last):
                return False
        elif "*" in token or ">" in token:
            return False
    return True


def matches(pattern: str, subject: str) -> bool:
    """True if the literal `subject` is matched by `pattern` (which may hold `*` and `>`)."""
    return covers(pattern, subject)


def covers(pattern: str, other: str) -> bool:
    """True if every subject matched by `other` is also matched by `pattern`.

    `orders.>` covers `orders.big` and `orders.*.eu`; `orders.*` does not cover `orders.>`.
    """
    mine = pattern.split(".")
    theirs = other.split(".")
    for index, token in enumerate(mine):
        if token == ">":
            return len(theirs) > index
        if index >= len(theirs):
            return False
        their = theirs[index]
        if token == "*":
            if their == ">":
                return False
            continue
        if token != their:
            return False
    return len(mine) == len(theirs)


def overlaps(first: str, second: str) -> bool:
    """True if some subject is matched by both patterns (used to detect routing loops)."""
    left = first.split(".")
    right = second.split(".")
    for index in range(max(len(left), len(right))):
        a = left[index] if index < len(left) else None
        b = right[index] if index < len(right) else None
        if a == ">" or b == ">":
            return a is not None and b is not None
        if a is None or b is None:
            return False
        if a != b and a != "*" and b != "*":
            return False
    return True
