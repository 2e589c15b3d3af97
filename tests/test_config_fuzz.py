"""`busway check` on hostile configs: mutations of the deploy/ examples never make it crash.

A property-based test (hypothesis) takes each example config and mutates it: bytes inserted,
deleted or replaced, values swapped for hostile ones (`inf`, `nan`, huge and negative numbers,
`${file:/dev/zero}`, 1 MB strings, deep nesting...), lines deleted or duplicated. Whatever comes
out, `busway check` answers exit 0, or exit 2 with exactly one line on stderr, never a
traceback. A config it accepts must also compile into a `Bus` (what `busway run` does before it
connects) without any error at all.

The checks run in-process through the CLI's entry function (fast enough for a few hundred
examples); a few subprocess runs confirm the same contract end to end.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from busway import Bus, ConfigError, default_registry
from busway._cli.main import main
from busway._config.model import load_config
from tests.support import REPO, run_cli

EXAMPLES = sorted(
    path
    for path in [*REPO.glob("deploy/*.toml"), *REPO.glob("deploy/*/*.toml")]
    if not path.name.endswith(".test.toml")  # route test cases, not configs
)

# The examples read secrets from the environment; set them so unmutated examples pass.
ENVIRONMENT = {
    "CRM_URL": "https://crm.example",
    "WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "PGPASSWORD": "secret",
    "MYSQL_PASSWORD": "secret",
}

HOSTILE_VALUES = [
    "inf",
    "-inf",
    "nan",
    "-1",
    "0",
    "-0.0",
    "1e308",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551616",
    "99999999999999999999999999999999",
    '"99999999999999999999999999d"',
    '"1e999s"',
    '"-5s"',
    '"0s"',
    '"nan"',
    '"inf"',
    "true",
    "1979-05-27T07:32:00Z",
    "1979-05-27",
    "07:32:00",
    "[]",
    "{}",
    '""',
    '" "',
    '"\\u0000"',
    '"a\\u0000b"',
    '"\\n"',
    '"${file:/dev/zero}"',
    '"${file:/dev/urandom}"',
    '"${file:/}"',
    '"${file:/nonexistent/secret}"',
    '"${file:}"',
    '"${BUSWAY_FUZZ_MISSING}"',
    '"${}"',
    '"${"',
    '"$${x}"',
    '"*"',
    '">"',
    '"a.>.b"',
    '"orders.>"',
    '"busway.deadletter.>"',
    '"127.0.0.1:99999"',  # never bound: an invalid port
    '"[::1]:0"',
    '"\\ud7ff"',
    '"💥"',
    '"((((((((((((((((((((((((((((((((((((((((((((((((((("',
    '"`{\\"a\\": 1}`"',
    '"length(@)"',
]

# Large or deep values are built on demand (hypothesis prints the failing example).
BUILDERS = {
    "deep array": lambda n: "[" * n + "]" * n,
    "deep table": lambda n: "{a = " * n + "1" + "}" * n,
    "long string": lambda n: '"' + "a" * (n * 100) + '"',
    "long expression": lambda n: '"' + "(" * n + "a" + ")" * n + '"',
    "long or": lambda n: '"' + " || ".join(["a"] * n) + '"',
    "many subjects": lambda n: "[" + ", ".join(f'"s{i}.x"' for i in range(n)) + "]",
}

# Mostly characters that mean something in TOML or in busway's values, so that byte mutations
# reach the decoder and the checks behind the TOML parser, not only the parser.
TOML_CHARACTERS = "[]{}=\"'.,#*>$:/\\ \n\t0123456789aZ_-\u00e9"

HEADER = re.compile(rb"^\[[^\n]*\]$", re.MULTILINE)

# Keys of every table, so that added settings reach the checks behind decoding.
KEYS = [
    "start",
    "hop_limit",
    "max_in_flight",
    "ack_wait",
    "stream",
    "dead_letter",
    "when",
    "transform",
    "to",
    "stages",
    "retry",
    "batch_size",
    "circuit",
    "servers",
    "sync",
    "max_age",
    "duplicate_window",
    "replicas",
    "max_bytes",
    "state_bucket",
    "subject_prefix",
    "listen",
    "tls_cert",
]
PLAUSIBLE = [
    '"new"',
    '"all"',
    '"2025-06-01T00:00:00Z"',
    "2025-06-01T00:00:00Z",
    '"2025-06-01"',
    "3",
    '"orders.received"',
    '["orders.received"]',
    '["orders.big", "orders.received"]',
    '"busway.deadletter.big-orders"',
    '[{ wiretap = "orders.received" }]',
    '[{ enrich = { request = "orders.received" } }]',
    '[{ reply = "@" }]',
    '[{ switch = { cases = [{ when = "a", to = ["orders.received"] }] } }]',
    '{ max_attempts = 2, schedule = ["1s", "inf"] }',
    '["nats://127.0.0.1:4222"]',  # never bound: accepted configs are compiled, not run
    '"1s"',
    '"ORDERS"',
]

ASSIGNMENT = re.compile(rb"^(\s*[A-Za-z0-9_\-\"'.]+\s*=\s*)(.*)$", re.MULTILINE)


@st.composite
def hostile_value(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(st.sampled_from(HOSTILE_VALUES)).encode()
    builder = draw(st.sampled_from(sorted(BUILDERS)))
    size = draw(st.sampled_from([1, 10, 100, 1000, 5000, 10_000]))
    return BUILDERS[builder](size).encode()


@st.composite
def mutation(draw: st.DrawFn, text: bytes) -> bytes:
    kind = draw(
        st.sampled_from(
            ["insert", "delete", "replace", "value", "value", "value", "key", "line", "nest"]
        )
    )
    if kind in ("insert", "delete", "replace"):
        position = draw(st.integers(0, len(text)))
        chunk = draw(
            st.one_of(
                st.text(TOML_CHARACTERS, min_size=1, max_size=8).map(str.encode),
                st.binary(min_size=1, max_size=4),
            )
        )
        if kind == "insert":
            return text[:position] + chunk + text[position:]
        end = position + draw(st.integers(1, 16))
        return text[:position] + (chunk if kind == "replace" else b"") + text[end:]
    if kind == "key":  # a setting the example does not have, with a hostile or plausible value
        headers = [found.end() for found in HEADER.finditer(text)] or [0]
        position = draw(st.sampled_from(headers))
        key = draw(st.sampled_from(KEYS)).encode()
        value = draw(st.one_of(hostile_value(), st.sampled_from(PLAUSIBLE).map(str.encode)))
        return text[:position] + b"\n" + key + b" = " + value + text[position:]
    assignments = list(ASSIGNMENT.finditer(text))
    if kind == "line":
        lines = text.split(b"\n")
        index = draw(st.integers(0, len(lines) - 1))
        if draw(st.booleans()):
            del lines[index]
        else:
            lines.insert(draw(st.integers(0, len(lines))), lines[index])
        return b"\n".join(lines)
    if not assignments:
        return text
    found = draw(st.sampled_from(assignments))
    if kind == "value":
        value = draw(hostile_value())
    else:  # wrap the existing value in a deep array or table
        depth = draw(st.sampled_from([2, 50, 500, 3000]))
        value = b"[" * depth + found.group(2).split(b"#")[0].strip() + b"]" * depth
    return text[: found.start(2)] + value + text[found.end(2) :]


@st.composite
def mutated_example(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(EXAMPLES))
    text = path.read_bytes()
    for _ in range(draw(st.integers(1, 3))):
        text = draw(mutation(text))
    return path.name, text


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_in_process(path: Path) -> tuple[int, str, str]:
    """`busway check path` through the CLI's entry function: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", str(path)])
    return code, out.getvalue(), err.getvalue()


def assert_contract(code: int, stdout: str, stderr: str) -> None:
    assert "Traceback" not in stderr + stdout
    assert code in (0, 2), (code, stderr)
    if code == 2:
        assert stderr.endswith("\n") and stderr.count("\n") == 1, repr(stderr)
        assert stderr.startswith("busway: "), repr(stderr)
        assert "internal error" not in stderr, stderr


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: str(path.relative_to(REPO)))
def test_every_example_passes_check(example: Path) -> None:
    with environment(ENVIRONMENT):
        code, stdout, stderr = check_in_process(example)
    assert (code, stderr) == (0, ""), stderr
    assert "ok" in stdout


@settings(
    max_examples=int(os.environ.get("BUSWAY_FUZZ_EXAMPLES", "200")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated_example())
def test_check_never_crashes_on_a_mutated_example(
    tmp_path_factory: pytest.TempPathFactory, example: tuple[str, bytes]
) -> None:
    name, text = example
    directory = tmp_path_factory.mktemp("fuzz")
    path = directory / name
    path.write_bytes(text)
    with environment(ENVIRONMENT):
        code, stdout, stderr = check_in_process(path)
        assert_contract(code, stdout, stderr)
        if code != 0:
            return
        # Accepted: what `busway run` does before connecting must not fail either.
        registry = default_registry()
        config = load_config(
            path, source_types=registry.source_config, sink_types=registry.sink_config
        )
        try:
            Bus(config, registry=registry)
        except ConfigError as error:  # pragma: no cover - the failure this test looks for
            pytest.fail(f"check accepted a config that Bus refuses: {error}")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'[nats]\nname = "\xff\xfe"\n', "line 2"),
        (b'[nats]\nname = "${file:/dev/zero}"\n', ":2 at $.nats.name"),
        (b"[nats]\nname = " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested"),
        (b"shutdown_timeout = nan\n", ":1 at $.shutdown_timeout"),
    ],
    ids=["invalid-utf8", "dev-zero", "deep-array", "nan-duration"],
)
def test_check_in_a_subprocess_prints_one_line_and_exits_2(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "busway.toml"
    path.write_bytes(content)
    result = run_cli("check", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"busway: {path}"), result.stderr
    assert expected in result.stderr
