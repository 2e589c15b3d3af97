"""Dotted paths into a JSON body (`customer.address.city`) for `set`, `remove`, `rename`, `into`.

Deliberately simpler than JMESPath: a path names object keys only, so writing through it has
one obvious meaning (missing objects on the way are created). Reading uses JMESPath anyway.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["Path", "PathError", "parse_path"]

_KEY = re.compile(r"^[A-Za-z_$@-][A-Za-z0-9_$@-]*$")


class PathError(ValueError):
    """A path is malformed, or a body cannot be written through it (a non-object on the way)."""


class Path:
    """A parsed dotted path: write, delete, or pop a value in a nested dict."""

    __slots__ = ("keys", "leaf", "parents", "text")

    def __init__(self, text: str, keys: tuple[str, ...]) -> None:
        self.text = text
        self.keys = keys
        self.parents = keys[:-1]
        self.leaf = keys[-1]

    def _parent(self, document: Any, *, create: bool) -> dict[str, Any] | None:
        if not isinstance(document, dict):
            raise PathError(f"cannot use path {self.text!r}: the body is not a JSON object")
        node = document
        for key in self.parents:
            child = node.get(key)
            if not isinstance(child, dict):
                if not create:
                    return None
                if child is not None:
                    raise PathError(
                        f"cannot set {self.text!r}: {key!r} holds a "
                        f"{type(child).__name__}, not an object"
                    )
                child = node[key] = {}
            node = child
        return node

    def set(self, document: Any, value: Any) -> None:
        """Store `value` at this path, creating missing objects on the way."""
        parent = self._parent(document, create=True)
        assert parent is not None
        parent[self.leaf] = value

    def get(self, document: Any) -> tuple[bool, Any]:
        """The value at this path: `(found, value)`; nothing is changed."""
        parent = self._parent(document, create=False)
        if parent is None or self.leaf not in parent:
            return False, None
        return True, parent[self.leaf]

    def pop(self, document: Any) -> tuple[bool, Any]:
        """Remove and return the value at this path: `(found, value)`."""
        parent = self._parent(document, create=False)
        if parent is None or self.leaf not in parent:
            return False, None
        return True, parent.pop(self.leaf)


def parse_path(text: str) -> Path:
    """Parse `a.b.c`; PathError says what is wrong with a bad path."""
    keys = tuple(text.split("."))
    for key in keys:
        if not _KEY.match(key):
            raise PathError(
                f"bad path {text!r}: each dot-separated part must be a plain key "
                "(letters, digits, _, -)"
            )
    return Path(text, keys)
