"""One builder for the configs the tests run on: the `[nats]`, `[http]` and `[[streams]]` prelude.

Every integration test needs the same opening: a `[nats]` table on the test's own nats-server
(or an embedded server whose store is in the test's directory), an `[http]` listener that never
takes a fixed port, and the streams that capture its subjects. `config_toml` writes it, the test
adds what it is about (routes, sinks, sources, dead letters) as TOML a user would write:

    text = config_toml(nats_server, streams=io_streams(unique), body=f'''
    [[routes]]
    name = "r{unique}"
    from = "in{unique}.orders"
    to = ["out{unique}.orders"]
    ''')
    config = decode_test_config(text, tmp_path)

The listener defaults to `127.0.0.1:0` (any free port; `Bus.http_port` tells which) and an
embedded server to `127.0.0.1:0` as well, so two test runs on one machine never collide.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tests.support import NatsServer

FREE = "127.0.0.1:0"
"""A loopback listen address on any free port."""

TomlValue = str | int | float | bool | Sequence[str]


def toml_value(value: TomlValue) -> str:
    """`value` as a TOML literal (strings quoted, lists inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(json.dumps(item) for item in value) + "]"


def keys(values: Mapping[str, TomlValue] | str) -> str:
    """TOML `key = value` lines; a string is taken as lines already written."""
    if isinstance(values, str):
        return values
    return "\n".join(f"{key} = {toml_value(value)}" for key, value in values.items())


def stream_table(name: str, *subjects: str, **options: TomlValue) -> str:
    """A `[[streams]]` table named `name` capturing `subjects`, with more keys in `options`."""
    lines = [
        "[[streams]]",
        f"name = {toml_value(name)}",
        f"subjects = {toml_value(list(subjects))}",
    ]
    lines += [f"{key} = {toml_value(value)}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def io_streams(unique: str, **options: TomlValue) -> list[str]:
    """The usual pair: `IN_<unique>` capturing `in<unique>.>`, `OUT_<unique>` `out<unique>.>`."""
    return [
        stream_table(f"IN_{unique}", f"in{unique}.>", **options),
        stream_table(f"OUT_{unique}", f"out{unique}.>", **options),
    ]


def dead_letter_table(token: str) -> str:
    """A `[dead_letter]` table: stream `DL_<token>`, subjects under `dl<token>`."""
    return f'[dead_letter]\nstream = "DL_{token}"\nsubject_prefix = "dl{token}"\n'


def nats_table(
    nats: NatsServer | str | None,
    *,
    data_dir: str | Path = "var/nats",
    listen: str = FREE,
    options: Mapping[str, TomlValue] | str = "",
) -> str:
    """The `[nats]` table: the servers of `nats` (a server the test owns or a URL), or, when
    `nats` is None, an embedded server with its store in `data_dir` listening on `listen`."""
    if nats is None:
        lines = [f"listen = {toml_value(listen)}", f"data_dir = {toml_value(str(data_dir))}"]
    else:
        url = nats.url if isinstance(nats, NatsServer) else nats
        lines = [f"servers = {toml_value([url])}"]
    extra = keys(options)
    return "[nats]\n" + "\n".join(lines) + (f"\n{extra}" if extra else "") + "\n"


def config_toml(
    nats: NatsServer | str | None,
    *,
    streams: Iterable[str] = (),
    body: str = "",
    http: str = FREE,
    publish_timeout: str | None = None,
    nats_options: Mapping[str, TomlValue] | str = "",
    http_options: Mapping[str, TomlValue] | str = "",
    data_dir: str | Path = "var/nats",
    nats_listen: str = FREE,
    top: Mapping[str, TomlValue] | str = "",
    dead_letter: str | None = None,
) -> str:
    """A whole config as TOML text.

    `nats`: the test's server (or its URL); None starts an embedded server in `data_dir`
    (relative paths start at the config's directory) on `nats_listen`. `http`: the shared
    listener's address (`""` turns it off). `top`: top-level keys, written first as TOML wants.
    `dead_letter`: a token naming the test's own dead-letter stream (`DL_<token>`) and subject
    prefix (`dl<token>`), so what it lists and replays is only what it dead-lettered itself.
    `body`: the tables the test is about, appended as given.
    """
    nats_extra = keys(nats_options)
    if publish_timeout is not None:
        nats_extra = f"publish_timeout = {toml_value(publish_timeout)}\n{nats_extra}".strip()
    http_extra = keys(http_options)
    parts = [
        keys(top),
        nats_table(nats, data_dir=data_dir, listen=nats_listen, options=nats_extra),
        f"[http]\nlisten = {toml_value(http)}" + (f"\n{http_extra}" if http_extra else "") + "\n",
        dead_letter_table(dead_letter) if dead_letter is not None else "",
        *streams,
        body,
    ]
    return "\n".join(part.strip("\n") + "\n" for part in parts if part.strip())
