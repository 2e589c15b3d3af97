"""The config keys of the `mqtt` source and sink; importable without aiomqtt.

Both connect to an existing MQTT broker (Mosquitto, EMQX, HiveMQ...). The connection keys are
shared; the source adds what it subscribes to and how it names messages, the sink where it
publishes. Delivery is QoS 1 both ways (at least once); see docs/adapters/mqtt.md for what
that means end to end.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

from busway import Duration, SinkConfig, SourceConfig

__all__ = ["MqttConnection", "MqttSinkConfig", "MqttSourceConfig", "split_url"]


def split_url(url: str) -> tuple[str, int, bool]:
    """(host, port, tls) of `mqtt://host:1883` or `mqtts://host:8883`; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"url {url!r} must look like mqtt://host:1883 or mqtts://host:8883")
    if parts.username or parts.password:
        raise ValueError("put the credentials in `username` / `password`, not in `url`")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"url {url!r} must not have a path or query")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"url {url!r} has an invalid port") from None
    return parts.hostname, port, tls


class MqttConnection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Keys shared by the source and the sink: where the broker is and how to log in."""

    url: str
    """The broker: `mqtt://host:1883`, or `mqtts://host:8883` for TLS."""
    username: str | None = None
    """User name to log in with (with `password`); never logged."""
    password: str | None = None
    """Password of `username`: keep it in `${ENV}` or `${file:...}`; never logged."""
    client_id: str | None = None
    """MQTT client identifier; default `busway-<component name>`. The source's persistent
    session belongs to this id: two clients with one id take the session from each other."""
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    """MQTT protocol version. `5` carries the message id as a user property and lets the
    source take ids from one (`id_property`)."""
    ca_file: str | None = None
    """`mqtts`: PEM file of the CA that signed the broker's certificate (default: the system's)."""
    cert_file: str | None = None
    """`mqtts`: client certificate (PEM), for brokers that require one (with `key_file`)."""
    key_file: str | None = None
    """`mqtts`: private key of `cert_file` (PEM)."""
    keepalive: Duration = Duration(30.0)
    """Seconds between pings when idle; the broker drops a client silent for 1.5 times this."""
    connect_timeout: Duration = Duration(5.0)
    """How long one connection attempt may take."""
    wait_for_broker: bool = False
    """`false`: an unreachable broker at start-up fails the start (exit 2, one line saying
    which broker); `true`: start anyway and keep connecting with back-off (not ready meanwhile)."""
    reconnect_max: Duration = Duration(30.0)
    """Longest pause between reconnection attempts (they start at 0.2s and double)."""

    def __post_init__(self) -> None:
        split_url(self.url)
        if self.password is not None and self.username is None:
            raise ValueError("`password` needs `username`")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both `cert_file` and `key_file`, or neither")
        tls = self.url.startswith("mqtts:")
        if not tls and (self.ca_file or self.cert_file):
            raise ValueError("`ca_file` / `cert_file` need an mqtts:// url")
        if not self.keepalive >= 1:
            raise ValueError("keepalive must be at least 1s")
        if not self.connect_timeout > 0:
            raise ValueError("connect_timeout must be more than 0s")
        if not self.reconnect_max >= 0.2:
            raise ValueError("reconnect_max must be at least 200ms")


class MqttSourceConfig(SourceConfig, tag="mqtt", frozen=True, kw_only=True):
    """Subscribes to topics of a broker with QoS 1 in a persistent session; each message is
    acknowledged to the broker only after JetStream stored it.

    `subject` may hold `{topic}`: the MQTT topic turned into subject tokens the way
    nats-server does it (`a/b` -> `a.b`, see the page on MQTT)."""

    connection: MqttConnection
    """The broker and how to log in: `[sources.connection]`."""
    topics: list[str]
    """Topic filters to subscribe to (`sensors/+/temp`, `plant/#`), each with QoS 1."""
    payload: Literal["bytes", "json"] = "bytes"
    """`json`: a payload that is not JSON is dead-lettered (reason `malformed`) instead of
    published; `bytes`: every payload is published as it came."""
    ids: Literal["content", "unique"] = "content"
    """How a message is named (its `Nats-Msg-Id`). `content`: by source, topic and payload, so
    a message the broker delivers again (busway stopped between JetStream's PubAck and its
    PUBACK) is stored once; but two identical payloads on one topic within the stream's
    `duplicate_window` are stored once too. `unique`: every delivery is a new message
    (identical payloads all kept; a redelivery after a crash is stored twice)."""
    id_property: str | None = None
    """MQTT 5: the user property carrying the publisher's message id (e.g. `message-id`);
    a message without it is named by its content, as without this key."""
    session_expiry: Duration = Duration(86400.0)
    """MQTT 5: how long the broker keeps the session (and queues QoS 1 messages) while busway
    is away. MQTT 3.1.1 sessions (clean_session = false) last as long as the broker keeps them."""
    max_in_flight: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100
    """Messages published to JetStream and not yet acknowledged to the broker; past it the
    source stops reading (the broker holds the rest)."""
    max_payload: int = 1024 * 1024
    """Largest payload taken (bytes); a larger one is dead-lettered (reason `too_large`)."""
    lease_ttl: Duration = Duration(10.0)
    """With several daemons on one config, one holds the broker session (one client id can
    only be connected once) and renews a lease every quarter of this; another takes over
    within 1.5 times this when it dies."""

    def __post_init__(self) -> None:
        if not self.topics:
            raise ValueError("topics is empty: list at least one topic filter")
        for topic in self.topics:
            _check_filter(topic)
        if "{" in self.subject and self.subject.replace("{topic}", "").count("{"):
            raise ValueError("subject may only use the placeholder {topic}")
        if self.max_payload < 1:
            raise ValueError("max_payload must be at least 1")
        if self.lease_ttl < 0.2:
            raise ValueError("lease_ttl must be at least 200ms")
        if self.id_property is not None and self.connection.protocol != "5":
            raise ValueError('id_property needs MQTT 5: set `protocol = "5"` in connection')


class MqttSinkConfig(SinkConfig, tag="mqtt", frozen=True, kw_only=True):
    """Publishes each message with QoS 1; JetStream's message is acked only after the broker's
    PUBACK. At least once: a redelivery after a lost PUBACK publishes the message again (MQTT 5
    subscribers can drop it by the `busway-message-id` user property)."""

    connection: MqttConnection
    """The broker and how to log in: `[sinks.connection]`."""
    topic: str = "{subject}"
    """The topic to publish to; `{subject}` is the message's subject turned into a topic the
    way nats-server does it (`a.b` -> `a/b`)."""
    retain: bool = False
    """Publish with the retain flag (the broker keeps the last message per topic for new
    subscribers)."""
    publish_timeout: Duration = Duration(10.0)
    """How long to wait for the broker's PUBACK before the message is retried."""
    max_payload: int = 256 * 1024 * 1024 - 1024
    """Largest payload published (bytes); a larger message is dead-lettered rather than
    retried forever (set it to the broker's own limit, e.g. Mosquitto's message_size_limit)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.topic or "+" in self.topic or "#" in self.topic:
            raise ValueError("topic must be a topic name (no + or # wildcards)")
        if self.topic.replace("{subject}", "").count("{"):
            raise ValueError("topic may only use the placeholder {subject}")
        if not self.publish_timeout > 0:
            raise ValueError("publish_timeout must be more than 0s")
        if self.max_payload < 1:
            raise ValueError("max_payload must be at least 1")


def _check_filter(topic: str) -> None:
    """ValueError unless `topic` is a valid MQTT topic filter (wildcards as whole levels)."""
    if not topic or "\x00" in topic:
        raise ValueError(f"topic filter {topic!r} is empty or holds a NUL character")
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"topic filter {topic!r}: `#` must be a whole, last level")
        if "+" in level and level != "+":
            raise ValueError(f"topic filter {topic!r}: `+` must be a whole level")
