"""`busway run` with an amqp source or sink whose broker is unreachable or refuses the login:
a one-line error naming the component and what to do, exit 2, and never the password."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.amqp.servers import RabbitServer
from tests.configs import config_toml
from tests.support import Daemons, free_port


def _run_until_exit(daemons: Daemons, tmp_path: Path, body: str) -> tuple[int, str]:
    path = tmp_path / "busway.toml"
    stream = '[[streams]]\nname = "S"\nsubjects = ["amqp.>"]\n'
    path.write_text(config_toml(None, streams=[stream], body=body))
    daemon = daemons.start(path)
    assert daemon.process is not None
    code = daemon.process.wait(timeout=120)
    return code, daemon.output()


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if " ERROR " in line or "Traceback" in line]


@pytest.mark.parametrize("kind", ["source", "sink"])
def test_an_unreachable_broker_stops_start_with_one_line(
    daemons: Daemons, tmp_path: Path, kind: str
) -> None:
    url = f"amqp://busway:topsecret@127.0.0.1:{free_port()}/"
    head = 'queue = "q"\nsubject = "amqp.in"' if kind == "source" else 'from = "amqp.out"'
    body = f'[[{kind}s]]\nname = "rabbit"\ntype = "amqp"\nurl = "{url}"\n{head}\n'
    code, output = _run_until_exit(daemons, tmp_path, body)
    assert code == 2, output
    [line] = _error_lines(output)
    assert f"amqp {kind} 'rabbit'" in line
    assert "is not reachable" in line and "set `startup_timeout`" in line
    assert "topsecret" not in output
    assert "Traceback" not in output


def test_a_refused_login_says_so_without_the_password(
    daemons: Daemons, tmp_path: Path, rabbit_server: RabbitServer
) -> None:
    url = f"amqp://busway:wrong-secret-42@127.0.0.1:{rabbit_server.port}/"
    body = (
        f'[[sources]]\nname = "rabbit"\ntype = "amqp"\nurl = "{url}"\n'
        'queue = "q"\nsubject = "amqp.in"\nstartup_timeout = "30s"\n'
    )
    code, output = _run_until_exit(daemons, tmp_path, body)
    assert code == 2, output
    [line] = _error_lines(output)
    assert "refused the login: check the user, password and vhost" in line
    assert "amqp://busway:***@127.0.0.1" in line
    assert "wrong-secret-42" not in output
    assert "Traceback" not in output
