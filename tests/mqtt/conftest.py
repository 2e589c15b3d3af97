"""Fixtures: a throwaway Mosquitto broker per test (skipped without Debian's `mosquitto`,
except under CI, where a missing broker fails the tests as a missing database server does)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.mqtt.broker import MosquittoBroker, mosquitto_available


def require_mosquitto() -> None:
    """Skip (locally) or fail (CI) when mosquitto is not installed."""
    if not mosquitto_available():
        message = "mosquitto not installed: apt-get install -y mosquitto"
        if os.environ.get("CI") or os.environ.get("BUSWAY_REQUIRE_DATABASES"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def mosquitto() -> Iterator[MosquittoBroker]:
    """An anonymous broker, fresh for this test."""
    require_mosquitto()
    broker = MosquittoBroker()
    yield broker
    broker.close()


@pytest.fixture
def mosquitto_auth() -> Iterator[MosquittoBroker]:
    """A broker that lets in only user `device` with password `s3cret-pw`."""
    require_mosquitto()
    broker = MosquittoBroker(users={"device": "s3cret-pw"})
    yield broker
    broker.close()
