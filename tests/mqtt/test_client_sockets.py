"""The source's/sink's MQTT `Session` and its socket: a connection the broker drops while a
packet waits to be written must leave nothing registered on the event loop for its dead fd."""

from __future__ import annotations

import asyncio

import pytest

from busway.adapters.mqtt._client import Session
from busway.adapters.mqtt._config import MqttConnection
from tests.mqtt.broker import MosquittoBroker

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_connection_dropped_with_a_write_pending_registers_no_writer_for_its_fd(
    mosquitto: MosquittoBroker,
) -> None:
    """A publish (or a PUBACK) queues a packet and asks for the socket to be watched for
    writing; if the broker's EOF is read before the loop ran that request, paho closes the
    socket first. The request must then do nothing: before the fix it called
    `loop.add_writer()` on the closed fd (EBADF / "fd is not registered" in an asynchronous
    callback, which anyio's test runner raises when the loop closes), or on whatever socket
    had reused its number since."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        session = Session(
            MqttConnection(url=mosquitto.url), client_id="busway-socket-test", persistent=False
        )
        await session.open()
        paho = session._paho
        fd = paho.socket().fileno()
        mosquitto.stop(kill=True)  # the broker's EOF is now waiting on the socket
        # All in one step of the event loop, as when the source acknowledges a message in the
        # same loop iteration as its socket reports the broker gone:
        paho.publish("devices/x", b"1", 1)  # queues the packet: "register the socket for write"
        paho.loop_read()  # reads the EOF: paho closes the socket
        assert paho.socket() is None
        for _ in range(5):  # let the loop run every callback scheduled so far
            await asyncio.sleep(0)
        assert errors == []
        assert fd not in _watched_fds(loop)
        await session.close()
    finally:
        loop.set_exception_handler(None)


def _watched_fds(loop: asyncio.AbstractEventLoop) -> set[int]:
    selector = loop._selector  # type: ignore[attr-defined]
    return {key.fd for key in selector.get_map().values()}
