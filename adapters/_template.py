"""The one template syntax of busway's sinks (and of the SQL source's subject).

    subject = "Order {body.order.id} for {header.X-Tenant}"
    path    = "out/{subject[1]}/{id}.json"
    url     = "https://crm.example/api/customers/{body.customer.id}"

Fields:

    {id}            the message id (stable across redeliveries)
    {subject}       the whole subject       {subject[N]}  its N-th token (0-based, -1 the last)
    {stream} {seq}  where the message is stored
    {header.Name}   a message header (case-insensitive)
    {body.a.b.0}    a field of the JSON body (numbers index arrays); a SQL source's row is its
                    body, so `{body.region}` is the row's `region` column

`{{` and `}}` are literal braces. A template is compiled once, at start-up; rendering only
joins strings. What a value may hold depends on where it goes, so each user passes an
`escape`: percent-encoding in a URL, a safe single component in a path, no line break in a
header (an escape raises ValueError to fail the message). A field the message lacks, or whose
value is an object, array or null, raises `MissingField`, a `PermanentError`: retrying
cannot add a field, so the message is dead-lettered with the reason.

Three syntaxes grew before this module: `{header.X}` (HTTP), `{header[X]}` / `{body[a.b]}`
(file paths) and `{column}` (SQL subjects, `busway.adapters.sql._subject`). The old forms
still work and are rewritten to the one above; each use logs a deprecation warning when the
config is loaded (`busway check` shows it) saying what to write instead. See
docs/adapters/templates.md.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from busway import Message, PermanentError

__all__ = [
    "Fields",
    "MissingField",
    "Template",
    "deprecated",
    "no_line_breaks",
    "parse_fields",
    "split_fields",
    "walk",
    "warn_once",
]

logger = logging.getLogger("busway.config")

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SUBJECT_TOKEN = re.compile(r"^subject\[(-?\d+)\]$")
_LEGACY_BRACKET = re.compile(r"^(header|body)\[([^\]]*)\]$")
_MISSING = object()
_WARNED: set[str] = set()

Escape = Callable[[str], str]
Getter = Callable[["Fields"], Any]


class MissingField(PermanentError):
    """The message lacks what the template needs (a header, a body field, a JSON body)."""


class Fields:
    """One message's template values; the JSON body is parsed at most once, and only if used."""

    __slots__ = ("_body", "message")

    def __init__(self, message: Message) -> None:
        self.message = message
        self._body: Any = _MISSING

    def body(self) -> Any:
        """The parsed JSON body; MissingField if a template needs it and it is not JSON."""
        if self._body is _MISSING:
            try:
                self._body = orjson.loads(self.message.data)
            except orjson.JSONDecodeError as exc:
                raise MissingField(
                    f"message {self.message.id}: a template reads body fields but the body is "
                    f"not JSON ({exc})"
                ) from None
        return self._body


def split_fields(text: str) -> list[str]:
    """`text` as alternating literal text (even indices) and raw field names (odd ones).

    `{{` and `}}` are literal braces; ValueError for an unmatched one.
    """
    parts: list[str] = []
    literal: list[str] = []
    position = 0
    for found in _FIELD.finditer(text):
        literal.append(text[position : found.start()])
        position = found.end()
        token = found.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
            continue
        if token in ("{", "}"):
            raise ValueError(f"template {text!r}: unmatched {token!r} (write {token * 2})")
        parts.append("".join(literal))
        parts.append(found.group(1).strip())
        literal = []
    literal.append(text[position:])
    parts.append("".join(literal))
    return parts


def warn_once(note: str) -> None:
    """Log a deprecation note once per process (a config is decoded, then built: one note)."""
    if note not in _WARNED:
        _WARNED.add(note)
        logger.warning("%s", note)


def deprecated(text: str, old: str, new: str) -> str:
    """The deprecation note for `{old}` in template `text`."""
    return (
        f"template {text!r}: {{{old}}} is deprecated, write {{{new}}} "
        "(one syntax for every sink; see docs/adapters/templates.md)"
    )


def parse_fields(text: str, *, extra: frozenset[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Split `text` into literals and canonical field names; also return deprecation notes.

    Parts alternate: even indices are literal text, odd ones field names (`header.X`,
    `body.a.b`, `subject[1]`, `id`, ...). `extra` names fields a caller adds (the file sink's
    `{daemon}`). ValueError names an unknown field or an unmatched brace.
    """
    parts = split_fields(text)
    notes: list[str] = []
    for index in range(1, len(parts), 2):
        name = parts[index]
        canonical = _canonical(name, text, extra=extra)
        if canonical != name:
            notes.append(deprecated(text, name, canonical))
        parts[index] = canonical
    return parts, notes


def _canonical(name: str, text: str, *, extra: frozenset[str]) -> str:
    if name in ("id", "subject", "stream", "seq") or name in extra:
        return name
    if _SUBJECT_TOKEN.match(name):
        return name
    legacy = _LEGACY_BRACKET.match(name)
    if legacy and legacy.group(2):
        return f"{legacy.group(1)}.{legacy.group(2)}"
    for prefix in ("header.", "body."):
        if name.startswith(prefix) and len(name) > len(prefix):
            if prefix == "body." and "" in name[len(prefix) :].split("."):
                raise ValueError(f"template {text!r}: empty key in {{{name}}}")
            return name
    raise ValueError(
        f"template {text!r}: unknown field {{{name}}}; expected id, subject, subject[N], "
        f"stream, seq, header.Name or body.path.to.field"
        + (f", or {', '.join(sorted(extra))}" if extra else "")
    )


@dataclass(frozen=True, slots=True)
class Template:
    """Literal text and field getters, alternating; `render` only joins strings."""

    text: str
    parts: tuple[str | tuple[str, Getter], ...]
    escape: Escape
    deprecations: tuple[str, ...] = ()

    @classmethod
    def compile(
        cls,
        text: str,
        *,
        escape: Escape = lambda value: value,
        extra: Mapping[str, Getter] | None = None,
        where: str = "",
    ) -> Template:
        """Compile `text` (ValueError naming a bad field); logs each deprecated form once.

        `where` says which config key holds the template, for the deprecation warning.
        """
        extra = dict(extra or {})
        pieces, notes = parse_fields(text, extra=frozenset(extra))
        parts: list[str | tuple[str, Getter]] = []
        for index, piece in enumerate(pieces):
            if index % 2 == 0:
                if piece:
                    parts.append(piece)
            else:
                parts.append((piece, extra.get(piece) or _getter(piece)))
        for note in notes:
            warn_once(f"{where}: {note}" if where else note)
        return cls(text, tuple(parts), escape, tuple(notes))

    @property
    def is_static(self) -> bool:
        """True when no part depends on the message."""
        return all(isinstance(part, str) for part in self.parts)

    @property
    def field_names(self) -> list[str]:
        """The canonical names of the fields it uses, in order."""
        return [part[0] for part in self.parts if not isinstance(part, str)]

    @property
    def uses_body(self) -> bool:
        """True when rendering parses the JSON body."""
        return any(name.startswith("body.") for name in self.field_names)

    def render(self, fields: Fields | Message) -> str:
        """The text for one message; MissingField if a field is missing or not a scalar."""
        if isinstance(fields, Message):
            fields = Fields(fields)
        out: list[str] = []
        escape = self.escape
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                name, getter = part
                value = _scalar(getter(fields), name, self.text, fields.message)
                try:
                    out.append(escape(value))
                except ValueError as exc:
                    message = fields.message
                    raise MissingField(
                        f"message {message.id} on {message.subject}: {{{name}}} {exc}"
                    ) from None
        return "".join(out)


def no_line_breaks(where: str) -> Escape:
    """An escape for header-like values: a value holding CR, LF or NUL fails its message
    (it would end the header early and start another)."""

    def escape(value: str) -> str:
        if any(char in value for char in "\r\n\0"):
            raise ValueError(f"holds a line break, which cannot go into {where}")
        return value

    return escape


def _getter(name: str) -> Getter:
    if name == "subject":
        return lambda fields: fields.message.subject
    if name == "id":
        return lambda fields: fields.message.id
    if name == "stream":
        return lambda fields: fields.message.stream
    if name == "seq":
        return lambda fields: fields.message.sequence
    token = _SUBJECT_TOKEN.match(name)
    if token:
        index = int(token.group(1))
        return lambda fields: _token(fields.message.subject, index)
    if name.startswith("header."):
        header = name[len("header.") :]
        return lambda fields: _header(fields.message.headers, header)
    path = tuple(int(p) if p.lstrip("-").isdigit() else p for p in name[5:].split("."))
    return lambda fields: walk(fields.body(), path)


def _token(subject: str, index: int) -> Any:
    tokens = subject.split(".")
    return tokens[index] if -len(tokens) <= index < len(tokens) else None


def _header(headers: Mapping[str, str], name: str) -> Any:
    value = headers.get(name)
    if value is None:
        lower = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lower), None)
    return value


def walk(document: Any, path: tuple[str | int, ...]) -> Any:
    """The value at `path` in a parsed JSON document, or None."""
    for key in path:
        if isinstance(document, dict):
            document = document.get(str(key))
        elif (
            isinstance(document, list)
            and isinstance(key, int)
            and -len(document) <= key < len(document)
        ):
            document = document[key]
        else:
            return None
    return document


def _scalar(value: Any, name: str, text: str, message: Message) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return orjson.dumps(value).decode()
    what = (
        f"missing: {_absent(name, message)}"
        if value is None
        else (f"a {type(value).__name__}, not a scalar")
    )
    raise MissingField(
        f"message {message.id} on {message.subject}: {{{name}}} of template {text!r} is {what}"
    )


def _absent(name: str, message: Message) -> str:
    """What is missing, in the words of the message's own parts."""
    if name.startswith("header."):
        return f"header {name[len('header.') :]!r} is missing"
    if name.startswith("body."):
        return f"the body has no field {name[len('body.') :]!r}"
    token = _SUBJECT_TOKEN.match(name)
    if token:
        return f"subject {message.subject!r} has no token {token.group(1)}"
    return f"{{{name}}} is missing"
