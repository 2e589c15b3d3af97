"""URL and header templates of the HTTP sink: the shared syntax (`busway.adapters._template`)
with what a URL and a header need on top.

    url = "https://crm.example/api/customers/{body.customer.id}/orders?region={subject[1]}"
    headers = { "X-Tenant" = "{header.X-Tenant}", "X-Order" = "{id}" }

In a URL every value is percent-encoded (a `/` in a customer id stays inside its path
segment), and the scheme and host must be literal, so a message can never choose which server
receives it. In a header a value holding a line break fails the message (it would end the
header early). A field a message lacks, or whose value is an object, array or null, makes that
message fail permanently (dead letter): retrying cannot add a field.
"""

from __future__ import annotations

import re
from urllib.parse import quote

from busway.adapters._template import Fields, no_line_breaks
from busway.adapters._template import Template as _Template

__all__ = ["MessageFields", "Template"]

MessageFields = Fields
"""One message's template values (the shared `Fields`)."""

# scheme://host[:port] followed by the start of the path or query (or the end).
_ORIGIN = re.compile(r"^https?://[^/?#\s]+(?=[/?]|$)", re.IGNORECASE)


def _url_value(value: str) -> str:
    return quote(value, safe="")


class Template:
    """Compiles the HTTP sink's templates; `compile(text, url=...)` gives a shared Template."""

    @staticmethod
    def compile(text: str, *, url: bool) -> _Template:
        """Compile `text`; ValueError naming the bad field or, for URLs, a templated host."""
        escape = _url_value if url else no_line_breaks("a header")
        template = _Template.compile(text, escape=escape, where="$.url" if url else "$.headers")
        if url:
            _check_url(template)
        return template


def _check_url(template: _Template) -> None:
    text, parts = template.text, template.parts
    first = parts[0] if parts and isinstance(parts[0], str) else ""
    if not first.lower().startswith(("http://", "https://")):
        raise ValueError(f"url {text!r} must start with http:// or https://")
    found = _ORIGIN.match(first)
    if found is None or (len(parts) > 1 and found.end() == len(first)):
        raise ValueError(
            f"url {text!r}: the scheme and host must be literal, so a message cannot "
            "choose the server (template only the path and query)"
        )
