"""A source's `subject`, fixed or templated from a row's columns: `orders.{body.region}`.

A row is its message's body, so a column is `{body.column}` in the template syntax every sink
shares (`busway.adapters._template`). An outbox source usually says
`subject = "{body.subject}"`: each row names its own subject. The older bare `{column}` still
works, with a deprecation warning when the config is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from busway.adapters._template import deprecated, split_fields, warn_once
from busway.adapters.sql._types import render_value
from busway.routers.subject import is_valid_subject

__all__ = ["SubjectTemplate"]


class SubjectTemplate:
    """Renders a subject from a row; `{body.column}` takes that column's value."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.fields: list[str] = []
        self._parts: list[tuple[str, str | None]] = []
        pieces = split_fields(template)
        for index in range(0, len(pieces), 2):
            literal = pieces[index]
            field = pieces[index + 1] if index + 1 < len(pieces) else None
            if field is not None:
                column = field.removeprefix("body.")
                if not column.isidentifier():
                    raise ValueError(
                        f"subject {template!r}: {{{field}}} is not a column; write {{body.column}}"
                    )
                if column == field:
                    warn_once(f"$.subject: {deprecated(template, field, f'body.{field}')}")
                field = column
                self.fields.append(field)
            self._parts.append((literal, field))

    def bind(self, columns: Sequence[str]) -> list[int]:
        """Positions of the template's columns in `columns`; ValueError names a missing one."""
        missing = [field for field in self.fields if field not in columns]
        if missing:
            raise ValueError(
                f"subject {self.template!r} uses column(s) {missing} that the rows do not have "
                f"(they have {list(columns)})"
            )
        return [list(columns).index(field) for field in self.fields]

    def render(self, values: Mapping[str, Any]) -> str:
        """The subject for a row whose template columns have `values`; ValueError if invalid."""
        if not self.fields:
            return self.template
        subject = "".join(
            literal + (render_value(values[field]) if field is not None else "")
            for literal, field in self._parts
        )
        if not is_valid_subject(subject, wildcards=False):
            raise ValueError(f"{subject!r} (from {self.template!r}) is not a valid subject")
        return subject
