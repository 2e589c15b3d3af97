"""The `redact` stage: data-loss-prevention rules applied to the message itself.

`action = "mask"` rewrites what the rules find (the message goes on without the data);
`action = "dead_letter"` dead-letters a message in which any rule finds something, at once
(reason `dlp`, a permanent error). The dead letter's reason names the rule and the JSON path
(`card at $.payment.number`), never the value; the dead letter's body is the input untouched,
like every dead letter's (for replay), so protect the dead-letter stream accordingly (`busway
dlq show` masks it on display).
"""

from __future__ import annotations

from busway.routers.context import MessageContext
from busway.routers.dlp import Dlp
from busway.routers.paths import PathError, parse_path
from busway.routers.pipeline import Item, Output, RoutingError, Step
from busway.routers.stages import RedactStage

__all__ = ["DLP_RULE_HEADER", "RedactStageError", "redact"]

#: The header on a dead letter naming the DLP rule that matched (`card`, `iban`, your name).
DLP_RULE_HEADER = "Busway-Dlp-Rule"


class RedactStageError(ValueError):
    """A `redact` stage does not compile; `field` says where."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def redact(spec: RedactStage, field: str) -> Step:
    """The step for a `redact` stage found at `field` (`stages[2].redact`)."""
    dlp = Dlp(spec)
    paths = []
    for index, text in enumerate(spec.paths):
        try:
            paths.append(parse_path(text))
        except PathError as exc:
            raise RedactStageError(f"{field}.paths[{index}]", str(exc)) from None
    dead_letter = spec.action == "dead_letter"

    def check(item: Item) -> None:
        if not paths:
            found = dlp.find(item.document)
        else:
            found = None
            for path in paths:
                present, value = path.get(item.document)
                if present:
                    found = dlp.find(value, f"$.{path.text}")
                    if found is not None:
                        break
        if found is not None:
            what = "a secret field" if found.rule == "field" else f"a match of rule {found.rule!r}"
            raise RoutingError(
                "dlp",
                f"{field}: the message holds {what} at {found.path}; "
                "dead-lettered by the data-loss-prevention rules",
                stage=field,
                headers={DLP_RULE_HEADER: found.rule},
            )

    def mask(item: Item) -> None:
        if not paths:
            item.document = dlp.mask_document(item.document)
            return
        for path in paths:
            present, value = path.get(item.document)
            if present:
                path.set(item.document, dlp.mask_document(value))

    def redact_step(items: list[Item], _c: MessageContext | None, _o: list[Output]) -> list[Item]:
        for item in items:
            try:
                if dead_letter:
                    check(item)
                else:
                    mask(item)
            except PathError as exc:
                raise RoutingError("dlp", f"{field}: {exc}", stage=field) from None
        return items

    return redact_step, False
