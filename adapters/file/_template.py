"""Path templates of the per-message file sink, compiled once at start-up.

    path = "out/{subject[1]}/{header[X-Tenant]}/{body[order.id]}-{id}.json"

Placeholders: `{id}` (the message id, stable across redeliveries), `{stream}`, `{seq}`,
`{subject}`, `{subject[N]}` (the N-th token, 0-based, negative from the end),
`{header[Name]}`, `{body[a.b]}` (a dotted path into the JSON body) and `{daemon}` (this
daemon's name, see `_daemon`; it alone does not tell messages apart). `{{` and `}}` are
literal braces. Every substituted value is made a safe single path component (`/` and NUL
become `_`, `.` and `..` become `_`), so a message can never write outside the template's
directories.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from busway import Message

__all__ = ["MissingValue", "PathTemplate"]

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([a-z]+)(?:\[([^\]]*)\])?\}")
_UNSAFE = re.compile(r"[/\\\x00]")
_MAX_COMPONENT = 200

_Part = Callable[[Message, list[Any]], str]


class MissingValue(Exception):
    """The message lacks what the template needs (a header, a body field, a JSON body)."""


class PathTemplate:
    """A compiled template: `render(message)` gives the relative path of its file."""

    def __init__(self, template: str, *, daemon: str = "daemon") -> None:
        self.template = template
        self.daemon = daemon
        self.uses_body = False
        self._parts: list[str | _Part] = []
        placeholders = 0
        position = 0
        for found in _PLACEHOLDER.finditer(template):
            literal = template[position : found.start()]
            position = found.end()
            if found.group(0) in ("{{", "}}"):
                self._parts.append(literal + found.group(0)[0])
                continue
            self._parts.append(literal)
            self._parts.append(self._compile(found.group(1), found.group(2)))
            placeholders += found.group(1) != "daemon"
        rest = template[position:]
        if "{" in rest or "}" in rest:
            raise ValueError(f"path template {template!r}: unbalanced brace in {rest!r}")
        self._parts.append(rest)
        if not placeholders:
            raise ValueError(
                f"path template {template!r} has no placeholder that differs between "
                "messages ({daemon} does not), so every message would overwrite the same "
                "file: add one such as {id}"
            )

    def render(self, message: Message) -> str:
        """The path for `message`; raises MissingValue if a placeholder has no value."""
        body: list[Any] = []  # parsed lazily, once
        return "".join(
            part if isinstance(part, str) else part(message, body) for part in self._parts
        )

    def _compile(self, name: str, key: str | None) -> _Part:
        if name == "daemon" and key is None:
            daemon = _safe(self.daemon)
            return lambda _message, _body: daemon
        if name in ("id", "stream", "seq") and key is None:
            attribute = {"id": "id", "stream": "stream", "seq": "sequence"}[name]
            return lambda message, _: _safe(str(getattr(message, attribute)))
        if name == "subject":
            if key is None:
                return lambda message, _: _safe(message.subject)
            try:
                index = int(key)
            except ValueError:
                raise ValueError(f"{{subject[{key}]}}: the index must be an integer") from None
            return lambda message, _: _token(message, index)
        if name == "header" and key:
            return lambda message, _: _header(message, key)
        if name == "body" and key:
            self.uses_body = True
            path = key.split(".")
            return lambda message, body: _body_field(message, body, path)
        raise ValueError(
            f"unknown placeholder {{{name}{'[' + key + ']' if key is not None else ''}}} in "
            f"path template {self.template!r}: use {{id}}, {{stream}}, {{seq}}, {{subject}}, "
            "{subject[N]}, {header[Name]}, {body[field.path]} or {daemon}"
        )


def _safe(value: str) -> str:
    value = _UNSAFE.sub("_", value)[:_MAX_COMPONENT]
    return "_" if value in ("", ".", "..") else value


def _token(message: Message, index: int) -> str:
    tokens = message.subject.split(".")
    try:
        return _safe(tokens[index])
    except IndexError:
        raise MissingValue(f"subject {message.subject!r} has no token {index}") from None


def _header(message: Message, name: str) -> str:
    value = message.headers.get(name)
    if value is None:
        raise MissingValue(f"header {name!r} is missing")
    return _safe(value)


def _body_field(message: Message, body: list[Any], path: list[str]) -> str:
    if not body:
        try:
            body.append(orjson.loads(message.data))
        except orjson.JSONDecodeError as exc:
            raise MissingValue(f"the body is not JSON ({exc})") from None
    value = body[0]
    for step in path:
        if not isinstance(value, dict) or step not in value:
            raise MissingValue(f"the body has no field {'.'.join(path)!r}")
        value = value[step]
    if isinstance(value, dict | list) or value is None:
        raise MissingValue(f"body field {'.'.join(path)!r} is not a string or number")
    if isinstance(value, bool):
        return "true" if value else "false"
    return _safe(str(value))
