"""Load a user's function or type from `"module:attribute"`, with errors that say what to fix."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["load_object"]


def load_object(reference: str) -> Any:
    """Import `module:attribute` (dotted attributes allowed); ValueError explains failures."""
    module_name, colon, attribute = reference.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"expected 'module:name', got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"cannot import module {module_name!r} for {reference!r}: {exc} "
            "(is it installed, or on PYTHONPATH?)"
        ) from None
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no {attribute!r}") from None
    return value
