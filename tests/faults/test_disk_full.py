"""Disk full under the file sink: nak and back off, no partial line, recover when space returns.

The file lives on a 128 KiB tmpfs mounted by the test (it runs as root here); where mounting is
not allowed, a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored) on this process stands in
for it, which fails writes the same way part-way (EFBIG instead of ENOSPC). 4,000 messages
need about four times the room: the sink fills the disk, its writes fail, it naks with
back-off, its readiness and circuit say so, and the file holds only whole lines. Then the
tmpfs is enlarged (`mount -o remount,size=`) or the limit lifted, and every message ends in the
file exactly once.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures
from tests.support import NatsServer, decode_test_config, eventually, wait_settled

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

TOTAL = 4_000
# BUSWAY_FAULT_DISK=rlimit runs the fallback even where mounting works.
FORCE_RLIMIT = os.environ.get("BUSWAY_FAULT_DISK") == "rlimit"
SMALL = 128 * 1024


class Disk:
    """A small volume for the sink's directory that can be given more room later."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.kind = ""
        self._limits: tuple[int, int] | None = None

    @contextlib.contextmanager
    def small(self) -> Iterator[Disk]:
        """Mount a SMALL tmpfs (or limit file sizes to SMALL) for the duration."""
        self.directory.mkdir()
        if not FORCE_RLIMIT and self._mount():
            self.kind = "tmpfs"
            try:
                yield self
            finally:
                subprocess.run(["umount", "-l", str(self.directory)], check=False)
            return
        self.kind = "rlimit_fsize"
        self._limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (SMALL, self._limits[1]))
        try:
            yield self
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, self._limits)
            signal.signal(signal.SIGXFSZ, previous)

    def _mount(self) -> bool:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SMALL}", "tmpfs", str(self.directory)],
            capture_output=True,
            check=False,
        )
        return mounted.returncode == 0

    def grow(self) -> None:
        """Give the volume room (16 MiB), as an operator freeing space would."""
        if self.kind == "tmpfs":
            subprocess.run(
                ["mount", "-o", "remount,size=16m", str(self.directory)],
                check=True,
                capture_output=True,
            )
        else:
            assert self._limits is not None
            resource.setrlimit(resource.RLIMIT_FSIZE, self._limits)


def whole_lines(path: Path) -> list[int]:
    """The ids in the file, asserting it ends on a line boundary and every line is JSON."""
    data = path.read_bytes() if path.exists() else b""
    assert data == b"" or data.endswith(b"\n"), f"partial line at the end: {data[-80:]!r}"
    return [orjson.loads(line)["id"] for line in data.splitlines()]


async def test_disk_full_naks_keeps_whole_lines_and_recovers_exactly_once(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    disk = Disk(tmp_path / "volume")
    out = disk.directory / "orders.jsonl"
    config = decode_test_config(
        config_toml(nats_server, streams=[stream_table(f"DF_{unique}", f"df{unique}.>")])
        + f"""
[[sinks]]
name = "disk{unique}"
type = "file"
from = "df{unique}.orders"
path = "{out}"
batch_size = 64
retry = {{ max_attempts = 10000, backoff = "50ms", max_backoff = "500ms" }}
circuit = {{ failures = 5, cool_down = "500ms" }}
""",
        tmp_path,
    )
    padding = "x" * 100  # about 130 bytes a line: 4,000 lines need about 4x the room
    with disk.small():
        async with Bus(config) as bus:
            stats = bus.metrics.stats[0]
            js = nc.jetstream(publish_async_max_pending=500)
            for n in range(TOTAL):
                await js.publish_async(
                    f"df{unique}.orders", orjson.dumps({"id": n, "padding": padding})
                )
            await js.publish_async_completed()

            async def full() -> bool:
                return stats.retried >= 20 and not bus.readiness()[f"sink:disk{unique}"]

            await eventually(full)
            written_while_full = whole_lines(out)  # no partial line while the disk is full
            retried_while_full = stats.retried
            errors_while_full = dict(stats.errors)
            assert len(written_while_full) < TOTAL

            disk.grow()
            await wait_settled(nc, f"DF_{unique}", f"busway-sink-disk{unique}", timeout=120)
            ready_after = bus.readiness()[f"sink:disk{unique}"]
            dead_lettered = stats.dead_lettered
        written = whole_lines(out)

    Figures.of(
        "disk-full",
        range(TOTAL),
        written,
        volume=disk.kind,
        lines_while_full=len(written_while_full),
        retried_while_full=retried_while_full,
        errors_while_full=errors_while_full,
        dead_lettered=dead_lettered,
    ).report()

    assert sorted(written) == list(range(TOTAL))  # every message once, nothing lost
    assert written[: len(written_while_full)] == written_while_full  # nothing rewritten
    assert dead_lettered == 0
    assert ready_after is True
    assert errors_while_full.get("retryable", 0) > 0
