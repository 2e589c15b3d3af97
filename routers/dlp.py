"""Data-loss prevention: find card numbers, IBANs, e-mails, your patterns and secret fields.

One `Dlp` serves two uses:

* the `redact` stage runs it over a message's body (`mask_document`, `find`), so the message
  itself leaves without the data, or is dead-lettered;
* busway runs it over the text it shows (`mask_text`): log lines, dead-letter reasons,
  `busway dlq show`, the last error in `/status`.

Detectors are strict on purpose, because text such as logs is full of numbers: a card number
is 12-19 digits (optionally grouped by spaces or dashes) with a known issuer prefix for its
length *and* a valid Luhn check digit; an IBAN must pass its ISO 13616 mod-97 checksum. A
masked value keeps what a person needs to tell two apart (a card's last 4 digits, an IBAN's
country and last 4, an e-mail's domain).

Secret fields are found by name: in a body at any depth, and in text as `"name": value`
(JSON, also when quoted inside another JSON string), `'name': value` and `name=value`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from busway.routers.stages import DlpRules

__all__ = ["Dlp", "Finding", "iban_valid", "is_card_number", "luhn_valid"]

REDACTED = "[redacted]"

# Each starts with a character class, not a look-behind, so `re` can skip ahead to candidates
# quickly; the look-behind after the first character says the same ("not preceded by ...").
_CARD = re.compile(r"[0-9](?<![0-9]{2})(?:[ -]?[0-9]){11,18}(?![0-9])")
_IBAN = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z][0-9]{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@((?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24})"
    r"(?![A-Za-z0-9-])"
)
_SEPARATOR = re.compile(r"[ -]")


class Finding(NamedTuple):
    """What a rule found and where (`$.payment.card`); never the value itself."""

    rule: str
    path: str


def luhn_valid(digits: str) -> bool:
    """True if the last digit of `digits` is the Luhn check digit of the others."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if index % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def _known_issuer(digits: str) -> bool:
    """Issuer prefixes and the lengths their cards have (ISO/IEC 7812 ranges in use)."""
    n = len(digits)
    p2, p3, p4 = int(digits[:2]), int(digits[:3]), int(digits[:4])
    if digits[0] == "4":  # Visa
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:  # Mastercard
        return n == 16
    if p2 in (34, 37):  # American Express
        return n == 15
    if p4 == 6011 or p2 == 65 or 644 <= p3 <= 649 or p2 == 62 or 3528 <= p4 <= 3589:
        return 16 <= n <= 19  # Discover, UnionPay, JCB
    if p2 in (36, 38, 39) or 300 <= p3 <= 305:  # Diners Club
        return 14 <= n <= 19
    if p2 in (50, 56, 57, 58, 63, 67):  # Maestro
        return 12 <= n <= 19
    return False


def is_card_number(digits: str) -> bool:
    """True for a plausible payment card number: known issuer prefix and length, Luhn valid."""
    return (
        12 <= len(digits) <= 19
        and digits.isdigit()
        and _known_issuer(digits)
        and luhn_valid(digits)
    )


def iban_valid(compact: str) -> bool:
    """True if `compact` (no spaces, upper case) passes the IBAN mod-97 checksum."""
    if not 15 <= len(compact) <= 34 or not compact[:2].isalpha() or not compact[2:4].isdigit():
        return False
    rearranged = compact[4:] + compact[:4]
    try:
        number = int("".join(str(int(char, 36)) for char in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def _mask_card(text: str) -> str:
    kept = 4
    out = []
    for char in reversed(text):
        if char.isdigit():
            out.append(char if kept > 0 else "*")
            kept -= 1
        else:
            out.append(char)
    return "".join(reversed(out))


def _mask_iban(text: str) -> str:
    alnum = [i for i, char in enumerate(text) if char.isalnum()]
    keep = set(alnum[:2] + alnum[-4:])
    return "".join(c if i in keep or not c.isalnum() else "*" for i, c in enumerate(text))


def _grouped_prefixes(text: str) -> Iterator[str]:
    """`text` and its prefixes ending before a separator, longest first: a number followed by
    another group (`4111 1111 1111 1111 2025`) is still found."""
    yield text
    cuts = [m.start() for m in _SEPARATOR.finditer(text)]
    for cut in reversed(cuts):
        yield text[:cut]


def _substituter(
    valid: Callable[[str], bool], mask: Callable[[str], str]
) -> Callable[[re.Match[str]], str]:
    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        for candidate in _grouped_prefixes(text):
            if valid(candidate):
                return mask(candidate) + text[len(candidate) :]
        return text

    return replace


def _card_in(text: str) -> bool:
    return is_card_number(_SEPARATOR.sub("", text))


def _iban_in(text: str) -> bool:
    return iban_valid(text.replace(" ", ""))


def _always(_: str) -> bool:
    return True


def _has_at(text: str) -> bool:
    return "@" in text


class _Rule(NamedTuple):
    name: str
    pattern: re.Pattern[str]
    replace: Callable[[re.Match[str]], str] | str
    may_match: Callable[[str], bool] = _always
    """A cheap test that rules the pattern out before it scans (e-mails need an `@`)."""


def _builtin(name: str) -> _Rule:
    if name == "card":
        return _Rule("card", _CARD, _substituter(_card_in, _mask_card))
    if name == "iban":
        return _Rule("iban", _IBAN, _substituter(_iban_in, _mask_iban))
    return _Rule("email", _EMAIL, lambda match: "***@" + match.group(1), _has_at)


class Dlp:
    """Compiled DLP rules: mask or find what they match in text and in JSON documents."""

    def __init__(self, rules: DlpRules) -> None:
        self.rules = [_builtin(name) for name in dict.fromkeys(rules.builtins)]
        self.rules += [
            _Rule(p.name, re.compile(p.regex), p.mask.replace("\\", "\\\\")) for p in rules.patterns
        ]
        self.fields = frozenset(name.lower() for name in rules.fields)
        self._field_patterns = _field_patterns(self.fields) if self.fields else ()
        self.empty = not self.rules and not self.fields

    # -- text --------------------------------------------------------------------------------

    def mask_text(self, text: str) -> str:
        """`text` with secret fields' values and every rule's matches masked."""
        for pattern, replacement in self._field_patterns:
            text = pattern.sub(replacement, text)
        for rule in self.rules:
            if rule.may_match(text):
                text = rule.pattern.sub(rule.replace, text)
        return text

    def _text_hit(self, text: str) -> str | None:
        for rule in self.rules:
            if not rule.may_match(text):
                continue
            for match in rule.pattern.finditer(text):
                replace = rule.replace
                if isinstance(replace, str) or replace(match) != match.group(0):
                    return rule.name
        return None

    # -- documents ---------------------------------------------------------------------------

    def mask_document(self, value: Any) -> Any:
        """`value` with secret fields masked and rule matches masked in strings (and card
        numbers written as JSON integers); objects and arrays are changed in place."""
        if isinstance(value, str):
            return self.mask_text_value(value)
        if isinstance(value, dict):
            for key, child in value.items():
                if key.lower() in self.fields:
                    value[key] = REDACTED
                else:
                    value[key] = self.mask_document(child)
            return value
        if isinstance(value, list):
            for index, child in enumerate(value):
                value[index] = self.mask_document(child)
            return value
        if isinstance(value, int) and not isinstance(value, bool) and self._card_int(value):
            return _mask_card(str(value))
        return value

    def mask_text_value(self, text: str) -> str:
        """A string value with every rule's matches masked (field names do not apply)."""
        for rule in self.rules:
            if rule.may_match(text):
                text = rule.pattern.sub(rule.replace, text)
        return text

    def find(self, value: Any, path: str = "$") -> Finding | None:
        """The first thing a rule finds in `value`, with its JSON path; None if clean."""
        if isinstance(value, str):
            rule = self._text_hit(value)
            return Finding(rule, path) if rule is not None else None
        if isinstance(value, dict):
            for key, child in value.items():
                where = f"{path}.{key}"
                if key.lower() in self.fields and child not in (None, "", REDACTED):
                    return Finding("field", where)
                found = self.find(child, where)
                if found is not None:
                    return found
            return None
        if isinstance(value, list):
            for index, child in enumerate(value):
                found = self.find(child, f"{path}[{index}]")
                if found is not None:
                    return found
            return None
        if isinstance(value, int) and not isinstance(value, bool) and self._card_int(value):
            return Finding("card", path)
        return None

    def _card_int(self, value: int) -> bool:
        return any(rule.name == "card" for rule in self.rules) and is_card_number(str(value))


def _field_patterns(fields: frozenset[str]) -> tuple[tuple[re.Pattern[str], str], ...]:
    names = "|".join(re.escape(name) for name in sorted(fields, key=len, reverse=True))
    value = r"(?:\\.|[^\"\\])*"
    return (
        # JSON quoted inside a JSON string: \"password\": \"...\"
        (
            re.compile(rf'(\\"(?:{names})\\"\s*:\s*)(?:\\"(?:(?!\\").)*\\"|[^\s,}}\]\\]+)', re.I),
            rf'\1\\"{REDACTED}\\"',
        ),
        # JSON: "password": "..." or a non-string value
        (
            re.compile(rf'("(?:{names})"\s*:\s*)(?:"{value}"|[^\s,}}\]"]+)', re.I),
            rf'\1"{REDACTED}"',
        ),
        # Python reprs: 'password': '...'
        (re.compile(rf"('(?:{names})'\s*:\s*)(?:'[^']*'|[^\s,}}\]]+)", re.I), rf"\1'{REDACTED}'"),
        # name=value (query strings, forms, key=value logs)
        (re.compile(rf"(?<![A-Za-z0-9_])((?:{names})=)[^&\s,;\"']+", re.I), rf"\1{REDACTED}"),
    )
