"""The one module that talks to aiomqtt (and, through it, paho-mqtt): connect, subscribe,
publish with QoS 1, acknowledge by hand; every failure translated into busway's errors.

aiomqtt 2.x has no manual acknowledgement and ignores MQTT 5 PUBACK reason codes, both of
which busway needs (ack to the broker only after JetStream stored the message; a refused
publish is not a delivered one). paho-mqtt, under aiomqtt, has both: this module reaches it
through aiomqtt's `_client` attribute, and nowhere else does. It also replaces aiomqtt's
socket-write callback (`_watch_writes_safely`), failing a broken write into aiomqtt's
`_disconnected` as aiomqtt does (tests/mqtt/test_topics_and_config.py fails loudly if aiomqtt
renames either).

Errors: a refused login is `BrokerRefused` (never retried on its own, message without the
password); a broker that cannot be reached or drops the connection is `BrokerUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

try:
    import aiomqtt
    import paho.mqtt.client as paho
    from aiomqtt.exceptions import MqttConnectError
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError("the mqtt adapter needs aiomqtt: pip install 'busway[mqtt]'") from exc

from busway import RetryableError
from busway.adapters.mqtt._config import MqttConnection, split_url

__all__ = [
    "BrokerRefused",
    "BrokerUnavailable",
    "Received",
    "Session",
]

# CONNACK codes that mean "your credentials are wrong or not allowed" (3.1.1: 4, 5; 5: 0x86,
# 0x87, 0x8C): retrying with the same password only locks the account, so say so at once.
_LOGIN_REFUSED = {4, 5, 0x86, 0x87, 0x8C}


class BrokerUnavailable(RetryableError):
    """The broker could not be reached, or the connection broke: retried with back-off."""


class BrokerRefused(RetryableError):
    """The broker refused the login (bad user name or password, not authorised)."""


@dataclass(slots=True, frozen=True)
class Received:
    """One message from a subscription, with what is needed to acknowledge it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    user_properties: Mapping[str, str]


class Session:
    """One connection to a broker; `open()` connects, `close()` disconnects (idempotent)."""

    def __init__(
        self,
        connection: MqttConnection,
        *,
        client_id: str,
        persistent: bool,
        session_expiry: float = 0.0,
        manual_ack: bool = False,
        max_inflight: int = 20,
    ) -> None:
        self._config = connection
        self.host, self.port, self._tls = split_url(connection.url)
        self.client_id = client_id
        self._persistent = persistent
        self._session_expiry = session_expiry
        self._manual_ack = manual_ack
        self._max_inflight = max_inflight
        self._client: aiomqtt.Client | None = None
        self._paho: Any = None
        self._acks: dict[int, asyncio.Future[int]] = {}
        """PUBACK reason code per outgoing message id, resolved by paho's on_publish."""

    @property
    def where(self) -> str:
        """The broker, for messages (never with credentials)."""
        return self._config.url

    @property
    def connected(self) -> bool:
        """True while the connection is up."""
        return self._paho is not None and bool(self._paho.is_connected())

    async def open(self) -> None:
        """Connect (and log in); BrokerRefused / BrokerUnavailable on failure."""
        v5 = self._config.protocol == "5"
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = int(self._session_expiry)
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self._config.username,
            password=self._config.password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else not self._persistent,
            clean_start=(not self._persistent) if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            keepalive=max(1, round(float(self._config.keepalive))),
            timeout=float(self._config.connect_timeout),
            max_inflight_messages=self._max_inflight,
            tls_context=self._tls_context() if self._tls else None,
        )
        inner: Any = client._client  # paho: manual acks and PUBACK reason codes (module docstring)
        inner.manual_ack_set(self._manual_ack)
        wrapped = inner.on_publish

        def on_publish(*args: Any) -> None:
            # VERSION2 callback: (client, userdata, mid, reason_code, properties)
            mid, reason = args[2], args[3]
            waiter = self._acks.pop(mid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(_code(reason))
            wrapped(*args)

        inner.on_publish = on_publish
        _watch_writes_safely(client, inner)
        try:
            await client.__aenter__()
        except MqttConnectError as exc:
            code = _code(exc.rc)
            if code in _LOGIN_REFUSED:
                user = self._config.username
                who = f"user {user!r}" if user else "an anonymous client"
                raise BrokerRefused(
                    f"MQTT broker {self.where} refused the login of {who} ({_reason(exc)}): "
                    "check `username` / `password` and the broker's access rules"
                ) from None
            raise BrokerUnavailable(
                f"MQTT broker {self.where} refused the connection: {_reason(exc)}"
            ) from None
        except (aiomqtt.MqttError, OSError, ssl.SSLError) as exc:
            raise BrokerUnavailable(
                f"cannot connect to MQTT broker {self.where}: {_reason(exc)}"
            ) from None
        self._client, self._paho = client, inner

    async def close(self) -> None:
        """Disconnect; harmless when not connected."""
        client, self._client, self._paho = self._client, None, None
        for waiter in self._acks.values():
            if not waiter.done():
                waiter.cancel()
        self._acks.clear()
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
                await asyncio.wait_for(client.__aexit__(None, None, None), 5.0)

    async def subscribe(self, topics: list[str]) -> None:
        """Subscribe to every filter with QoS 1; BrokerRefused if the broker refuses one."""
        client = self._require()
        try:
            granted = await client.subscribe([(topic, 1) for topic in topics])
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(f"subscribing at {self.where} failed: {exc}") from None
        for topic, code in zip(topics, granted, strict=False):
            value = _code(code)
            if value >= 0x80:
                raise BrokerRefused(
                    f"MQTT broker {self.where} refused the subscription to {topic!r} "
                    f"(code 0x{value:02x}): check the broker's access rules"
                )

    async def messages(self) -> AsyncIterator[Received]:
        """Messages as they arrive, until the connection breaks (BrokerUnavailable)."""
        client = self._require()
        try:
            async for message in client.messages:
                payload = message.payload
                yield Received(
                    topic=message.topic.value,
                    payload=payload if isinstance(payload, bytes) else str(payload).encode(),
                    qos=message.qos,
                    retain=bool(message.retain),
                    mid=message.mid,
                    user_properties=_user_properties(message.properties),
                )
        except aiomqtt.MqttError as exc:
            raise BrokerUnavailable(
                f"lost the connection to MQTT broker {self.where}: {_reason(exc)}"
            ) from None

    def ack(self, message: Received) -> None:
        """Send the PUBACK of `message` (QoS 1; nothing for QoS 0)."""
        if message.qos and self._paho is not None:
            self._paho.ack(message.mid, message.qos)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool,
        timeout: float,
        user_properties: Mapping[str, str] | None = None,
    ) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK.

        BrokerUnavailable when the connection is down or no PUBACK came in `timeout`;
        BrokerRefused when an MQTT 5 broker answered with a failure reason code.
        """
        if not self.connected:
            raise BrokerUnavailable(f"not connected to MQTT broker {self.where}")
        properties = None
        if user_properties and self._config.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.UserProperty = list(user_properties.items())
        info = self._paho.publish(topic, payload, 1, retain, properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise BrokerUnavailable(
                f"cannot publish to MQTT broker {self.where}: {paho.error_string(info.rc)}"
            )
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if info.is_published():
            waiter.set_result(0)
        else:
            self._acks[info.mid] = waiter
        try:
            code = await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            raise BrokerUnavailable(
                f"no PUBACK from MQTT broker {self.where} within {timeout:g}s"
            ) from None
        except asyncio.CancelledError:
            if waiter.cancelled():  # close() while waiting: the connection is gone
                raise BrokerUnavailable(
                    f"lost the connection to MQTT broker {self.where} before its PUBACK"
                ) from None
            raise
        finally:
            self._acks.pop(info.mid, None)
        if code >= 0x80:
            raise BrokerRefused(
                f"MQTT broker {self.where} refused the message on {topic!r} (code 0x{code:02x})"
            )

    def _require(self) -> aiomqtt.Client:
        if self._client is None:
            raise BrokerUnavailable(f"not connected to MQTT broker {self.where}")
        return self._client

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self._config.ca_file)
        if self._config.cert_file and self._config.key_file:
            context.load_cert_chain(self._config.cert_file, self._config.key_file)
        return context


def _watch_writes_safely(client: aiomqtt.Client, inner: Any) -> None:
    """Replace aiomqtt's "watch the socket for writing" callback by one that cannot outlive
    the socket.

    paho asks for the socket to be watched whenever it queues a packet (a publish, a PUBACK,
    the DISCONNECT). aiomqtt 2.x always defers the `loop.add_writer(fd)` with
    `call_soon_threadsafe`, because paho may ask from the executor thread that runs
    `connect()`. When the broker drops the connection, the EOF can be read (and paho close
    the socket, unregistering a writer that was never added) after the request but before
    the deferred call runs: `add_writer` then hits a closed fd (EBADF / "fd is not
    registered", raised in an asynchronous callback) or, worse, whatever socket reuses that
    number. So: on the loop's own thread register at once (paho's later unregister then
    undoes it, in order); from another thread defer, and register only if the socket is
    still this client's and open when the loop gets to it.
    """
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()

    def write() -> None:
        # As aiomqtt's own callback: a failing write means the connection broke.
        try:
            inner.loop_write()
        except Exception as exc:
            disconnected: asyncio.Future[None] = client._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)

    def watch(sock: Any) -> None:
        if inner.socket() is sock and sock.fileno() >= 0:
            loop.add_writer(sock.fileno(), write)

    def on_socket_register_write(_client: Any, _userdata: Any, sock: Any) -> None:
        if threading.get_ident() == loop_thread:
            watch(sock)
        else:
            loop.call_soon_threadsafe(watch, sock)

    inner.on_socket_register_write = on_socket_register_write


def _user_properties(properties: Any) -> dict[str, str]:
    pairs = getattr(properties, "UserProperty", None) or []
    return {str(name): str(value) for name, value in pairs}


def _code(code: object) -> int:
    """The number of a paho `ReasonCode`, or of a plain int code (0 for None)."""
    value = getattr(code, "value", code)
    return value if isinstance(value, int) else 0


def _reason(exc: BaseException) -> str:
    """One line saying why, from aiomqtt's / paho's / the OS's error."""
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())
