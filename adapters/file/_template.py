"""Path templates of the per-message file sink: the shared syntax, made safe for paths.

    path = "out/{subject[1]}/{header.X-Tenant}/{body.order.id}-{id}.json"

The fields are those of every sink (`busway.adapters._template`: `{id}`, `{stream}`, `{seq}`,
`{subject}`, `{subject[N]}`, `{header.Name}`, `{body.a.b}`), plus `{daemon}` (this daemon's
name, see `_daemon`; it alone does not tell messages apart). The older `{header[Name]}` and
`{body[a.b]}` still work, with a deprecation warning. Every substituted value is made a safe
single path component (`/` and NUL become `_`, `.` and `..` become `_`), so a message can
never write outside the template's directories.
"""

from __future__ import annotations

import re

from busway import Message
from busway.adapters._template import Fields, MissingField, Template

__all__ = ["MissingValue", "PathTemplate"]

_UNSAFE = re.compile(r"[/\\\x00]")
_MAX_COMPONENT = 200

MissingValue = MissingField
"""The message lacks what the template needs (a header, a body field, a JSON body)."""


class PathTemplate:
    """A compiled template: `render(message)` gives the relative path of its file."""

    def __init__(self, template: str, *, daemon: str = "daemon") -> None:
        self.template = template
        self.daemon = daemon
        safe_daemon = _safe(daemon)
        try:
            self._compiled = Template.compile(
                template,
                escape=_safe,
                extra={"daemon": lambda _fields: safe_daemon},
                where="$.path",
            )
        except ValueError as exc:
            raise ValueError(f"path template: {exc}") from None
        self.uses_body = self._compiled.uses_body
        if not [name for name in self._compiled.field_names if name != "daemon"]:
            raise ValueError(
                f"path template {template!r} has no placeholder that differs between "
                "messages ({daemon} does not), so every message would overwrite the same "
                "file: add one such as {id}"
            )

    def render(self, message: Message) -> str:
        """The path for `message`; raises MissingValue if a placeholder has no value."""
        return self._compiled.render(Fields(message))


def _safe(value: str) -> str:
    value = _UNSAFE.sub("_", value)[:_MAX_COMPONENT]
    return "_" if value in ("", ".", "..") else value
