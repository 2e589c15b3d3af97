"""A source's `subject`, fixed or templated from a row's columns: `orders.{region}`.

An outbox source usually says `subject = "{subject}"`: each row names its own subject.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

from busway.adapters.sql._types import render_value
from busway.routers.subject import is_valid_subject

__all__ = ["SubjectTemplate"]


class SubjectTemplate:
    """Renders a subject from a row; `{column}` takes that column's value."""

    def __init__(self, template: str) -> None:
        self.template = template
        self.fields: list[str] = []
        self._parts: list[tuple[str, str | None]] = []
        for literal, field, spec, conversion in string.Formatter().parse(template):
            if spec or conversion:
                raise ValueError(f"subject {template!r}: write plain {{column}} placeholders")
            if field is not None and not field.isidentifier():
                raise ValueError(f"subject {template!r}: {{{field}}} is not a column name")
            self._parts.append((literal, field))
            if field is not None:
                self.fields.append(field)

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
