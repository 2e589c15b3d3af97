"""URL and header templates filled from a message, compiled once when the sink is created.

    url = "https://crm.example/api/customers/{body.customer.id}/orders?region={subject[1]}"
    headers = { "X-Tenant" = "{header.X-Tenant}", "X-Order" = "{id}" }

Fields:

    {subject}           the whole subject            {subject[1]}  its 2nd token (0-based;
    {id}                the message id                             -1 is the last)
    {header.Name}       a message header             {body.a.b.0}  a field of the JSON body
                                                                   (numbers index arrays)

`{{` and `}}` are literal braces. In a URL every value is percent-encoded (a `/` in a customer
id stays inside its path segment), and the scheme and host must be literal, so a message can
never choose which server receives it. A field a message lacks, or whose value is an object,
array or null, makes that message fail permanently (dead letter): retrying cannot add a field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from busway import Message, PermanentError

__all__ = ["MessageFields", "Template"]

_FIELD = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SUBJECT_TOKEN = re.compile(r"^subject\[(-?\d+)\]$")
_MISSING = object()
# scheme://host[:port] followed by the start of the path or query (or the end).
_ORIGIN = re.compile(r"^https?://[^/?#\s]+(?=[/?]|$)", re.IGNORECASE)


class MessageFields:
    """One message's template values; the JSON body is parsed at most once, and only if used."""

    __slots__ = ("_body", "message")

    def __init__(self, message: Message) -> None:
        self.message = message
        self._body: Any = _MISSING

    def body(self) -> Any:
        """The parsed JSON body; PermanentError if a template needs it and it is not JSON."""
        if self._body is _MISSING:
            try:
                self._body = orjson.loads(self.message.data)
            except orjson.JSONDecodeError as exc:
                raise PermanentError(
                    f"message {self.message.id}: the sink's templates read body fields but the "
                    f"body is not JSON ({exc})"
                ) from None
        return self._body


Getter = Callable[[MessageFields], Any]


@dataclass(frozen=True, slots=True)
class Template:
    """Literal text and field getters, alternating; `render` only joins strings."""

    text: str
    parts: tuple[str | tuple[str, Getter], ...]
    url: bool

    @classmethod
    def compile(cls, text: str, *, url: bool) -> Template:
        """Compile `text`; ValueError naming the bad field or, for URLs, a templated host."""
        parts: list[str | tuple[str, Getter]] = []
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
            name = found.group(1).strip()
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append((name, _getter(name, text)))
        literal.append(text[position:])
        if "".join(literal):
            parts.append("".join(literal))
        template = cls(text, tuple(parts), url)
        if url:
            template._check_url()
        return template

    @property
    def is_static(self) -> bool:
        """True when no part depends on the message."""
        return all(isinstance(part, str) for part in self.parts)

    def render(self, fields: MessageFields) -> str:
        """The text for one message; PermanentError if a field is missing or not a scalar."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            name, getter = part
            value = _scalar(getter(fields), name, self.text, fields.message)
            if self.url:
                out.append(quote(value, safe=""))
            elif any(c in value for c in "\r\n\0"):
                raise PermanentError(
                    f"message {fields.message.id}: {{{name}}} holds a line break, which "
                    "cannot go into a header"
                )
            else:
                out.append(value)
        return "".join(out)

    def _check_url(self) -> None:
        first = self.parts[0] if self.parts and isinstance(self.parts[0], str) else ""
        if not first.lower().startswith(("http://", "https://")):
            raise ValueError(f"url {self.text!r} must start with http:// or https://")
        found = _ORIGIN.match(first)
        if found is None or (len(self.parts) > 1 and found.end() == len(first)):
            raise ValueError(
                f"url {self.text!r}: the scheme and host must be literal, so a message cannot "
                "choose the server (template only the path and query)"
            )


def _getter(name: str, text: str) -> Getter:
    if name == "subject":
        return lambda fields: fields.message.subject
    if name == "id":
        return lambda fields: fields.message.id
    token = _SUBJECT_TOKEN.match(name)
    if token:
        index = int(token.group(1))
        return lambda fields: _token(fields.message.subject, index)
    if name.startswith("header.") and len(name) > len("header."):
        header = name[len("header.") :]
        return lambda fields: _header(fields.message.headers, header)
    if name.startswith("body.") and len(name) > len("body."):
        path = tuple(int(p) if p.lstrip("-").isdigit() else p for p in name[5:].split("."))
        if any(p == "" for p in path):
            raise ValueError(f"template {text!r}: empty key in {{{name}}}")
        return lambda fields: _walk(fields.body(), path)
    raise ValueError(
        f"template {text!r}: unknown field {{{name}}}; expected subject, subject[N], id, "
        "header.Name or body.path.to.field"
    )


def _token(subject: str, index: int) -> Any:
    tokens = subject.split(".")
    return tokens[index] if -len(tokens) <= index < len(tokens) else None


def _header(headers: Mapping[str, str], name: str) -> Any:
    value = headers.get(name)
    if value is None:
        lower = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lower), None)
    return value


def _walk(document: Any, path: tuple[str | int, ...]) -> Any:
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
    what = "missing" if value is None else f"a {type(value).__name__}, not a scalar"
    raise PermanentError(
        f"message {message.id} on {message.subject}: {{{name}}} of template {text!r} is {what}"
    )
