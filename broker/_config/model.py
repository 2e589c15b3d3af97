"""Configuration as typed data: TOML decoded once into frozen structs, then checked as a whole.

Decoding runs in three steps, each reporting errors as `ConfigError(file, $.key.path, line)`:

1. TOML is parsed, checked for what no setting can hold (deep nesting, NUL characters) and
   `${ENV_VAR}` / `${file:/path}` references in strings are resolved (`$${` escapes a literal
   `${`), so secrets stay out of the file: `busway._config.document`.
2. msgspec converts the document into the structs below (`forbid_unknown_fields` catches typos).
   Sources and sinks are tagged on `type` and decoded by the struct their adapter registered.
3. The topology is checked: unique names, valid subjects, every subject read or written is
   captured by a declared stream and none overlaps busway's own, and no route feeds itself
   (longer route cycles are `busway._config.cycles`' job, when the plan is built).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import msgspec

from busway._config.document import (
    MAX_CONFIG_BYTES,
    check_values,
    interpolate,
    parse_toml,
    read_bounded,
    short,
)
from busway._config.lines import key_line, line_of, locate_in_file
from busway._errors import ConfigError
from busway.routers.durations import Duration, decode_hook, parse_duration
from busway.routers.stages import DlpRules, StageConfig
from busway.routers.subject import covers, is_valid_subject, overlaps

__all__ = [
    "AuditConfig",
    "CircuitConfig",
    "ClientLimit",
    "ClusterConfig",
    "Config",
    "DeadLetterConfig",
    "HttpConfig",
    "NatsConfig",
    "RedactionConfig",
    "RetryPolicy",
    "RouteConfig",
    "SinkConfig",
    "SourceConfig",
    "StreamConfig",
    "TracingConfig",
    "decode_config",
    "load_config",
    "locate_in_file",
]

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_T = TypeVar("_T")


_HOST = re.compile(r"^(\[[0-9A-Fa-f:.%A-Za-z]+\]|[A-Za-z0-9_.\-]+)$")


def split_listen(listen: str) -> tuple[str, int]:
    """`(host, port)` of a `host:port` listen address; ValueError saying what is expected."""
    host, sep, port = listen.rpartition(":")
    if (
        not sep
        or not _HOST.match(host)
        or not port.isascii()
        or not port.isdigit()
        or not 0 <= int(port) <= 65535
    ):
        raise ValueError(f"expected host:port such as '127.0.0.1:8080', got {short(listen)!r}")
    return host.strip("[]"), int(port)


def _check_listen(listen: str) -> None:
    try:
        split_listen(listen)
    except ValueError as exc:
        raise ValueError(f"listen: {exc}") from None


def _check_server_url(url: str) -> None:
    """A `[nats] servers` entry as nats-py reads it: `[scheme://][user@]host[:port]`."""
    parsed = urlsplit(url if "://" in url else f"nats://{url}")
    try:
        parsed.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        parsed = parsed._replace(netloc="")
    if parsed.scheme not in ("nats", "tls", "ws", "wss") or not parsed.hostname:
        raise ValueError(
            f"servers: expected a URL such as 'nats://127.0.0.1:4222', got {short(url)!r}"
        )


Count = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
"""A positive count with a sanity ceiling (in-flight messages, batch sizes, attempts)."""


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every config table: immutable, keyword-only, unknown keys rejected."""


class RetryPolicy(_Strict, frozen=True, kw_only=True):
    """How often and how patiently a failing message is retried before it is dead-lettered.

    The n-th redelivery waits `min(backoff * 2**(n-1), max_backoff)`, with ±20 % jitter so a
    burst of failures does not come back as a burst.
    """

    max_attempts: Count = 10
    """Attempts before a message is dead-lettered: failures busway retried, and crashes of the
    daemon while the message was processed alone; not JetStream's redeliveries (see
    "Poison messages"). Keep it above `circuit.failures` for sinks.
    """
    backoff: Duration = Duration(0.5)
    """First retry delay; doubles per attempt (±20 % jitter) up to `max_backoff`."""
    max_backoff: Duration = Duration(60.0)
    """Longest delay between attempts."""
    schedule: list[Duration] = []
    """Explicit delays, one per retry (`["1s", "10s", "1m"]`, the last repeats); replaces
    `backoff`."""
    permanent: list[str] = []
    """Error reasons to dead-letter at once instead of retrying (e.g. `["enrich"]`)."""
    transient: list[str] = []
    """Error reasons to retry although busway would dead-letter them at once (e.g.
    `["validation"]` while a schema is being fixed)."""

    def is_transient(self, reason: str, *, default: bool) -> bool:
        """Whether a failure of kind `reason` is retried: the policy's lists, else `default`."""
        if reason in self.permanent:
            return False
        if reason in self.transient:
            return True
        return default


class NatsUser(_Strict, frozen=True, kw_only=True):
    """A client of the embedded nats-server other than busway (a device, a tool), with the
    subjects it may use; everything else is denied to it."""

    user: str
    """Its user name."""
    password: str | None = None
    """Its password (or give `nkey`); secrets via `${ENV}` or `${file:...}`."""
    nkey: str | None = None
    """Its NKey public key (`U...`), instead of a password: it signs in with the seed."""
    publish: list[str] = []
    """Subjects (wildcards allowed) it may publish to; a subject a stream captures is stored."""
    subscribe: list[str] = []
    """Subjects it may subscribe to; add `_INBOX.>` for replies (a JetStream PubAck too)."""

    def __post_init__(self) -> None:
        if (self.password is None) == (self.nkey is None):
            raise ValueError(f"user {short(self.user)!r}: give one of `password` and `nkey`")
        if self.nkey is not None and not re.fullmatch(r"U[A-Z2-7]{55}", self.nkey):
            raise ValueError(
                f"user {short(self.user)!r}: nkey must be an NKey user public key ('U' and "
                "55 more characters), not a seed"
            )
        for value in [self.user, self.password or "", *self.publish, *self.subscribe]:
            if not value or _UNSAFE_IN_SERVER_CONFIG.search(value):
                raise ValueError(
                    f"user {short(self.user)!r}: names, passwords and subjects must be non-empty, "
                    "without quotes, backslashes or control characters (they go into the "
                    "embedded server's config file)"
                )
        for subject in [*self.publish, *self.subscribe]:
            if not is_valid_subject(subject, wildcards=True):
                raise ValueError(f"user {short(self.user)!r}: {short(subject)!r} is not a subject")


class EmbeddedNatsSecurity(_Strict, frozen=True, kw_only=True):
    """`[nats.embedded]`: TLS and users of the embedded nats-server (ignored with `servers`)."""

    tls_cert: str | None = None
    """PEM certificate (chain) of the embedded server: with `tls_key`, every client must use
    TLS. busway trusts it for its own connection unless `[nats] tls_ca` says otherwise."""
    tls_key: str | None = None
    """PEM private key of `tls_cert`."""
    tls_client_ca: str | None = None
    """PEM CA file: clients must present a certificate it signed (mTLS); busway presents
    `[nats] tls_cert`."""
    authorization: bool = False
    """Clients must sign in: busway with an NKey made at each start, allowed only the subjects
    its config uses; others as one of `users`. Listing `users` turns this on too."""
    users: list[NatsUser] = []
    """Other clients (devices, tools) and the subjects each may publish and subscribe to."""

    @property
    def tls(self) -> bool:
        """Whether the embedded server requires TLS."""
        return self.tls_cert is not None

    @property
    def requires_auth(self) -> bool:
        """Whether clients of the embedded server must sign in."""
        return self.authorization or bool(self.users)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both `tls_cert` and `tls_key`")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs TLS: set `tls_cert` and `tls_key` as well")
        for value in (self.tls_cert, self.tls_key, self.tls_client_ca):
            if value is not None and _UNSAFE_IN_SERVER_CONFIG.search(value):
                raise ValueError(
                    f"{short(value)!r}: quotes, backslashes and control characters cannot go "
                    "into the embedded server's config file"
                )
        names = [user.user for user in self.users]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"user {short(name)!r} is listed twice")


class NatsConfig(_Strict, frozen=True, kw_only=True):
    """Where JetStream is. Without `servers`, busway runs an embedded nats-server."""

    servers: list[str] | None = None
    """NATS URLs (`nats://host:4222`); without it busway runs an embedded nats-server."""
    data_dir: str = "var/nats"
    """Embedded server: JetStream store, config, log, pid file and `busway.lock` (one daemon per
    data_dir)."""
    listen: str = "127.0.0.1:4222"
    """Embedded server: client address (port 0 = any free port); a port another process holds
    is a start-up error, never shared."""
    sync: str = "always"
    """Embedded server: `"always"` fsyncs before every PubAck; a duration such as `"1s"` trades
    safety for speed.
    """
    name: str = "busway"
    """Client connection name, as monitoring tools show it."""
    user: str | None = None
    """User for `servers` (with `password`); secrets via `${ENV}` or `${file:...}`."""
    password: str | None = None
    """Password of `user`."""
    token: str | None = None
    """Token authentication to `servers`."""
    credentials: str | None = None
    """A `.creds` file (user JWT + NKey seed) for `servers`, relative to the config file."""
    nkey_seed: str | None = None
    """A file holding an NKey user seed (`SU...`), for servers that list NKey users."""
    tls_ca: str | None = None
    """PEM file of the CA(s) that signed the NATS servers' certificates (default: the system's
    trust store). Setting any `tls_*` key makes busway refuse a server that does not use TLS."""
    tls_cert: str | None = None
    """PEM client certificate (chain) busway presents, for servers that verify clients (mTLS)."""
    tls_key: str | None = None
    """PEM private key of `tls_cert`."""
    tls_server_name: str | None = None
    """The name the servers' certificates must carry (and SNI), when it is not the URL's host."""
    tls_handshake_first: bool = False
    """Start TLS before the server's INFO (servers with `handshake_first`: nothing in clear)."""
    embedded: EmbeddedNatsSecurity = EmbeddedNatsSecurity()
    """`[nats.embedded]`: TLS, mTLS and users of the embedded server (see the security page)."""
    connect_timeout: Duration = Duration(5.0)
    """How long the first connection may take before start-up fails (at least 500ms: a TCP
    and TLS handshake to a loaded server needs that much)."""
    publish_timeout: Duration = Duration(10.0)
    """How long to wait for a PubAck before a publish counts as failed."""
    publish_window: Count = 1024
    """PubAcks in flight per connection (the pipelining bound)."""
    ping_interval: Duration = Duration(2.0)
    """How often busway pings its NATS server; with `max_outstanding_pings` it bounds how long
    a hung (frozen, partitioned) server goes unnoticed before busway fails over to another one:
    about `ping_interval * (max_outstanding_pings + 1)`."""
    max_outstanding_pings: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    """Pings left unanswered before the connection counts as dead and busway reconnects."""
    reconnect_wait: Duration = Duration(0.5)
    """Pause before reconnecting to a server that was just tried (others are tried at once)."""
    max_reconnect_attempts: Annotated[int, msgspec.Meta(ge=-1, le=1_000_000)] = -1
    """Reconnection attempts after losing the connection; -1 (the default) retries forever.
    When a finite number runs out, the daemon stops with an error for its supervisor to
    restart it."""
    mqtt_listen: str = ""
    """Embedded server: also accept MQTT 3.1.1 clients (devices) on this host:port; off when
    empty. A topic `a/b` is the subject `a.b` (see the MQTT page). A non-loopback address
    needs `mqtt_user`."""
    mqtt_user: str | None = None
    """Embedded server: the user name MQTT clients must log in with (with `mqtt_password`);
    busway's own loopback NATS port is not affected."""
    mqtt_password: str | None = None
    """Password of `mqtt_user`; keep it in `${ENV}` or `${file:...}`."""
    mqtt_tls_cert: str | None = None
    """Embedded server: PEM certificate for TLS on the MQTT listener (with `mqtt_tls_key`)."""
    mqtt_tls_key: str | None = None
    """Private key (PEM) of `mqtt_tls_cert`."""
    mqtt_tls_ca: str | None = None
    """CA (PEM) that signs device certificates: with it, devices must present one."""

    def __post_init__(self) -> None:
        if not self.ping_interval >= _SHORTEST_PING:
            raise ValueError(f"ping_interval must be at least {_SHORTEST_PING * 1000:g}ms")
        if not self.reconnect_wait >= 0:
            raise ValueError("reconnect_wait must be 0s or more")
        if self.max_reconnect_attempts == 0:  # nats-py would read 0 as "forever"
            raise ValueError("max_reconnect_attempts must be -1 (forever) or at least 1")
        if self.servers is not None:
            if not self.servers:
                raise ValueError("servers is empty: list NATS URLs, or remove it to embed one")
            for url in self.servers:
                _check_server_url(url)
        if self.sync != "always":
            _check_sync(self.sync)
        if not self.publish_timeout > 0:
            raise ValueError("publish_timeout must be more than 0s")
        if not self.connect_timeout >= _SHORTEST_CONNECT:
            raise ValueError(
                f"connect_timeout must be at least {_SHORTEST_CONNECT * 1000:g}ms, "
                f"got {float(self.connect_timeout) * 1000:g}ms"
            )
        if _UNSAFE_IN_SERVER_CONFIG.search(self.data_dir):
            raise ValueError(
                f"data_dir {short(self.data_dir)!r}: quotes, backslashes and control "
                "characters cannot go into the embedded server's config file"
            )
        if self.credentials is not None and self.nkey_seed is not None:
            raise ValueError("give one of `credentials` (a .creds file) and `nkey_seed`")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a client certificate needs both `tls_cert` and `tls_key`")
        if self.embedded.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(
                "[nats.embedded] tls_client_ca makes the embedded server require client "
                "certificates: set `tls_cert` and `tls_key` for busway's own connection"
            )
        _check_listen(self.listen)
        _check_mqtt(self)


def _check_mqtt(nats: NatsConfig) -> None:
    """`[nats] mqtt_*`: a listener only for the embedded server, safe to expose."""
    keys = (nats.mqtt_user, nats.mqtt_password, nats.mqtt_tls_cert, nats.mqtt_tls_key)
    if not nats.mqtt_listen:
        if any(key is not None for key in (*keys, nats.mqtt_tls_ca)):
            raise ValueError("mqtt_user / mqtt_password / mqtt_tls_* need mqtt_listen")
        return
    if nats.servers is not None:
        raise ValueError(
            "mqtt_listen opens the embedded server's MQTT listener: with `servers`, enable "
            "MQTT in your own nats-server's config instead"
        )
    try:
        host, port = split_listen(nats.mqtt_listen)
    except ValueError as exc:
        raise ValueError(f"mqtt_listen: {exc}") from None
    if port == 0:
        raise ValueError("mqtt_listen needs a fixed port (devices must know where to connect)")
    if (nats.mqtt_user is None) != (nats.mqtt_password is None):
        raise ValueError("give both mqtt_user and mqtt_password, or neither")
    if (nats.mqtt_tls_cert is None) != (nats.mqtt_tls_key is None):
        raise ValueError("give both mqtt_tls_cert and mqtt_tls_key, or neither")
    if nats.mqtt_tls_ca is not None and nats.mqtt_tls_cert is None:
        raise ValueError("mqtt_tls_ca needs mqtt_tls_cert and mqtt_tls_key")
    if nats.mqtt_user is None and not _is_loopback(host):
        raise ValueError(
            f"mqtt_listen {short(nats.mqtt_listen)!r} is reachable from other hosts: set "
            "mqtt_user and mqtt_password so that only your devices can publish"
        )
    for value in (*keys, nats.mqtt_tls_ca):
        if value is not None and _UNSAFE_IN_SERVER_CONFIG.search(value):
            raise ValueError(
                "mqtt_user, mqtt_password and mqtt_tls_* cannot hold quotes, backslashes or "
                "control characters (they go into the embedded server's config file)"
            )


_SHORTEST_CONNECT = 0.5  # seconds
_SHORTEST_PING = 0.1  # seconds: shorter pings are load, not faster failover

# Characters that would break out of a quoted string in nats-server's config file.
_UNSAFE_IN_SERVER_CONFIG = re.compile(r'["\\\x00-\x1f\x7f]')


def _check_sync(sync: str) -> None:
    """`[nats] sync`: a duration nats-server understands too (it has no `d` unit), over 0."""
    seconds = parse_duration(sync)
    if sync.strip().endswith("d") or not seconds > 0:
        raise ValueError(
            f'sync must be "always" or a duration in ms, s, m or h over 0, got {short(sync)!r}'
        )


class ClientLimit(_Strict, frozen=True, kw_only=True):
    """A token bucket per client address, checked before any authentication."""

    rate: Annotated[float, msgspec.Meta(gt=0)]
    """Tokens per second each address gets back (fractions allowed)."""
    burst: Count
    """Tokens an address may spend at once after being quiet."""
    max_clients: Count = 100_000
    """Addresses remembered; past it the least recently seen one starts again full."""


def _is_loopback(host: str) -> bool:
    """True for `localhost` and loopback IP addresses: nothing off this host can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpConfig(_Strict, frozen=True, kw_only=True):
    """The shared HTTP listener: HTTP sources, `/metrics`, `/status`, `/healthz`, `/readyz`.

    Its limits protect the process from clients that are slow, idle, huge or many on purpose
    (see the security page); the defaults suit an integration endpoint on a private network.
    """

    listen: str | None = "127.0.0.1:8080"
    """Shared listener for HTTP sources, `/metrics`, `/healthz`, `/readyz`, `/status`; `""`
    turns it off."""
    tls_cert: str | None = None
    """PEM certificate (chain) file: with `tls_key`, the listeners speak HTTPS only."""
    tls_key: str | None = None
    """PEM private key of `tls_cert`."""
    admin_listen: str | None = None
    """A separate listener for `/metrics` and `/status` (plus `/healthz`, `/readyz`); they
    are then no longer served on `listen`. Bind it to a private interface."""
    admin_token: str | None = None
    """Bearer token `/metrics` and `/status` require (`Authorization: Bearer ...`), on
    whichever listener serves them; use `${ENV}` or `${file:...}`. Without `admin_listen` or
    `admin_token`, `listen` must be a loopback address."""
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1024 * 1024)] = 32 * 1024
    """Largest request line plus headers, in bytes; larger requests get 431 and are closed
    as soon as the limit is passed (never buffered whole)."""
    max_headers: Annotated[int, msgspec.Meta(ge=8, le=10_000)] = 100
    """Most header fields in one request; more get 431."""
    header_timeout: Duration = Duration(10.0)
    """Time a client has to send a request's line and headers, from connecting (or from the
    first byte of a later request on the connection); then 408 and closed."""
    body_timeout: Duration = Duration(10.0)
    """Grace a request body gets before `body_min_rate` applies: the body must be complete
    within `body_timeout` plus one second per `body_min_rate` bytes received; else 408."""
    body_min_rate: Annotated[int, msgspec.Meta(ge=1)] = 1024
    """Bytes per second a body must arrive at, on average, after `body_timeout`."""
    keepalive_timeout: Duration = Duration(5.0)
    """An idle keep-alive connection is closed after this long without a new request."""
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    """Open connections at most (per listener); one more gets 503 and is closed at once.
    Default: 1024, lowered to fit the open-file limit (keeping 256 descriptors for the rest);
    a value that does not fit is a start-up error."""
    trusted_proxies: list[str] = []
    """Addresses or CIDR ranges of reverse proxies whose `X-Forwarded-For` names the client
    (the right-most address not itself a trusted proxy); others' is ignored."""
    rate_limit: ClientLimit | None = None
    """Requests per client address, all of them, before authentication (`/healthz` and
    `/readyz` exempt); excess gets 429. Default: none (sources have their own per-client
    `rate_limit`)."""
    auth_failure_limit: ClientLimit = ClientLimit(rate=1.0, burst=20)
    """Failed authentications (401) per client address: each one spends a token, and once
    they are spent every request from that address gets 429 before its credentials are
    looked at, so API keys and tokens cannot be guessed at speed. Clients that authenticate
    spend nothing. Default: `{ rate = 1, burst = 20 }`."""

    def __post_init__(self) -> None:
        if self.listen:
            _check_listen(self.listen)
        if self.admin_listen is not None:
            try:
                split_listen(self.admin_listen)
            except ValueError as exc:
                raise ValueError(f"admin_listen: {exc}") from None
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both `tls_cert` and `tls_key`")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ValueError("admin_token must be at least 16 characters (use a random secret)")
        for name in ("header_timeout", "body_timeout", "keepalive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0s")
        for entry in self.trusted_proxies:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {short(entry)!r} is not an IP address or CIDR range "
                    "(such as '10.0.0.0/8')"
                ) from None
        if (
            self.listen
            and self.admin_listen is None
            and self.admin_token is None
            and not _is_loopback(split_listen(self.listen)[0])
        ):
            raise ValueError(
                f"listen {self.listen!r} is reachable from other hosts, and /metrics and "
                "/status would answer anyone there: set admin_token (a bearer token they "
                "require) or admin_listen (a separate, private listener for them), or "
                "listen on 127.0.0.1"
            )


_DUPLICATE_WINDOW = Duration(300.0)
_MIN_MAX_AGE = 0.1  # JetStream's minimum max_age and duplicate window (error 10052)


class StreamPartition(_Strict, frozen=True, kw_only=True):
    """Keyed partitions of a stream (see docs/partitions.md): JetStream stores each message with
    the partition of its key appended to its subject (`events.k1` → `events.k1.3`), through the
    stream's subject transform `{{partition(count, key...)}}`, so a partitioned route reads each
    partition through its own consumer, in order."""

    count: Annotated[int, msgspec.Meta(ge=1, le=1024)]
    """Number of partitions. Changing it on a stream that holds messages re-maps keys for new
    messages only: a key's order across the change is not kept (drain the routes first)."""
    key: list[Annotated[int, msgspec.Meta(ge=1, le=32)]] = []
    """Which `*` tokens of the stream's subject form the key (1 = the first `*`); default:
    every `*`. Messages whose key tokens are equal land in the same partition."""


class StreamConfig(_Strict, frozen=True, kw_only=True):
    """A JetStream stream busway creates (or, with `create = false`, expects to exist).

    `duplicate_window` must cover a restart plus the consumers' `ack_wait`: a message redelivered
    after a crash republishes its outputs with the same `Nats-Msg-Id`, which the stream drops only
    while the first copy is inside the window.
    """

    name: str
    """Stream name (letters, digits, `-`, `_`)."""
    subjects: list[str]
    """Subjects the stream captures (wildcards allowed); streams may not overlap."""
    duplicate_window: Duration = _DUPLICATE_WINDOW
    """How long `Nats-Msg-Id`s are remembered to drop copies: cover a restart plus `ack_wait`."""
    storage: Literal["file", "memory"] = "file"
    """File (durable) or memory."""
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] | None = None
    """Copies in a NATS cluster: 1, 3 or 5 (default: `[cluster] replicas`)."""
    max_age: Duration | None = None
    """Discard messages older than this (default: keep)."""
    max_bytes: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)] | None = None
    """Discard the oldest messages beyond this size (default: unlimited)."""
    max_msgs: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)] | None = None
    """Discard the oldest messages beyond this count (default: unlimited)."""
    create: bool = True
    """`false`: the stream is managed elsewhere; busway only checks it exists."""
    partition: StreamPartition | None = None
    """Keyed partitions (`{ count = 8, key = [1] }`): per-key order with parallelism for
    routes with `partitioned = true`. Needs exactly one subject, with `*` tokens and no `>`."""

    def __post_init__(self) -> None:
        if self.replicas is not None:
            _check_replicas(self.replicas)
        if not self.duplicate_window >= _MIN_MAX_AGE:
            raise ValueError("duplicate_window must be at least 100ms (JetStream's minimum)")
        if self.max_age and self.max_age < _MIN_MAX_AGE:
            raise ValueError("max_age must be at least 100ms (JetStream's minimum), or 0 to keep")
        if self.max_age and self.duplicate_window > self.max_age:
            raise ValueError(
                f"duplicate_window ({float(self.duplicate_window):g}s) is longer than max_age "
                f"({float(self.max_age):g}s): JetStream refuses that; shorten duplicate_window"
            )


def _check_replicas(replicas: int) -> None:
    """1, 3 or 5: an even count adds a copy but no fault tolerance (a quorum of 2 of 2 or 3
    of 4 survives no more failures than 1 of 1 or 2 of 3)."""
    if replicas not in (1, 3, 5):
        raise ValueError(f"replicas must be 1, 3 or 5, got {replicas}")


class ClusterConfig(_Strict, frozen=True, kw_only=True):
    """Running on a NATS cluster: how busway's own assets are replicated, how long start-up
    waits for a cluster that is not ready. See docs/cluster.md."""

    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    """Copies (1, 3 or 5) of what busway creates for itself: the dead-letter stream, the state
    bucket (source state, the isolation ledger, aggregates), dedupe and idempotency buckets;
    also the default `replicas` of `[[streams]]`. Consumers follow their stream's count. More
    than 1 needs `[nats] servers` pointing at a cluster of at least that many servers."""
    startup_timeout: Duration = Duration(60.0)
    """How long start-up keeps retrying while JetStream is not ready (a cluster still forming,
    electing a leader, or missing a server) before it fails; one log line per attempt."""

    def __post_init__(self) -> None:
        _check_replicas(self.replicas)
        if not self.startup_timeout >= 0:
            raise ValueError("startup_timeout must be 0s or more")


class DeadLetterConfig(_Strict, frozen=True, kw_only=True):
    """Where messages that cannot be handled go: `<subject_prefix>.<component name>`."""

    stream: str = "BUSWAY_DEADLETTER"
    """Stream holding every dead letter."""
    subject_prefix: str = "busway.deadletter"
    """Dead letters of component `x` go to `<subject_prefix>.x`."""
    max_age: Duration = Duration(14 * 86400.0)
    """How long dead letters are kept."""

    def __post_init__(self) -> None:
        if self.max_age and self.max_age < _MIN_MAX_AGE:
            raise ValueError("max_age must be at least 100ms (JetStream's minimum), or 0 to keep")


class _Consumer(_Strict, frozen=True, kw_only=True):
    """What every component that reads from JetStream shares (routes and sinks)."""

    name: str
    """Unique name; also names the durable JetStream consumer (`busway-<kind>-<name>`)."""
    from_: str = msgspec.field(name="from")
    """Subject to consume (wildcards allowed); a declared stream must capture it."""
    stream: str | None = None
    """Stream to consume from (default: the stream capturing `from`)."""
    dead_letter: str | None = None
    """Dead-letter subject (default `<subject_prefix>.<name>`)."""
    max_in_flight: Count = 1024
    """Messages held un-acked at once (the consumer's `max_ack_pending`): the back-pressure
    bound and the memory bound; `1` gives strict stream order."""
    ack_wait: Duration = Duration(30.0)
    """Redelivery delay of a message whose holder died (held messages are kept alive, so a
    slow stage or sink needs no longer one); a `stalled` report also waits this long."""
    retry: RetryPolicy = RetryPolicy()
    """Back-off of transient failures, then dead letter."""
    start: str | None = None
    """Where a new consumer begins: `"all"` (the whole stream: the default), `"new"` (messages
    stored from now on) or an RFC 3339 time (`"2025-06-01T00:00:00Z"`). Applies only when the
    consumer is created (see "Where a new route or sink starts")."""

    def __post_init__(self) -> None:
        if not self.ack_wait > 0:
            raise ValueError("ack_wait must be more than 0s")
        if self.start is not None:
            start_time(self.start)


class RouteConfig(_Consumer, frozen=True, kw_only=True):
    """A route: read `from`, keep what `when` matches, reshape with `transform`, publish `to`."""

    to: list[str] = []
    """Publish every resulting message to each of these (required unless a `switch` or `reply`
    stage decides).
    """
    when: str | None = None
    """JMESPath predicate over the JSON body, run first; unmatched messages are filtered."""
    transform: str | None = None
    """JMESPath mapping run last; its result is the new body."""
    stages: list[StageConfig] = []
    """Run in order after `when` and before `transform`: one-key tables such as
    `{ filter = "..." }` (see the stages pages)."""
    hop_limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 32
    """Route hops a message may make before this route dead-letters it (reason `hop_limit`);
    only enforced on routes a cycle can pass through (see "Route cycles")."""
    partitioned: bool = False
    """Read the (partitioned) stream one consumer per partition, each partition owned by one
    daemon at a time: per-key order, keys in parallel, aggregate groups never split across
    daemons. `max_in_flight` then counts per partition (see docs/partitions.md)."""
    partition_lease_ttl: Duration = Duration(10.0)
    """How long a partition's owner may go silent before another daemon takes the partition
    over: after a crash its partitions move within `2.5 x` this (see docs/partitions.md);
    only with `partitioned = true`."""


class SourceConfig(_Strict, frozen=True, kw_only=True, tag_field="type"):
    """Base of every source adapter's config.

    An adapter subclasses it as `class MyConfig(SourceConfig, tag="my-type", kw_only=True)`.
    """

    name: str
    """Unique name of the source (metrics, dead letters, state keys)."""
    subject: str
    """Subject to publish to (some adapters allow templates)."""


class CircuitConfig(_Strict, frozen=True, kw_only=True):
    """A sink's circuit breaker: after `failures` consecutive failed deliveries, pause.

    While open the sink takes no new messages for `cool_down`, then probes with one. `failures
    = 0` disables it.
    """

    failures: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 5
    """Consecutive failed deliveries that open the circuit (0 = never)."""
    cool_down: Duration = Duration(30.0)
    """How long an open circuit pauses before probing with one message."""


class SinkConfig(_Consumer, frozen=True, kw_only=True, tag_field="type"):
    """Base of every sink adapter's config.

    An adapter subclasses it as `class MyConfig(SinkConfig, tag="my-type", kw_only=True)`.

    A sink receives batches of up to `batch_size` messages, waiting at most `batch_wait` to fill
    one, so a sink that fsyncs or commits per batch amortises it without adding latency at low
    load.
    """

    batch_size: Count = 256
    """Most messages handed to the adapter at once."""
    batch_wait: Duration = Duration(0.005)
    """Longest wait to fill a batch once its first message is there."""
    circuit: CircuitConfig = CircuitConfig()
    """Circuit breaker: pause delivery after consecutive failures."""


class RedactionConfig(DlpRules, frozen=True, kw_only=True):
    """What busway masks wherever it shows a payload: logs, dead-letter reasons, `/status`'s
    last errors, `busway dlq show` and `list`. Messages themselves are left alone (the
    `redact` stage changes those); dead letters keep their bodies for replay."""

    enabled: bool = True
    """`false`: show everything as it is (e.g. while debugging on a test system)."""


class AuditConfig(_Strict, frozen=True, kw_only=True):
    """The audit trail: who sent what, and what was dead-lettered or replayed, by whom and why.

    Off by default. Records are small JSON documents in their own stream, read with
    `busway audit`; each has a deterministic id, so a retried publish never records twice."""

    enabled: bool = False
    """`true`: record every ingress, dead letter and replay in the audit stream."""
    stream: str = "BUSWAY_AUDIT"
    """Stream holding the audit records (created by busway)."""
    subject_prefix: str = "busway.audit"
    """Records go to `<subject_prefix>.ingress.<source>`, `.deadletter.<component>` and
    `.replay.<component>`."""
    max_age: Duration = Duration(90 * 86400.0)
    """How long audit records are kept (0: forever); pick what your retention policy says."""
    max_bytes: int = 0
    """Upper bound of the audit stream's size in bytes (0: unbounded); the oldest records go
    first when it is reached."""

    def __post_init__(self) -> None:
        if self.max_age and self.max_age < _MIN_MAX_AGE:
            raise ValueError("max_age must be at least 100ms (JetStream's minimum), or 0 to keep")
        if self.max_bytes < 0:
            raise ValueError("max_bytes must be 0 (unbounded) or a positive number of bytes")


class TracingConfig(_Strict, frozen=True, kw_only=True):
    """OpenTelemetry spans per hop (ingress, route, sink write), exported over OTLP/HTTP.

    W3C `traceparent` / `tracestate` are carried through every hop whether or not this is on;
    spans need the `tracing` extra (`pip install 'busway[tracing]'`)."""

    enabled: bool = False
    """`true`: record spans for sampled messages (off: no OpenTelemetry code runs at all)."""
    sample_ratio: float = 0.01
    """Share of new traces recorded (0.0 to 1.0) at the ingress; later hops follow the
    decision a message carries in its `traceparent`."""
    otlp_endpoint: str | None = None
    """OTLP/HTTP traces URL, e.g. `http://collector:4318/v1/traces` (default: the
    `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` environment, else
    `http://localhost:4318/v1/traces`)."""
    service_name: str = "busway"
    """The `service.name` resource attribute of the spans."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError("sample_ratio must be between 0.0 and 1.0")
        if self.otlp_endpoint is not None and urlsplit(self.otlp_endpoint).scheme not in (
            "http",
            "https",
        ):
            raise ValueError("otlp_endpoint must be an http:// or https:// URL")


class Config(_Strict, frozen=True, kw_only=True):
    """A whole busway deployment: where NATS is, what streams exist, what flows where."""

    nats: NatsConfig = NatsConfig()
    """Where JetStream is: `[nats]`; without `servers`, an embedded nats-server."""
    cluster: ClusterConfig = ClusterConfig()
    """Several daemons and NATS nodes: `[cluster]` (replicas of busway's own assets, start-up
    retry against a forming cluster)."""
    http: HttpConfig = HttpConfig()
    """The shared HTTP listener: `[http]`."""
    dead_letter: DeadLetterConfig = DeadLetterConfig()
    """Where undeliverable messages go: `[dead_letter]`."""
    redaction: RedactionConfig = RedactionConfig()
    """What is masked wherever busway shows a payload: `[redaction]` (on by default: card
    numbers and secret fields)."""
    audit: AuditConfig = AuditConfig()
    """The audit trail of ingress, dead letters and replays: `[audit]` (off by default)."""
    tracing: TracingConfig = TracingConfig()
    """OpenTelemetry spans per hop: `[tracing]` (off by default)."""
    shutdown_timeout: Duration = Duration(15.0)
    """How long a graceful stop (or a reload) waits for in-flight messages."""
    state_bucket: str = "busway_state"
    """JetStream key-value bucket where sources keep watermarks and cursors, and routes and
    sinks count the attempts of redelivered messages (`isolation.*` keys)."""
    pid_file: str = "var/busway.pid"
    """Where `busway run` writes its pid, for `busway reload` (relative to the config file)."""
    streams: list[StreamConfig] = []
    """The JetStream streams: `[[streams]]`; every subject read or written must be in one."""
    routes: list[RouteConfig] = []
    """The routes: `[[routes]]`."""
    sources: tuple[SourceConfig, ...] = ()
    """What takes messages in: `[[sources]]`, one table per source, its adapter by `type`."""
    sinks: tuple[SinkConfig, ...] = ()
    """What delivers messages out: `[[sinks]]`, one table per sink, its adapter by `type`."""
    base_dir: str = "."
    """Directory relative paths are resolved against: the config file's own directory."""

    def __post_init__(self) -> None:
        # A stream without its own `replicas` takes `[cluster] replicas`: after decoding, every
        # stream of a Config says how many copies it has.
        if any(stream.replicas is None for stream in self.streams):
            msgspec.structs.force_setattr(
                self,
                "streams",
                [
                    stream
                    if stream.replicas is not None
                    else msgspec.structs.replace(stream, replicas=self.cluster.replicas)
                    for stream in self.streams
                ],
            )

    def resolve_path(self, path: str) -> Path:
        """`path` made absolute against the config file's directory."""
        return (Path(self.base_dir) / os.path.expanduser(path)).resolve()

    def consumed_stream(self, component: _Consumer) -> StreamConfig | None:
        """The stream `component` reads: its `stream`, else the one capturing `from`."""
        if component.stream is None:
            return self.stream_for(component.from_)
        return next((s for s in self.streams if s.name == component.stream), None)

    def stream_for(self, subject: str) -> StreamConfig | None:
        """The declared stream that captures `subject` (a pattern is captured if covered)."""
        for stream in self.streams:
            if any(covers(pattern, subject) for pattern in stream.subjects):
                return stream
        if covers(f"{self.dead_letter.subject_prefix}.>", subject):
            return self.dead_letter_stream
        return None

    @property
    def dead_letter_stream(self) -> StreamConfig:
        """The stream busway creates for dead letters of every route and sink."""
        max_age = self.dead_letter.max_age
        window = _DUPLICATE_WINDOW
        return StreamConfig(
            name=self.dead_letter.stream,
            subjects=[f"{self.dead_letter.subject_prefix}.>"],
            max_age=max_age,
            replicas=self.cluster.replicas,
            # JetStream refuses a duplicate window longer than max_age.
            duplicate_window=Duration(min(window, max_age)) if max_age else window,
        )

    @property
    def audit_stream(self) -> StreamConfig:
        """The stream busway creates for audit records (when `[audit] enabled`)."""
        max_age = self.audit.max_age
        window = _DUPLICATE_WINDOW
        return StreamConfig(
            name=self.audit.stream,
            subjects=[f"{self.audit.subject_prefix}.>"],
            max_age=max_age,
            max_bytes=self.audit.max_bytes or None,
            replicas=self.cluster.replicas,
            duplicate_window=Duration(min(window, max_age)) if max_age else window,
        )

    @property
    def busway_streams(self) -> list[StreamConfig]:
        """busway's own streams: dead letters, and the audit stream when enabled."""
        own = [self.dead_letter_stream]
        if self.audit.enabled:
            own.append(self.audit_stream)
        return own

    def dead_letter_subject(self, component: _Consumer) -> str:
        """Where `component` dead-letters: its own `dead_letter`, or the shared prefix."""
        return component.dead_letter or f"{self.dead_letter.subject_prefix}.{component.name}"


def start_time(start: str) -> datetime.datetime | None:
    """The UTC time a `start = "<RFC 3339>"` names; None for `"all"` and `"new"`.

    ValueError for anything else, including a time without a UTC offset (ambiguous).
    """
    if start in ("all", "new"):
        return None
    try:
        moment = datetime.datetime.fromisoformat(start)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ValueError(
            f'start must be "all", "new" or an RFC 3339 time with its offset such as '
            f'"2025-06-01T00:00:00Z", got {short(start)!r}'
        )
    return moment.astimezone(datetime.UTC)


# ---------------------------------------------------------------------------------------------
# Decoding


SourceTypes = Callable[[str], type[SourceConfig] | None]
SinkTypes = Callable[[str], type[SinkConfig] | None]


def load_config(
    path: str | os.PathLike[str],
    *,
    source_types: SourceTypes,
    sink_types: SinkTypes,
    environ: dict[str, str] | None = None,
    outline: bool = False,
) -> Config:
    """Read and decode the TOML file at `path`; see `decode_config`."""
    file = os.fspath(path)
    try:
        data = read_bounded(Path(file), MAX_CONFIG_BYTES, what="the config file")
    except ConfigError as error:
        raise ConfigError(error.detail, file=file) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"the file is not valid UTF-8 (byte 0x{data[exc.start]:02x} on line {line}): "
            "save it as UTF-8",
            file=file,
            line=line,
        ) from None
    return decode_config(
        text,
        file=file,
        base_dir=str(Path(file).resolve().parent),
        source_types=source_types,
        sink_types=sink_types,
        environ=environ,
        outline=outline,
    )


def decode_config(
    text: str,
    *,
    file: str = "<config>",
    base_dir: str = ".",
    source_types: SourceTypes,
    sink_types: SinkTypes,
    environ: dict[str, str] | None = None,
    outline: bool = False,
) -> Config:
    """Decode TOML `text` into a checked `Config`.

    `source_types` / `sink_types` map a `type = "..."` name to its adapter's config struct (the
    adapter registry provides them). Raises ConfigError naming file, key path and line; never
    anything else, whatever `text` holds.

    `outline = True` decodes only what operator commands (`busway status`, `busway dlq`) need:
    every section but the components in full, and of each component its name, subjects and
    consumer settings. Adapters' own keys are dropped and route logic (`when`, `transform`,
    `stages`) is kept as written, neither resolved (`${...}`) nor compiled, so a secret only an
    adapter uses need not be set to inspect dead letters. Sources and sinks come back as plain
    `SourceConfig` / `SinkConfig` values, whatever their adapter: never build a plan from them.
    """

    def located(error: ConfigError) -> ConfigError:
        if error.path is None:
            return ConfigError(error.detail, file=file, line=error.line)
        # A table's own check ("sync must be ...") is reported by msgspec at the table: point
        # at the key it names when the file has that key.
        named = re.match(r"`?([a-z_]+)`?:? ", error.detail)
        if named and (line := key_line(text, error.path, named.group(1))) is not None:
            return ConfigError(
                error.detail, file=file, path=f"{error.path}.{named.group(1)}", line=line
            )
        line = error.line if error.line is not None else line_of(text, error.path)
        return error.located(file=file, line=line)

    try:
        document = check_values(parse_toml(text))
    except ConfigError as error:
        raise located(error) from None
    env = os.environ if environ is None else environ
    skip = _route_logic if outline else None
    try:
        sources = _pop_list(document, "sources")
        sinks = _pop_list(document, "sinks")
        if outline:
            sources = [_outline(raw, SourceConfig) for raw in sources]
            sinks = [_outline(raw, SinkConfig) for raw in sinks]
            source_types = _outline_types(SourceConfig)
            sink_types = _outline_types(SinkConfig)
        document = interpolate(document, "$", env, skip)
        document["base_dir"] = base_dir
        config = _convert(document, Config, "$")
        config = msgspec.structs.replace(
            config,
            sources=tuple(
                _convert_tagged(
                    interpolate(raw, f"$.sources[{i}]", env),
                    f"$.sources[{i}]",
                    source_types,
                    "source",
                )
                for i, raw in enumerate(sources)
            ),
            sinks=tuple(
                _convert_tagged(
                    interpolate(raw, f"$.sinks[{i}]", env), f"$.sinks[{i}]", sink_types, "sink"
                )
                for i, raw in enumerate(sinks)
            ),
        )
        _check_topology(config)
    except ConfigError as error:
        raise located(error) from None
    return config


def _pop_list(document: dict[str, Any], key: str) -> list[Any]:
    value = document.pop(key, [])
    if not isinstance(value, list):
        raise ConfigError(
            f"expected an array of tables ([[{key}]]), got {_kind(value)}", path=f"$.{key}"
        )
    return value


_ROUTE_LOGIC = re.compile(r"^\$\.routes\[\d+\]\.(when|transform|stages)$")


def _route_logic(path: str) -> bool:
    return _ROUTE_LOGIC.match(path) is not None


def _outline(raw: object, base: type[msgspec.Struct]) -> object:
    """A component's table with only the keys `base` (SourceConfig, SinkConfig) knows."""
    if not isinstance(raw, dict):
        return raw
    keep = {field.encode_name for field in msgspec.structs.fields(base)} | {"type"}
    return {key: value for key, value in raw.items() if key in keep}


def _outline_types(base: type[_T]) -> Callable[[str], type[_T]]:
    """Struct types decoding any adapter's `type` as plain `base` fields (see `outline`)."""

    def outline_type(tag: str) -> type[_T]:
        key = (base, tag)
        if key not in _OUTLINE_TYPES:
            _OUTLINE_TYPES[key] = msgspec.defstruct(
                f"Outline{base.__name__}", [], bases=(base,), tag=tag, frozen=True, kw_only=True
            )
        struct: type[_T] = _OUTLINE_TYPES[key]
        return struct

    return outline_type


_OUTLINE_TYPES: dict[tuple[type, str], Any] = {}


def _convert(raw: object, kind: type[_T], path: str) -> _T:
    try:
        return msgspec.convert(raw, kind, dec_hook=decode_hook)
    except msgspec.ValidationError as exc:
        detail, _, where = str(exc).rpartition(" - at `")
        if not detail:
            detail, where = str(exc), "$`"
        raise ConfigError(_explain(detail), path=path + where[1:-1]) from None
    except Exception as exc:  # an adapter's check that raised something other than ValueError
        raise ConfigError(f"invalid settings ({type(exc).__name__}: {exc})", path=path) from None


def _convert_tagged(
    raw: object, path: str, types: Callable[[str], type[_T] | None], role: str
) -> _T:
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a table, got {_kind(raw)}", path=path)
    name = raw.get("type")
    if not isinstance(name, str):
        raise ConfigError(f'every {role} needs `type = "..."` naming its adapter', path=path)
    try:
        struct = types(name)
    except ConfigError as error:
        raise ConfigError(error.detail, path=f"{path}.type") from None
    if struct is None:
        raise ConfigError(
            f"unknown {role} type {name!r}: no installed adapter provides it "
            f"(adapters register under the 'busway.adapters' entry-point group)",
            path=f"{path}.type",
        )
    return _convert(raw, struct, path)


def _explain(detail: str) -> str:
    """msgspec's wording, plus what to do where that is not obvious."""
    if detail.startswith("Object contains unknown field"):
        return detail + ": remove it or check its spelling"
    if detail.startswith("Object missing required field"):
        return detail.replace("Object", "table", 1)
    return detail


def _kind(value: object) -> str:
    names: dict[type, str] = {dict: "a table", list: "an array", str: "a string"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------
# Whole-config checks


def _check_topology(config: Config) -> None:
    _check_busway_assets(config)
    _check_embedded_replicas(config)
    stream_names: set[str] = set()
    for i, stream in enumerate(config.streams):
        path = f"$.streams[{i}]"
        if not _NAME.match(stream.name):
            raise ConfigError(
                f"stream name {stream.name!r} must be 1-64 letters, digits, '-' or '_'",
                path=f"{path}.name",
            )
        if (
            stream.name in stream_names
            or stream.name == config.dead_letter.stream
            or (config.audit.enabled and stream.name == config.audit.stream)
        ):
            raise ConfigError(f"stream name {stream.name!r} is used twice", path=f"{path}.name")
        stream_names.add(stream.name)
        if not stream.subjects:
            raise ConfigError("a stream needs at least one subject", path=f"{path}.subjects")
        for j, subject in enumerate(stream.subjects):
            _check_subject(subject, f"{path}.subjects[{j}]", wildcards=True)
            for theirs, whose in _reserved_subjects(config):
                if overlaps(subject, theirs):
                    raise ConfigError(
                        f"subject {subject!r} overlaps {theirs!r}, where {whose}: JetStream "
                        "refuses overlapping streams; narrow the subject",
                        path=f"{path}.subjects[{j}]",
                    )
            for k, other in enumerate(config.streams[:i]):
                if any(overlaps(subject, theirs) for theirs in other.subjects):
                    raise ConfigError(
                        f"subject {subject!r} overlaps stream {other.name!r} "
                        f"($.streams[{k}]); JetStream refuses overlapping streams",
                        path=f"{path}.subjects[{j}]",
                    )
        if stream.partition is not None:
            _check_partition(stream, stream.partition, path)

    _check_unique_names("routes", [route.name for route in config.routes])
    _check_unique_names("sources", [source.name for source in config.sources])
    _check_unique_names("sinks", [sink.name for sink in config.sinks])

    for i, route in enumerate(config.routes):
        path = f"$.routes[{i}]"
        _check_consumer(config, route, path)
        if not route.to and not any(
            stage.switch is not None or stage.reply is not None for stage in route.stages
        ):
            raise ConfigError(
                "a route needs at least one subject in `to` (or a `switch` or `reply` stage)",
                path=f"{path}.to",
            )
        for target, target_path in route_targets(route, path):
            _check_subject(target, target_path, wildcards=False)
            _check_captured(config, target, target_path)
            if covers(route.from_, target):
                raise ConfigError(
                    f"route publishes to {target!r}, which its own `from` ({route.from_!r}) "
                    "matches: it would route its outputs again forever",
                    path=target_path,
                )
        if route.partitioned:
            _check_partitioned_route(config, route, path)
        for j, stage in enumerate(route.stages):
            count = stage.aggregate.count if stage.aggregate is not None else None
            if count is not None and count > route.max_in_flight:
                raise ConfigError(
                    f"aggregate count {count} exceeds max_in_flight {route.max_in_flight}: a "
                    "group's inputs stay un-acked until it is published, so raise max_in_flight",
                    path=f"{path}.stages[{j}].aggregate.count",
                )
            if stage.enrich is not None:
                _check_subject(
                    stage.enrich.request, f"{path}.stages[{j}].enrich.request", wildcards=False
                )
    for i, sink in enumerate(config.sinks):
        _check_consumer(config, sink, f"$.sinks[{i}]")
    for i, source in enumerate(config.sources):
        path = f"$.sources[{i}]"
        if "{" not in source.subject:
            _check_subject(source.subject, f"{path}.subject", wildcards=False)
            _check_captured(config, source.subject, f"{path}.subject")
            continue
        # A template (`orders.{region}`): its adapter checks the syntax; here, that a stream
        # captures every subject it can make, with each templated token as a wildcard.
        tokens = ["*" if "{" in token else token for token in source.subject.split(".")]
        if any(token != "*" for token in tokens):
            _check_captured(config, ".".join(tokens), f"{path}.subject")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BUCKET = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _check_busway_assets(config: Config) -> None:
    """busway's own dead-letter stream and state bucket: names JetStream accepts."""
    if not _NAME.match(config.dead_letter.stream):
        raise ConfigError(
            f"stream name {short(config.dead_letter.stream)!r} must be 1-64 letters, digits, "
            "'-' or '_'",
            path="$.dead_letter.stream",
        )
    _check_subject(
        config.dead_letter.subject_prefix, "$.dead_letter.subject_prefix", wildcards=False
    )
    if config.audit.enabled:
        if not _NAME.match(config.audit.stream) or config.audit.stream == config.dead_letter.stream:
            raise ConfigError(
                f"stream name {short(config.audit.stream)!r} must be 1-64 letters, digits, "
                "'-' or '_', and not the dead-letter stream's",
                path="$.audit.stream",
            )
        _check_subject(config.audit.subject_prefix, "$.audit.subject_prefix", wildcards=False)
        if overlaps(f"{config.audit.subject_prefix}.>", f"{config.dead_letter.subject_prefix}.>"):
            raise ConfigError(
                f"subject_prefix {config.audit.subject_prefix!r} overlaps the dead letters' "
                f"{config.dead_letter.subject_prefix!r}: pick another prefix",
                path="$.audit.subject_prefix",
            )
    if not _BUCKET.match(config.state_bucket):
        raise ConfigError(
            f"state_bucket {short(config.state_bucket)!r} must be 1-64 letters, digits, '-' or '_'",
            path="$.state_bucket",
        )


def _check_embedded_replicas(config: Config) -> None:
    """The embedded nats-server is one server: nothing it holds can have more than one copy."""
    if config.nats.servers is not None:
        return
    wanted = [("$.cluster.replicas", config.cluster.replicas)]
    wanted += [(f"$.streams[{i}].replicas", s.replicas or 1) for i, s in enumerate(config.streams)]
    for path, replicas in wanted:
        if replicas > 1:
            raise ConfigError(
                f"replicas = {replicas} needs a NATS cluster, but busway runs an embedded single "
                "nats-server (no [nats] servers): set [nats] servers to a cluster, or replicas = 1",
                path=path,
            )


def _reserved_subjects(config: Config) -> list[tuple[str, str]]:
    """Subjects busway's own streams capture, which a declared stream must not overlap."""
    return [
        (f"{config.dead_letter.subject_prefix}.>", "dead letters go"),
        (f"$KV.{config.state_bucket}.>", "the state bucket lives"),
        *(
            [(f"{config.audit.subject_prefix}.>", "audit records go")]
            if config.audit.enabled
            else []
        ),
    ]


def route_targets(route: RouteConfig, path: str) -> list[tuple[str, str]]:
    """Every subject a route may publish to (stored in JetStream), with its config path."""
    targets = [(target, f"{path}.to[{j}]") for j, target in enumerate(route.to)]
    for j, stage in enumerate(route.stages):
        where = f"{path}.stages[{j}]"
        if stage.switch is not None:
            for k, case in enumerate(stage.switch.cases):
                targets += [
                    (t, f"{where}.switch.cases[{k}].to[{m}]") for m, t in enumerate(case.to)
                ]
            targets += [
                (t, f"{where}.switch.default[{m}]") for m, t in enumerate(stage.switch.default)
            ]
        if stage.wiretap is not None:
            targets.append((stage.wiretap, f"{where}.wiretap"))
    return targets


def _check_unique_names(kind: str, names: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not _NAME.match(name):
            raise ConfigError(
                f"name {name!r} must be 1-64 letters, digits, '-' or '_' "
                "(it names the JetStream consumer)",
                path=f"$.{kind}[{i}].name",
            )
        if name in seen:
            raise ConfigError(
                f"name {name!r} is used twice in [[{kind}]]", path=f"$.{kind}[{i}].name"
            )
        seen.add(name)


def _check_consumer(config: Config, component: _Consumer, path: str) -> None:
    _check_subject(component.from_, f"{path}.from", wildcards=True)
    if component.stream is None:
        _check_captured(config, component.from_, f"{path}.from")
    else:
        stream = next((s for s in config.streams if s.name == component.stream), None)
        if stream is None:
            raise ConfigError(
                f"stream {component.stream!r} is not declared: add a [[streams]] table for it "
                "(with `create = false` if it is managed elsewhere)",
                path=f"{path}.stream",
            )
        if not any(covers(pattern, component.from_) for pattern in stream.subjects):
            raise ConfigError(
                f"stream {stream.name!r} does not capture {component.from_!r}: JetStream "
                "refuses a consumer whose filter is outside its stream's subjects",
                path=f"{path}.from",
            )
    dead_letter = config.dead_letter_subject(component)
    _check_subject(dead_letter, f"{path}.dead_letter", wildcards=False)
    _check_captured(config, dead_letter, f"{path}.dead_letter")


def _check_partition(stream: StreamConfig, partition: StreamPartition, path: str) -> None:
    """A partitioned stream: one subject (a stream has one subject transform), `*` tokens to
    key on, no `>` (the partition is appended as the last token)."""
    if len(stream.subjects) != 1:
        raise ConfigError(
            f"a partitioned stream has exactly one subject, not {len(stream.subjects)}: "
            "JetStream applies one subject transform per stream; split it into streams",
            path=f"{path}.subjects",
        )
    subject = stream.subjects[0]
    wildcards = subject.split(".").count("*")
    if ">" in subject.split(".") or not wildcards:
        raise ConfigError(
            f"subject {subject!r} of a partitioned stream needs `*` tokens to key on and no "
            "`>` (e.g. `events.*`, the key being the `*` token)",
            path=f"{path}.subjects[0]",
        )
    for k, index in enumerate(partition.key):
        if index > wildcards:
            raise ConfigError(
                f"key token {index} does not exist: {subject!r} has {wildcards} `*` token(s)",
                path=f"{path}.partition.key[{k}]",
            )


def _check_partitioned_route(config: Config, route: RouteConfig, path: str) -> None:
    """A partitioned route reads a partitioned stream and keeps order within a partition."""
    stream = config.consumed_stream(route)
    if stream is None or stream.partition is None:
        raise ConfigError(
            "`partitioned = true` needs a partitioned stream: add `partition = { count = N }` "
            f"to the [[streams]] table capturing {route.from_!r}",
            path=f"{path}.partitioned",
        )
    if ">" in route.from_.split("."):
        raise ConfigError(
            f"a partitioned route reads `from` plus the partition token: {route.from_!r} ends "
            "in `>`, which leaves no place for it; use `*` tokens",
            path=f"{path}.from",
        )
    aggregates = any(stage.aggregate is not None for stage in route.stages)
    if route.max_in_flight != 1 and not aggregates:
        raise ConfigError(
            f"max_in_flight {route.max_in_flight} on a partitioned route would let a retried "
            "message fall behind later ones of its key: set max_in_flight = 1 (it counts per "
            "partition; partitions run in parallel)",
            path=f"{path}.max_in_flight",
        )
    if not route.partition_lease_ttl >= 1.0:
        raise ConfigError(
            "partition_lease_ttl must be at least 1s", path=f"{path}.partition_lease_ttl"
        )


def _check_subject(subject: str, path: str, *, wildcards: bool) -> None:
    if not is_valid_subject(subject, wildcards=wildcards) or _CONTROL.search(subject):
        expected = (
            "dot-separated tokens; `*` for one token, `>` for the rest"
            if wildcards
            else "dot-separated tokens without wildcards"
        )
        raise ConfigError(f"invalid subject {short(subject)!r}: expected {expected}", path=path)


def _check_captured(config: Config, subject: str, path: str) -> None:
    if config.stream_for(subject) is None:
        raise ConfigError(
            f"no stream captures subject {subject!r}: add it to the `subjects` of a [[streams]] "
            "table (messages are only durable inside a stream)",
            path=path,
        )
