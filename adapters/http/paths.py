"""Subjects templated from path parameters: `/orders/{region}` publishes to `orders.{region}`.

The subject template is compiled once, when the config is decoded, into literal parts and
parameter names; a request only joins strings. A path parameter becomes one subject token, so
it must not contain what NATS reads as structure (`.` splits tokens, `*` and `>` are wildcards)
nor whitespace: such a request is refused with 400 rather than published somewhere unexpected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from busway.routers.subject import is_valid_subject

__all__ = ["SubjectTemplate", "path_parameters"]

_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}")
_UNSAFE_TOKEN = re.compile(r"[.*>\s\x00-\x1f\x7f]")
MAX_TOKEN_LENGTH = 128


def path_parameters(path: str) -> list[str]:
    """The `{name}` parameters of a Starlette path, in order."""
    return _PARAMETER.findall(path)


class UnsafeToken(ValueError):
    """A path parameter that cannot be one subject token."""

    def __init__(self, name: str, value: str) -> None:
        self.name = name
        super().__init__(
            f"path parameter {name!r} = {value[:MAX_TOKEN_LENGTH]!r} cannot be a subject token: "
            f"it must be 1-{MAX_TOKEN_LENGTH} characters without '.', '*', '>' or whitespace"
        )


@dataclass(frozen=True, slots=True)
class SubjectTemplate:
    """`orders.{region}` compiled: literal text alternating with parameter names."""

    literals: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def compile(cls, subject: str, path: str) -> SubjectTemplate:
        """Compile `subject`; ValueError if it names a parameter `path` lacks or is malformed."""
        available = set(path_parameters(path))
        literals: list[str] = []
        names: list[str] = []
        position = 0
        for found in re.finditer(r"\{([^{}]*)\}", subject):
            name = found.group(1)
            if name not in available:
                raise ValueError(
                    f"subject {subject!r} uses {{{name}}} but path {path!r} has no such "
                    f"parameter (it has: {', '.join(sorted(available)) or 'none'})"
                )
            literals.append(subject[position : found.start()])
            names.append(name)
            position = found.end()
        literals.append(subject[position:])
        template = cls(tuple(literals), tuple(names))
        pattern = template.render(dict.fromkeys(names, "*"), check=False)
        if "{" in pattern or "}" in pattern or not is_valid_subject(pattern, wildcards=True):
            raise ValueError(
                f"invalid subject template {subject!r}: expected dot-separated tokens where "
                "each {parameter} stands for one whole token"
            )
        for name in names:
            # `orders.x{region}` would let a parameter build half a token: refuse, it is a typo.
            if f".{{{name}}}" not in f".{subject}." or f"{{{name}}}." not in f".{subject}.":
                raise ValueError(f"subject template {subject!r}: {{{name}}} must be a whole token")
        return template

    @property
    def pattern(self) -> str:
        """The subjects this template can produce, as a NATS wildcard pattern."""
        return self.render(dict.fromkeys(self.names, "*"), check=False)

    def render(self, values: Mapping[str, str], *, check: bool = True) -> str:
        """The subject for these path parameters; UnsafeToken if one cannot be a token."""
        if not self.names:
            return self.literals[0]
        parts = [self.literals[0]]
        for name, literal in zip(self.names, self.literals[1:], strict=True):
            value = values[name]
            if check and (
                not value or len(value) > MAX_TOKEN_LENGTH or _UNSAFE_TOKEN.search(value)
            ):
                raise UnsafeToken(name, value)
            parts.append(value)
            parts.append(literal)
        return "".join(parts)
