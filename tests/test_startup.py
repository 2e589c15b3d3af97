"""`busway run` that cannot start says why in one line on stderr and exits 2, at once.

Each case runs the daemon as a user does (a subprocess) against real parts: a second
nats-server or a plain TCP listener holding the embedded server's port, a second daemon on the
same data_dir, a port that refuses, a server that accepts TCP and never answers, a server with
users whose password is wrong, a missing key file, a certificate that does not load.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import nats
import pytest

from tests.configs import config_toml
from tests.support import Daemons, NatsServer, free_port, run_cli, wait_for_port

STREAMS = """
[[streams]]
name = "ORDERS"
subjects = ["orders.>"]

[[routes]]
name = "forward"
from = "orders.in"
to = ["orders.out"]
"""


def embedded_config(tmp_path: Path, nats_port: int, *, http: str = "127.0.0.1:0") -> Path:
    config = tmp_path / "busway.toml"
    config.write_text(
        config_toml(None, nats_listen=f"127.0.0.1:{nats_port}", http=http, body=STREAMS)
    )
    return config


def external_config(tmp_path: Path, nats: str, *, http: str = "127.0.0.1:0") -> Path:
    config = tmp_path / "busway.toml"
    config.write_text(
        f"""
shutdown_timeout = "100s"

[nats]
{nats}

[http]
listen = "{http}"
{STREAMS}"""
    )
    return config


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The daemon exited 2 with exactly one line on stderr, holding every fragment."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot start: " in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A plain TCP listener on a free loopback port: accepts connections, never speaks NATS."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def test_embedded_port_held_by_another_nats_server(tmp_path: Path) -> None:
    """Today's bug: busway logged "listening" and used the other deployment's server."""
    (tmp_path / "other").mkdir()
    other = NatsServer(tmp_path / "other", extra_config='server_name: "other-deployment"')
    try:
        result = run_cli("run", str(embedded_config(tmp_path, other.port)))

        async def streams_on_the_other_server() -> int:
            client = await nats.connect(other.url)
            try:
                return (await client.jetstream().account_info()).streams
            finally:
                await client.close()

        streams = anyio.run(streams_on_the_other_server)
    finally:
        other.stop()
    assert_one_line_exit_2(
        result,
        f"127.0.0.1:{other.port} ([nats] listen) is already in use by another nats-server "
        "(server_name 'other-deployment')",
        "set another [nats] listen",
    )
    assert streams == 0, "busway declared its streams on a server it did not start"


def test_embedded_port_held_by_a_plain_tcp_listener(
    tmp_path: Path, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    result = run_cli("run", str(embedded_config(tmp_path, port)))
    assert_one_line_exit_2(
        result, f"127.0.0.1:{port} ([nats] listen) is already in use by another process"
    )


def test_a_second_daemon_on_the_same_data_dir_is_refused(
    tmp_path: Path,
    daemons: Daemons,
) -> None:
    http_port = free_port()
    first_config = embedded_config(tmp_path, 0, http=f"127.0.0.1:{http_port}")
    first = daemons.start(first_config)
    first.wait_ready()
    (tmp_path / "second").mkdir()
    second_config = tmp_path / "second" / "busway.toml"
    # Same data_dir (absolute), its own ports: only the store is shared.
    second_config.write_text(
        first_config.read_text()
        .replace('data_dir = "var/nats"', f'data_dir = "{tmp_path}/var/nats"')
        .replace(f'listen = "127.0.0.1:{http_port}"', 'listen = "127.0.0.1:0"')
    )
    result = run_cli("run", str(second_config))
    assert_one_line_exit_2(
        result,
        f"[nats] data_dir {tmp_path}/var/nats is in use by busway (pid {first.process.pid})",
    )
    assert httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200
    assert first.terminate() == 0


def test_http_port_taken_fails_before_anything_starts(
    tmp_path: Path, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    config = embedded_config(tmp_path, 0, http=f"127.0.0.1:{port}")
    result = run_cli("run", str(config))
    assert_one_line_exit_2(result, f"cannot listen on 127.0.0.1:{port} ([http] listen)")
    assert not (tmp_path / "var" / "nats" / "nats-server.log").exists(), "no server was started"


def test_a_certificate_that_does_not_load_fails_before_anything_starts(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    config = embedded_config(tmp_path, 0)
    config.write_text(
        config.read_text().replace(
            "[http]\n", '[http]\ntls_cert = "cert.pem"\ntls_key = "key.pem"\n'
        )
    )
    result = run_cli("run", str(config))
    assert_one_line_exit_2(result, "cannot load the TLS certificate", "([http] tls_cert, tls_key)")
    assert not (tmp_path / "var" / "nats" / "nats-server.log").exists(), "no server was started"


def test_unreachable_nats_gives_up_after_connect_timeout(tmp_path: Path) -> None:
    """Today nats-py retried forever (two warnings a second) and the daemon never exited."""
    port = free_port()  # nothing listens: every attempt is refused
    config = external_config(
        tmp_path, f'servers = ["nats://127.0.0.1:{port}"]\nconnect_timeout = "1s"'
    )
    result = run_cli("run", str(config), timeout=60)
    assert_one_line_exit_2(
        result,
        f"cannot connect to NATS at nats://127.0.0.1:{port} within 1s ([nats] connect_timeout)",
        "Connection refused",
    )


def test_refused_credentials_fail_at_once(tmp_path: Path) -> None:
    (tmp_path / "nats").mkdir()
    server = NatsServer(
        tmp_path / "nats",
        extra_config='authorization { user: "busway", password: "right" }',
    )
    try:
        config = external_config(
            tmp_path,
            f'servers = ["{server.url}"]\nuser = "busway"\npassword = "wrong"\n'
            'connect_timeout = "600s"',
        )
        result = run_cli("run", str(config), timeout=60)
    finally:
        server.stop()
    assert_one_line_exit_2(
        result, f"NATS at {server.url} refused busway's credentials", "Authorization Violation"
    )


def test_a_missing_credentials_file(tmp_path: Path, nats_server: NatsServer) -> None:
    config = external_config(
        tmp_path, f'servers = ["{nats_server.url}"]\ncredentials = "missing.creds"'
    )
    result = run_cli("run", str(config))
    assert_one_line_exit_2(
        result,
        f"cannot read [nats] credentials file {tmp_path / 'missing.creds'}: No such file",
    )


def test_sigterm_while_connecting_stops_at_once(tmp_path: Path, listener: socket.socket) -> None:
    """A server that accepts TCP but never sends INFO: the daemon waits in its first connect.

    Today SIGTERM there only set a 115 s deadline (shutdown_timeout + 15 s), and the connect
    went on; now nothing is running yet, so the daemon stops at once.
    """
    port = listener.getsockname()[1]
    config = external_config(
        tmp_path, f'servers = ["nats://127.0.0.1:{port}"]\nconnect_timeout = "600s"'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "busway", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        listener.settimeout(60)
        connection, _ = listener.accept()  # the daemon is connecting now
        connection.close()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "SIGTERM received while starting: stopping" in stderr
    assert "Traceback" not in stderr


def test_busway_run_still_starts_on_the_port_it_is_given(
    tmp_path: Path,
    daemons: Daemons,
) -> None:
    """The identity checks accept the server busway started, on a fixed port."""
    port = free_port()
    daemon = daemons.start(embedded_config(tmp_path, port))
    daemon.wait_ready()
    wait_for_port(port)
    assert f"listening on nats://127.0.0.1:{port}" in daemon.output()
    assert daemon.terminate() == 0
