"""The stages a route may list between `from` and `to`, as they are written in busway.toml.

A stage is a table with exactly one key naming its kind, so a route reads top to bottom like
the pipeline it is:

    [[routes]]
    name = "orders"
    from = "orders.in.>"
    to = ["orders.accepted"]
    stages = [
      { filter = "total > `0`" },
      { set = { "meta.source" = "'web'" } },
      { switch = { cases = [{ when = "country == 'NL'", to = ["orders.nl"] }] } },
    ]

These are plain msgspec structs (no behaviour): `busway.routers.pipeline` compiles them. They
live here rather than with the engine's config so the routers stay testable on their own.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from busway.routers.durations import Duration

__all__ = [
    "AggregateStage",
    "CryptoStage",
    "DedupeStage",
    "DlpPattern",
    "DlpRules",
    "EnrichStage",
    "KeySource",
    "PythonStage",
    "RedactStage",
    "SignatureStage",
    "SplitStage",
    "StageConfig",
    "SwitchCase",
    "SwitchStage",
    "ThrottleStage",
    "ValidateStage",
]


class _Table(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class SwitchCase(_Table, frozen=True, kw_only=True):
    """One branch of a content-based router: where a message matching `when` goes."""

    when: str
    """JMESPath predicate over the body (as the stages before left it); truthy = this case."""
    to: list[str]
    """Subjects the message is published to when `when` matches; each must be captured by a
    declared stream."""


class SwitchStage(_Table, frozen=True, kw_only=True):
    """Content-based router: the first case that matches picks the destinations.

    With `all = true` every matching case contributes its destinations (a recipient list).
    `default` receives what no case matched; without it such messages are filtered.
    """

    cases: list[SwitchCase]
    """The branches, tried in order: `[{ when = "...", to = ["..."] }, ...]`."""
    default: list[str] = []
    """Subjects for a message no case matched; empty = such a message is filtered (acked,
    counted in `busway_messages_filtered_total`)."""
    all: bool = False
    """`true`: every matching case adds its destinations (a recipient list, each subject
    published once); `false`: the first match decides."""


class SplitStage(_Table, frozen=True, kw_only=True):
    """One message per element of the array `on` evaluates to."""

    on: str
    """Expression giving the array to split (`"lines"`); each element becomes one message's
    body. A value that is not an array dead-letters the message."""
    correlation_id: str | None = None
    """Expression for the `Busway-Correlation-Id` header; default `<stream>:<seq>` of the input."""


class AggregateStage(_Table, frozen=True, kw_only=True):
    """Collect messages with the same `by` key into one, on `count`, `complete_when` or `timeout`.

    The aggregate's body is `into` evaluated over `{key, count, messages}` (default: that
    object itself). Inputs stay un-acked until the aggregate is stored; see the README.
    """

    by: str
    """Expression giving the group key (`"order_id"`); messages with equal keys are collected
    together."""
    count: int | None = None
    """Complete a group once it holds this many messages; at most the route's
    `max_in_flight` (inputs stay un-acked until the aggregate is stored)."""
    timeout: Duration | None = None
    """Complete a group this long after its first message arrived (start times are kept in
    the state bucket, so a restart does not reset them); keep it under `ack_wait` plus a
    restart."""
    complete_when: str | None = None
    """Predicate over `{key, count, messages}`, checked after each arrival: true completes
    the group."""
    into: str | None = None
    """Expression over `{key, count, messages}` giving the aggregate's body (default: that
    object itself)."""

    def __post_init__(self) -> None:
        if self.count is None and self.timeout is None and self.complete_when is None:
            raise ValueError("aggregate needs `count`, `timeout` or `complete_when` to complete")
        if self.count is not None and self.count < 1:
            raise ValueError("aggregate `count` must be at least 1")


class EnrichStage(_Table, frozen=True, kw_only=True):
    """Ask another route (or any NATS service) and merge its answer into the body.

    `request` is a subject; the request body is `body` evaluated on the message (default the
    whole body). The JSON answer is stored at the dotted path `into` (default: merged into the
    top-level object).
    """

    request: str
    """Subject the request is sent to (no wildcards): a route ending in a `reply` stage, or
    any NATS service."""
    body: str | None = None
    """Expression giving the request body (default: the whole message body)."""
    into: str | None = None
    """Dotted path where the JSON answer is stored (`"customer"`); default: the answer's keys
    are merged into the top-level object."""
    timeout: Duration = Duration(5.0)
    """How long to wait for the answer; none in time = a transient failure, retried with
    the route's back-off."""


class DedupeStage(_Table, frozen=True, kw_only=True):
    """Drop a message whose `key` was already seen within `window` (kept in JetStream KV)."""

    key: str
    """Expression giving the key two messages are the same by (`"event_id"`)."""
    window: Duration = Duration(600.0)
    """How long a key is remembered (the TTL of the stage's KV bucket
    `busway_dedupe_<route>_<stage>`); a repeat after that passes."""


class PythonStage(_Table, frozen=True, kw_only=True):
    """Your function with its limits: `{ python = { function = "pkg.rules:f", timeout = "5s" } }`.

    A call that overruns `timeout` is retried like any transient error (naked with back-off,
    dead-lettered after `max_attempts`); its result, should it still come, is discarded.
    """

    function: str
    """`module:function`, sync or `async`: `f(body)` or `f(body, context)`."""
    timeout: Duration | None = None
    """Longest one call may take; default the smaller of 10 s and a third of the route's
    `ack_wait`. The message is kept alive meanwhile, so a longer timeout is allowed."""
    threads: int = 8
    """A synchronous function runs in worker threads, at most this many at once. A call past
    its `timeout` keeps its thread until it returns (Python cannot stop a thread), so a
    function that hangs for good ends up holding all of them: the route then waits, and
    reports itself stalled, rather than start threads without end."""

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("python `timeout` must be a positive duration")
        if self.threads < 1:
            raise ValueError("python `threads` must be at least 1")


class ThrottleStage(_Table, frozen=True, kw_only=True):
    """At most `rate` messages per `per` (per `key` value if given); excess waits, never drops."""

    rate: int
    """Messages allowed per `per` (and the burst size); at least 1."""
    per: Duration = Duration(1.0)
    """The window `rate` counts in."""
    key: str | None = None
    """Expression giving a key to throttle each value separately (`"customer_id"`); default:
    one limit for the whole route. Limits are per daemon."""

    def __post_init__(self) -> None:
        if self.rate < 1:
            raise ValueError("throttle `rate` must be at least 1")
        if self.per <= 0:
            raise ValueError("throttle `per` must be a positive duration")


class ValidateStage(_Table, frozen=True, kw_only=True):
    """Check the body against a JSON Schema file or a msgspec type (`module:Type`)."""

    schema: str | None = None
    """A JSON Schema file, relative to the config file; its `$schema` picks the draft
    (default 2020-12). Checked at start-up."""
    type: str | None = None
    """A msgspec type the body must decode as, `"module:Type"` (instead of `schema`)."""

    def __post_init__(self) -> None:
        if (self.schema is None) == (self.type is None):
            raise ValueError("validate takes exactly one of `schema` (a file) or `type`")


_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class KeySource(_Table, frozen=True, kw_only=True):
    """Where one key is: `{ id = "2025-06", file = "keys/2025-06.key" }` or `env = "VAR"`.

    The config names the key's place, never the key. Keys are read and checked at start-up.
    """

    id: str
    """The key's id (letters, digits, `.`, `_`, `-`; at most 64): written into every
    envelope and signature, so a receiver knows which key to use."""
    file: str | None = None
    """A file holding the key (relative to the config file). AES: 32 raw bytes, 64 hex
    digits or base64; HMAC: the secret (at least 32 bytes); Ed25519: a PEM."""
    env: str | None = None
    """An environment variable holding the key (AES: hex or base64; HMAC: the secret;
    Ed25519: the PEM text), instead of `file`."""

    def __post_init__(self) -> None:
        if not _KEY_ID.match(self.id):
            raise ValueError(
                f"key id {self.id[:70]!r} must be 1-64 letters, digits, '.', '_' or '-'"
            )
        if (self.file is None) == (self.env is None):
            raise ValueError(f"key {self.id!r} takes exactly one of `file` or `env`")


def _check_keys(keys: list[KeySource], stage: str) -> None:
    if not keys:
        raise ValueError(f"{stage} needs at least one key in `keys`")
    ids = [key.id for key in keys]
    duplicates = sorted({kid for kid in ids if ids.count(kid) > 1})
    if duplicates:
        raise ValueError(f"{stage} lists key id {duplicates[0]!r} twice")


class CryptoStage(_Table, frozen=True, kw_only=True):
    """`encrypt` / `decrypt`: AES-256-GCM envelopes of fields or of the whole body.

    `{ encrypt = { fields = ["card.number"], keys = [{ id = "k2", file = "keys/k2.key" }] } }`
    """

    keys: list[KeySource]
    """The AES-256 keys: the first encrypts; any listed key decrypts. To rotate, put the new
    key first and keep the old ones listed until their messages are gone."""
    fields: list[str] = []
    """Dotted paths of the values to encrypt/decrypt (absent ones are skipped); empty = the
    whole body becomes (or is) one envelope. `decrypt` must name the paths `encrypt` used."""

    def __post_init__(self) -> None:
        _check_keys(self.keys, "encrypt/decrypt")


class SignatureStage(_Table, frozen=True, kw_only=True):
    """`sign` / `verify`: Ed25519 or HMAC-SHA256 over the body's canonical form.

    `{ sign = { algorithm = "ed25519", keys = [{ id = "s1", file = "keys/s1.pem" }] } }`
    """

    algorithm: str
    """`ed25519` (keys are PEM files: a private key to sign, a public key to verify) or
    `hmac-sha256` (a shared secret of at least 32 bytes)."""
    keys: list[KeySource]
    """The keys: the first signs; any listed key verifies (rotation, several senders)."""
    header: str | None = None
    """The header carrying the signature (default `Busway-Signature`, unless `field` is set)."""
    field: str | None = None
    """A top-level body field carrying the signature instead of a header; it is left out of
    the signed form, and `verify` removes it once checked."""

    def __post_init__(self) -> None:
        if self.algorithm not in ("ed25519", "hmac-sha256"):
            raise ValueError(
                f"unknown signature algorithm {self.algorithm[:40]!r}: use 'ed25519' or "
                "'hmac-sha256'"
            )
        _check_keys(self.keys, "sign/verify")
        if self.header is not None and self.field is not None:
            raise ValueError("sign/verify take `header` or `field`, not both")
        if self.field is not None and ("." in self.field or not self.field):
            raise ValueError("a signature `field` is a top-level key (no dots)")


class DlpPattern(_Table, frozen=True, kw_only=True):
    """A rule of your own: `{ name = "order-ref", regex = 'ORD-[0-9]{8}' }`."""

    name: str
    """The rule's name, used in dead-letter reasons and metrics (never the matched text)."""
    regex: str
    """A Python regular expression; every match in a string value (or shown text) is a hit."""
    mask: str = "[redacted]"
    """What a match is replaced with."""

    def __post_init__(self) -> None:
        try:
            re.compile(self.regex)
        except re.error as exc:
            raise ValueError(f"pattern {self.name!r}: bad regex: {exc}") from None


class DlpRules(_Table, frozen=True, kw_only=True):
    """Data-loss-prevention rules: built-in detectors, your patterns, and secret field names."""

    builtins: list[Literal["card", "iban", "email"]] = msgspec.field(
        default_factory=lambda: ["card"]
    )
    """Built-in detectors: `card` (payment card numbers: known issuer prefixes and lengths,
    Luhn check; all but the last 4 digits masked), `iban` (ISO 13616 checksum; all but the
    country and last 4 masked), `email` (the part before `@` masked)."""
    patterns: list[DlpPattern] = []
    """Your own rules: `[{ name = "ssn", regex = "...", mask = "***" }]`."""
    fields: list[str] = msgspec.field(
        default_factory=lambda: ["password", "secret", "token", "api_key", "authorization"]
    )
    """Field names (any depth, case-insensitive) whose whole value is a secret and masked."""


class RedactStage(DlpRules, frozen=True, kw_only=True):
    """Apply DLP rules to the message itself: mask what they find, or dead-letter it."""

    action: Literal["mask", "dead_letter"] = "mask"
    """`mask`: replace what the rules find and pass the message on; `dead_letter`: a message
    in which any rule finds something is dead-lettered at once (reason `dlp`, naming the rule
    and the path, never the value)."""
    paths: list[str] = []
    """Dotted paths to look in (each value searched at every depth); empty = the whole body."""


class StageConfig(_Table, frozen=True, kw_only=True):
    """One stage: exactly one of these keys is set."""

    filter: str | None = None
    """JMESPath predicate: keep what matches; a message with nothing left is acked as
    filtered."""
    transform: str | None = None
    """JMESPath mapping; its result is the new body."""
    set: dict[str, str] | None = None
    """`{ "dotted.path" = "expression" }`: write each result at its path (all computed from
    the body before the stage)."""
    remove: list[str] | None = None
    """Dotted paths to delete (absent ones are fine)."""
    rename: dict[str, str] | None = None
    """`{ new.path = "old.path" }`: move values between paths."""
    python: str | PythonStage | None = None
    """Your function: `"module:function"`, or a table with `function`, `timeout`, `threads`."""
    split: str | SplitStage | None = None
    """One message per element of an array: the expression (`"lines"`), or a table with `on`
    and `correlation_id`."""
    switch: SwitchStage | None = None
    """Content-based router: the first matching case (or every one, with `all`) picks the
    destinations instead of `to`."""
    aggregate: AggregateStage | None = None
    """Collect messages with the same key into one."""
    enrich: EnrichStage | None = None
    """Ask another route or NATS service and merge its JSON answer into the body."""
    wiretap: str | None = None
    """Subject where a copy of the message, as it is at this stage, is stored; its failures
    are counted, never hold the input back."""
    dedupe: DedupeStage | None = None
    """Drop a message whose key was already seen within a window."""
    throttle: ThrottleStage | None = None
    """At most `rate` messages per `per`; excess waits (back-pressure), never dropped."""
    validate: ValidateStage | None = None
    """Check the body against a JSON Schema or a msgspec type; failures are dead-lettered."""
    set_headers: dict[str, str] | None = None
    """`{ Header-Name = "expression" }`: add headers (non-strings as JSON; null = not set)."""
    reply: str | None = None
    """Answer a request: publish `reply` (an expression; `@` for the body) to its reply inbox."""
    encrypt: CryptoStage | None = None
    """Replace fields (or the whole body) by AES-256-GCM envelopes carrying the key id."""
    decrypt: CryptoStage | None = None
    """Open envelopes with any listed key; a wrong/unknown key id, a tampered or malformed
    envelope dead-letters the message (reason `decrypt`)."""
    sign: SignatureStage | None = None
    """Sign the body's canonical form (Ed25519 or HMAC-SHA256) into a header or field."""
    verify: SignatureStage | None = None
    """Check the body's signature; a missing, unknown-key or wrong one dead-letters the
    message (reason `signature`)."""
    redact: RedactStage | None = None
    """Mask card numbers, IBANs, e-mails, your patterns and secret fields in the message, or
    dead-letter a message holding any (reason `dlp`)."""

    def __post_init__(self) -> None:
        kinds = self.kinds()
        if len(kinds) != 1:
            names = ", ".join(kinds) if kinds else "none"
            raise ValueError(
                f"a stage has exactly one kind (filter, transform, set, ...); found {names}"
            )

    def kinds(self) -> list[str]:
        """The keys that are set (exactly one in a valid stage)."""
        return [name for name in self.__struct_fields__ if getattr(self, name) is not None]

    @property
    def kind(self) -> str:
        """This stage's kind: `filter`, `transform`, `switch`..."""
        return self.kinds()[0]
