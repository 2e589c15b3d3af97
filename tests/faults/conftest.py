"""Registers the `faults` mark: `pytest -m faults` runs this suite alone, `-m "not faults"` not."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: fault-injection scenarios (tests/faults/)")
