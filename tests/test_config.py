"""Config decoding: the example works, and every error names file, key path, line and remedy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from busway import Config, ConfigError, default_registry, load_config
from busway._config.durations import parse_duration
from busway._config.model import decode_config
from busway._config.plan import build_plan
from busway.adapters.file import FileSinkConfig
from busway.adapters.http import HttpSourceConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "busway.toml"

VALID = """
[nats]
data_dir = "var/nats"

[[streams]]
name = "ORDERS"
subjects = ["orders.>"]

[[sources]]
name = "orders-api"
type = "http"
path = "/orders"
subject = "orders.received"

[[routes]]
name = "big-orders"
from = "orders.received"
when = "total > `100`"
to = ["orders.big"]

[[sinks]]
name = "out"
type = "file"
from = "orders.big"
path = "out.jsonl"
"""


def decode(text: str, **environ: str) -> Config:
    registry = default_registry()
    return decode_config(
        text,
        file="busway.toml",
        source_types=registry.source_config,
        sink_types=registry.sink_config,
        environ=environ,
    )


def error_of(text: str, **environ: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        decode(text, **environ)
    return caught.value


def test_the_bundled_example_decodes_with_typed_adapters() -> None:
    registry = default_registry()
    config = load_config(
        EXAMPLE, source_types=registry.source_config, sink_types=registry.sink_config
    )
    assert [route.name for route in config.routes] == ["big-orders", "order-router"]
    assert [stage.kind for stage in config.routes[1].stages] == [
        "filter",
        "set",
        "remove",
        "switch",
    ]
    assert config.routes[0].from_ == "orders.received"
    assert isinstance(config.sources[0], HttpSourceConfig)
    assert isinstance(config.sinks[0], FileSinkConfig)
    assert config.nats.servers is None and config.nats.sync == "always"
    assert config.resolve_path(config.nats.data_dir) == EXAMPLE.parent / "var" / "nats"


def test_unknown_key_names_the_path_and_line() -> None:
    error = error_of(VALID.replace('to = ["orders.big"]', 'to = ["orders.big"]\ntoo = 1'))
    assert error.path == "$.routes[0]"
    assert error.file == "busway.toml"
    assert error.line == VALID.splitlines().index("[[routes]]") + 1
    assert "unknown field `too`" in str(error) and "check its spelling" in str(error)


def test_wrong_type_names_the_key_path_line_and_expectation() -> None:
    error = error_of(VALID.replace('to = ["orders.big"]', 'to = "orders.big"'))
    assert error.path == "$.routes[0].to"
    assert error.line == VALID.splitlines().index('to = ["orders.big"]') + 1
    assert "Expected `array`, got `str`" in str(error)
    assert str(error).startswith(f"busway.toml:{error.line} at $.routes[0].to:")


def test_second_route_error_points_at_the_second_table() -> None:
    text = (
        VALID + '\n[[routes]]\nname = "b"\nfrom = "orders.received"\nto = ["orders.x"]\nwhen = 5\n'
    )
    error = error_of(text)
    assert error.path == "$.routes[1].when"
    assert error.line == len(text.splitlines())


def test_unknown_adapter_type_lists_where_adapters_come_from() -> None:
    error = error_of(VALID.replace('type = "http"', 'type = "htp"'))
    assert error.path == "$.sources[0].type"
    assert "unknown source type 'htp'" in str(error)
    assert "busway.adapters" in str(error)


def test_missing_required_key_in_an_adapter_table() -> None:
    error = error_of(VALID.replace('path = "/orders"\n', ""))
    assert error.path == "$.sources[0]"
    assert "missing required field `path`" in str(error)


def test_subject_not_captured_by_any_stream_is_rejected_with_the_remedy() -> None:
    error = error_of(VALID.replace('to = ["orders.big"]', 'to = ["invoices.big"]'))
    assert error.path == "$.routes[0].to[0]"
    assert "no stream captures subject 'invoices.big'" in str(error)
    assert "[[streams]]" in str(error)


def test_route_that_would_feed_itself_is_rejected() -> None:
    error = error_of(VALID.replace('from = "orders.received"', 'from = "orders.>"', 1))
    assert error.path == "$.routes[0].to[0]"
    assert "forever" in str(error)


def test_overlapping_streams_are_rejected() -> None:
    text = VALID + '\n[[streams]]\nname = "ALL"\nsubjects = ["orders.*"]\n'
    error = error_of(text)
    assert error.path == "$.streams[1].subjects[0]"
    assert "overlaps stream 'ORDERS'" in str(error)


def test_wildcards_are_rejected_where_a_literal_subject_is_needed() -> None:
    error = error_of(VALID.replace('to = ["orders.big"]', 'to = ["orders.*"]'))
    assert error.path == "$.routes[0].to[0]"
    assert "without wildcards" in str(error)


def test_duplicate_names_are_rejected() -> None:
    text = (
        VALID + '\n[[routes]]\nname = "big-orders"\nfrom = "orders.received"\nto = ["orders.x"]\n'
    )
    error = error_of(text)
    assert error.path == "$.routes[1].name"
    assert "used twice" in str(error)


def test_environment_and_file_references_are_resolved(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    text = VALID.replace(
        'data_dir = "var/nats"',
        f'data_dir = "${{DATA}}/nats"\ntoken = "${{file:{secret}}}"\nname = "$${{literal}}"',
    )
    config = decode(text, DATA="/srv/busway")
    assert config.nats.data_dir == "/srv/busway/nats"
    assert config.nats.token == "s3cret"
    assert config.nats.name == "${literal}"


def test_missing_environment_variable_names_it_and_the_key() -> None:
    error = error_of(VALID.replace('data_dir = "var/nats"', 'data_dir = "${BUSWAY_NOPE}"'))
    assert error.path == "$.nats.data_dir"
    assert "BUSWAY_NOPE is not set" in str(error)
    assert error.line == 3


def test_invalid_duration_says_what_is_accepted() -> None:
    text = VALID.replace(
        'subjects = ["orders.>"]', 'subjects = ["orders.>"]\nduplicate_window = "5 minutes"'
    )
    error = error_of(text)
    assert error.path == "$.streams[0].duplicate_window"
    assert "'500ms', '5s', '2m'" in str(error)


def test_invalid_toml_names_the_file_and_position() -> None:
    error = error_of("[nats\n")
    assert error.file == "busway.toml"
    assert "invalid TOML" in str(error) and "line 1" in str(error)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    registry = default_registry()
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(
            tmp_path / "missing.toml",
            source_types=registry.source_config,
            sink_types=registry.sink_config,
        )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), (3, 3.0), (0.25, 0.25)],
)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5", "-1s", "1 week", True, -2])
def test_bad_durations_are_rejected(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


STAGED = """
[[streams]]
name = "ORDERS"
subjects = ["orders.>"]

[[routes]]
name = "r"
from = "orders.in"
STAGES
"""


@pytest.mark.parametrize(
    ("stages", "path", "message"),
    [
        (
            'stages = [{ filter = "a", transform = "b" }]',
            "$.routes[0].stages[0]",
            "exactly one kind",
        ),
        (
            'stages = [{ switch = { cases = [{ when = "a", to = ["elsewhere.x"] }] } }]',
            "$.routes[0].stages[0].switch.cases[0].to[0]",
            "no stream captures subject 'elsewhere.x'",
        ),
        (
            'stages = [{ filter = "a" }]',
            "$.routes[0].to",
            "(or a `switch` or `reply` stage)",
        ),
        (
            'to = ["orders.out"]\nmax_in_flight = 10\n'
            'stages = [{ aggregate = { by = "a", count = 50 } }]',
            "$.routes[0].stages[0].aggregate.count",
            "exceeds max_in_flight 10",
        ),
        (
            'to = ["orders.out"]\nstages = [{ wiretap = "orders.in" }]',
            "$.routes[0].stages[0].wiretap",
            "route its outputs again forever",
        ),
        (
            'to = ["orders.out"]\nstages = [{ throttle = { rate = 0 } }]',
            "$.routes[0].stages[0].throttle",
            "rate` must be at least 1",
        ),
    ],
)
def test_stage_errors_name_their_path(stages: str, path: str, message: str) -> None:
    error = error_of(STAGED.replace("STAGES", stages))
    assert error.path == path
    assert message in str(error)


def test_a_templated_source_subject_must_be_captured_too() -> None:
    text = """
[[streams]]
name = "ORDERS"
subjects = ["orders.>"]

[[sources]]
name = "api"
type = "http"
path = "/x/{region}"
subject = "SUBJECT"
"""
    decode(text.replace("SUBJECT", "orders.{region}"))
    error = error_of(text.replace("SUBJECT", "invoices.{region}"))
    assert error.path == "$.sources[0].subject"
    assert "no stream captures subject 'invoices.*'" in str(error)


# ---------------------------------------------------------------------------------------------
# Hostile input: every one is a one-line ConfigError, never another exception or a hang.


def load_bytes(tmp_path: Path, content: bytes) -> ConfigError:
    path = tmp_path / "busway.toml"
    path.write_bytes(content)
    registry = default_registry()
    with pytest.raises(ConfigError) as caught:
        load_config(path, source_types=registry.source_config, sink_types=registry.sink_config)
    assert caught.value.file == str(path)
    return caught.value


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    error = load_bytes(tmp_path, b'[nats]\nname = "caf\xe9"\n')
    assert error.line == 2
    assert "not valid UTF-8 (byte 0xe9 on line 2)" in str(error)


def test_a_config_path_that_is_a_device_is_refused_without_reading_it(tmp_path: Path) -> None:
    registry = default_registry()
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config(
            "/dev/zero", source_types=registry.source_config, sink_types=registry.sink_config
        )


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("/dev/zero", "is not a regular file"),
        ("/", "Is a directory"),
        ("", "names no file"),
        ("/nonexistent/secret", "No such file or directory"),
    ],
)
def test_file_references_that_cannot_be_a_secret_are_refused(reference: str, message: str) -> None:
    error = error_of(f'[nats]\nname = "${{file:{reference}}}"\n')
    assert error.path == "$.nats.name"
    assert error.line == 2
    assert message in str(error)


def test_a_fifo_nobody_writes_to_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "secret"
    os.mkfifo(fifo)
    error = error_of(f'[nats]\nname = "${{file:{fifo}}}"\n')
    assert "is not a regular file" in str(error)
    registry = default_registry()
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config(fifo, source_types=registry.source_config, sink_types=registry.sink_config)


def test_a_huge_referenced_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"x" * (1024 * 1024 + 1))
    error = error_of(f'[nats]\nname = "${{file:{big}}}"\n')
    assert "larger than 1024 KiB" in str(error)


@pytest.mark.parametrize(
    "value", ["[" * 5000 + "]" * 5000, "{a = " * 5000 + "1" + "}" * 5000, "[" * 40 + "]" * 40]
)
def test_deep_nesting_is_refused(value: str) -> None:
    error = error_of(f"[nats]\nname = {value}\n")
    assert "nested more than 32 levels deep" in str(error)
    assert error.line == 2


def test_nul_characters_are_refused_where_they_would_reach_paths_and_subjects() -> None:
    error = error_of('[nats]\ndata_dir = "var/\\u0000nats"\n')
    assert error.path == "$.nats.data_dir"
    assert "NUL character" in str(error)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("inf", "at most 100 years"),
        ("nan", "number of seconds, got nan"),
        ("-1", "cannot be negative"),
        ("1e300", "at most 100 years"),
        ('"99999999999999999999999999d"', "at most 100 years"),
        ("123456789012345678901234567890", "at most 100 years"),
    ],
)
def test_durations_are_finite_and_bounded(value: str, message: str) -> None:
    error = error_of(f"shutdown_timeout = {value}\n")
    assert error.path == "$.shutdown_timeout"
    assert message in str(error)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_in_flight = 0", "Expected `int` >= 1"),
        ("max_in_flight = 18446744073709551616", "Expected `int` <= 1000000"),
        ("retry = { max_attempts = -3 }", "Expected `int` >= 1"),
        ('ack_wait = "0s"', "ack_wait must be more than 0s"),
    ],
)
def test_counts_and_waits_are_bounded(setting: str, message: str) -> None:
    error = error_of(STAGED.replace("STAGES", f'to = ["orders.out"]\n{setting}'))
    assert error.path is not None and error.path.startswith("$.routes[0]")
    assert message in str(error)


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        (
            '[[streams]]\nname = "S"\nsubjects = ["s.>"]\nmax_age = "1m"\n',
            "$.streams[0]",
            "duplicate_window (300s) is longer than max_age (60s)",
        ),
        ('[[streams]]\nname = "S"\nsubjects = ["s.>"]\nmax_bytes = -1\n', "", ">= 1"),
        ('[[streams]]\nname = "S"\nsubjects = ["s.>"]\nreplicas = 7\n', "", "<= 5"),
        (
            '[[streams]]\nname = "S"\nsubjects = ["busway.>"]\n',
            "$.streams[0].subjects[0]",
            "overlaps 'busway.deadletter.>', where dead letters go",
        ),
        (
            '[[streams]]\nname = "S"\nsubjects = [">"]\n',
            "$.streams[0].subjects[0]",
            "overlaps",
        ),
        ('state_bucket = "a.b"\n', "$.state_bucket", "must be 1-64 letters"),
        ('[dead_letter]\nsubject_prefix = "dl.*"\n', "$.dead_letter.subject_prefix", "invalid"),
        ("[nats]\nservers = []\n", "$.nats.servers", "servers is empty"),
        ('[nats]\nservers = ["nats://host:99999"]\n', "$.nats.servers", "expected a URL"),
        ('[nats]\nservers = ["http://host:4222"]\n', "$.nats.servers", "expected a URL"),
        ('[nats]\nsync = "1d"\n', "$.nats.sync", "ms, s, m or h over 0"),
        ('[nats]\ndata_dir = "a\\"b"\n', "$.nats.data_dir", "quotes, backslashes"),
        ('[nats]\nlisten = "a b:4222"\n', "$.nats.listen", "expected host:port"),
        ("[nats]\npublish_timeout = 0\n", "$.nats.publish_timeout", "must be more than 0s"),
    ],
)
def test_settings_jetstream_or_the_server_would_refuse_at_start_are_refused_by_check(
    text: str, path: str, message: str
) -> None:
    error = error_of(text)
    assert message in str(error)
    if path:
        assert error.path == path


def test_a_dead_letter_max_age_below_the_duplicate_window_shortens_the_window() -> None:
    config = decode('[dead_letter]\nmax_age = "1m"\n')
    assert config.dead_letter_stream.duplicate_window == 60.0


def test_a_toml_datetime_is_read_as_an_rfc3339_string() -> None:
    error = error_of("[nats]\nname = 2025-01-01T00:00:00Z\nlisten = 3\n")
    assert error.path == "$.nats.listen"  # name was accepted as a string


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("a." * 500_000 + "a", "more than the 16384 allowed"),
        ("(" * 3000 + "a" + ")" * 3000, "nested too deeply"),
        ("a || " * 3000 + "a", "nested too deeply"),
    ],
    ids=["megabyte", "parentheses", "or-chain"],
)
def test_huge_or_deep_expressions_are_config_errors(expression: str, message: str) -> None:
    config = decode(STAGED.replace("STAGES", f'to = ["orders.out"]\nwhen = "{expression}"'))
    with pytest.raises(ConfigError) as caught:
        build_plan(config, default_registry())
    assert caught.value.path == "$.routes[0].when"
    assert message in str(caught.value)
