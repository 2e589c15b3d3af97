"""Dead-letter tooling against a real nats-server: list, show, replay and purge, library and CLI.

Each test gives its config its own `[dead_letter] stream` and prefix, so what it lists is only
what its own routes dead-lettered.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import nats
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from busway import Bus, ComponentStats
from busway._components import SourceContext
from busway._dlq.read import (
    DeadLetter,
    DeadLetterError,
    ReplayReport,
    _location,
    get_dead_letter,
    list_dead_letters,
)
from busway._dlq.replay import _delete_all, purge_dead_letters, replay_dead_letters
from busway._nats.jetstream import JetStreamPublisher, KeyValueState, state_bucket
from tests.configs import FREE, config_toml, io_streams
from tests.support import (
    NatsServer,
    decode_test_config,
    free_port,
    run_cli,
    stream_messages,
    wait_settled,
)

pytestmark = pytest.mark.anyio


def config_text(url: str | None, unique: str, *, nats_listen: str = FREE) -> str:
    """Three routes: `shape` fails on string names (expression), `parse` on bad JSON (decode),
    `raw` forwards `in.fixed` untouched: the place to replay fixed messages to.

    `url` None: an embedded server listening on `nats_listen` (which nothing starts here)."""
    return (
        config_toml(
            url,
            publish_timeout="2s" if url else None,
            nats_listen=nats_listen,
            streams=io_streams(unique),
            dead_letter=unique,
        )
        + f"""
[[routes]]
name = "shape{unique}"
from = "in{unique}.orders"
transform = "{{size: abs(name)}}"
to = ["out{unique}.shaped"]

[[routes]]
name = "parse{unique}"
from = "in{unique}.events"
when = "total > `1`"
to = ["out{unique}.events"]

[[routes]]
name = "raw{unique}"
from = "in{unique}.fixed"
to = ["out{unique}.fixed"]
"""
    )


ADA = b'{"name": "Ada"}'
BOB = b'{"name": "Bob", "id": 2}'
BAD_1 = b"{not json"
BAD_2 = b"<xml/>"


async def publish(nc: NatsClient, subject: str, bodies: list[bytes]) -> None:
    js = nc.jetstream()
    for body in bodies:
        await js.publish(subject, body, headers={"X-Trace": body.hex()[:8]})


async def settle_all(nc: NatsClient, unique: str) -> None:
    for route in ("shape", "parse", "raw"):
        await wait_settled(nc, f"IN_{unique}", f"busway-route-{route}{unique}")


async def dead_letter_four(nc: NatsClient, unique: str) -> None:
    """Two expression dead letters from `shape`, two decode ones from `parse`; one success."""
    await publish(nc, f"in{unique}.orders", [ADA, b'{"name": -3}', BOB])
    await publish(nc, f"in{unique}.events", [BAD_1, BAD_2])
    await settle_all(nc, unique)


def bodies(letters: list[DeadLetter]) -> list[bytes]:
    return [letter.body for letter in letters]


async def stored(nc: NatsClient, unique: str, subject: str) -> list[Msg]:
    return [m for m in await stream_messages(nc, f"OUT_{unique}") if m.subject == subject]


# ---------------------------------------------------------------------------------------------
# Library API


async def test_list_describes_each_dead_letter_and_filters_select_exactly(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server.url, unique), tmp_path)
    js = nc.jetstream()
    async with Bus(config):
        await dead_letter_four(nc, unique)

    everything = await list_dead_letters(js, config)
    assert sorted(bodies(everything)) == sorted([ADA, BOB, BAD_1, BAD_2])
    assert [letter.seq for letter in everything] == sorted(letter.seq for letter in everything)

    shape = await list_dead_letters(js, config, component=f"shape{unique}")
    assert bodies(shape) == [ADA, BOB]
    first = shape[0]
    assert first.stream == f"DL_{unique}"
    assert first.subject == f"dl{unique}.shape{unique}"
    assert (first.component, first.kind, first.reason) == (f"shape{unique}", "route", "expression")
    assert "abs" in first.error
    assert (first.original_subject, first.original_stream, first.original_seq) == (
        f"in{unique}.orders",
        f"IN_{unique}",
        1,
    )
    assert first.attempts == 1
    assert first.first_failed_at is not None
    assert first.first_failed_at == first.failed_at <= first.time
    assert first.replay_count == 0
    assert first.headers["X-Trace"] == ADA.hex()[:8]
    assert first.headers["Busway-Expression"] == "{size: abs(name)}"
    assert first.time.tzinfo is not None

    decode = await list_dead_letters(js, config, reason="decode")
    assert bodies(decode) == [BAD_1, BAD_2]
    assert {letter.component for letter in decode} == {f"parse{unique}"}
    assert bodies(await list_dead_letters(js, config, subject=f"in{unique}.events")) == [
        BAD_1,
        BAD_2,
    ]
    assert len(await list_dead_letters(js, config, subject=f"in{unique}.*")) == 4
    assert len(await list_dead_letters(js, config, subject=f"in{unique}.>")) == 4
    assert await list_dead_letters(js, config, subject="elsewhere.>") == []
    assert bodies(await list_dead_letters(js, config, error_contains="NOT VALID JSON")) == [
        BAD_1,
        BAD_2,
    ]
    assert await list_dead_letters(js, config, component=f"shape{unique}", reason="decode") == []

    # Time bounds are inclusive, on the time each dead letter was stored.
    ordered = everything
    since_second = await list_dead_letters(js, config, since=ordered[1].time)
    assert [d.seq for d in since_second] == [d.seq for d in ordered if d.time >= ordered[1].time]
    until_second = await list_dead_letters(js, config, until=ordered[1].time)
    assert [d.seq for d in until_second] == [d.seq for d in ordered if d.time <= ordered[1].time]
    future = datetime.now(UTC) + timedelta(hours=1)
    assert await list_dead_letters(js, config, since=future) == []
    assert len(await list_dead_letters(js, config, until=future)) == 4

    assert bodies(await list_dead_letters(js, config, limit=2)) == bodies(ordered[:2])
    picked = await list_dead_letters(js, config, sequences=[ordered[3].seq, ordered[0].seq, 999])
    assert [d.seq for d in picked] == [ordered[0].seq, ordered[3].seq]


async def test_invalid_filters_and_a_missing_stream_are_reported(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server.url, unique), tmp_path)
    js = nc.jetstream()
    with pytest.raises(DeadLetterError, match=f"stream 'DL_{unique}' does not exist"):
        await list_dead_letters(js, config)
    with pytest.raises(ValueError, match="not a route, sink or source name"):
        await list_dead_letters(js, config, component="a.b")
    with pytest.raises(ValueError, match="timezone-aware"):
        await list_dead_letters(js, config, since=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="dead-letter subject"):
        await replay_dead_letters(js, config, to_subject=f"dl{unique}.x")


async def test_get_dead_letter_by_sequence(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server.url, unique), tmp_path)
    js = nc.jetstream()
    async with Bus(config):
        await publish(nc, f"in{unique}.events", [BAD_1])
        await settle_all(nc, unique)
    [listed] = await list_dead_letters(js, config)

    shown = await get_dead_letter(js, config, listed.seq)
    assert shown == listed
    assert await get_dead_letter(js, config, listed.seq + 100) is None


async def test_replay_to_another_subject_is_routed_and_removes_only_the_replayed(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server.url, unique), tmp_path)
    js = nc.jetstream()
    async with Bus(config):
        await dead_letter_four(nc, unique)
        shape = await list_dead_letters(js, config, component=f"shape{unique}")

        report = await replay_dead_letters(
            js, config, component=f"shape{unique}", to_subject=f"in{unique}.fixed"
        )
        await settle_all(nc, unique)

    assert [o.seq for o in report.replayed] == [d.seq for d in shape]
    assert (report.failed, report.skipped, report.dry_run) == ([], [], False)
    assert {o.target for o in report.replayed} == {f"in{unique}.fixed"}
    assert all(o.stored_stream == f"IN_{unique}" for o in report.replayed)
    # The `raw` route received each replayed message once, body untouched.
    fixed = await stored(nc, unique, f"out{unique}.fixed")
    assert [m.data for m in fixed] == [ADA, BOB]
    for message, letter in zip(fixed, shape, strict=True):
        headers = dict(message.headers or {})
        assert headers.pop("Nats-Msg-Id").startswith(f"IN_{unique}:")  # the route's output id
        assert headers == {"X-Trace": letter.headers["X-Trace"], "Busway-Replay-Count": "1"}
    # Only the replayed dead letters are gone; the others and the successful output stay.
    remaining = await list_dead_letters(js, config)
    assert bodies(remaining) == [BAD_1, BAD_2]
    assert [orjson.loads(m.data) for m in await stored(nc, unique, f"out{unique}.shaped")] == [
        {"size": 3}
    ]


async def test_replay_to_the_original_subject_increments_the_replay_count(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server.url, unique), tmp_path)
    js = nc.jetstream()
    component = f"shape{unique}"
    async with Bus(config):
        await publish(nc, f"in{unique}.orders", [ADA])
        await settle_all(nc, unique)
        [original] = await list_dead_letters(js, config, component=component)

        planned = await replay_dead_letters(js, config, component=component, dry_run=True)
        assert planned.dry_run
        assert [(o.seq, o.target) for o in planned.replayed] == [
            (original.seq, f"in{unique}.orders")
        ]
        assert await list_dead_letters(js, config, component=component) == [original]

        first = await replay_dead_letters(js, config, component=component)
        await settle_all(nc, unique)
        [again] = await list_dead_letters(js, config, component=component)
        second = await replay_dead_letters(js, config, component=component)
        await settle_all(nc, unique)
        [third] = await list_dead_letters(js, config, component=component)

    # The route still fails on it, so each replay comes back as a new dead letter, counted.
    assert [o.seq for o in first.replayed] == [original.seq]
    assert [o.seq for o in second.replayed] == [again.seq]
    assert (again.replay_count, third.replay_count) == (1, 2)
    assert again.body == third.body == ADA
    assert (again.original_seq, third.original_seq) == (2, 3)
    inputs = [m for m in await stream_messages(nc, f"IN_{unique}") if m.subject.endswith("orders")]
    assert [(m.headers or {}).get("Nats-Msg-Id") for m in inputs[1:]] == [
        f"replay:DL_{unique}:{original.seq}:1",
        f"replay:DL_{unique}:{again.seq}:2",
    ]
    assert [m.data for m in inputs] == [ADA, ADA, ADA]


async def test_a_failed_replay_keeps_the_dead_letter(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server.url, unique), tmp_path)
    js = nc.jetstream()
    async with Bus(config):
        await publish(nc, f"in{unique}.events", [BAD_1])
        await settle_all(nc, unique)
    [letter] = await list_dead_letters(js, config)

    report = await replay_dead_letters(js, config, to_subject=f"nowhere{unique}.x")

    assert report.replayed == []
    assert [(o.seq, o.detail) for o in report.failed] == [
        (letter.seq, f"no stream captures subject 'nowhere{unique}.x' (or JetStream is down)")
    ]
    assert await list_dead_letters(js, config) == [letter]


async def test_a_sources_dead_letter_needs_a_target_to_replay(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server.url, unique), tmp_path)
    js = nc.jetstream()
    async with Bus(config):  # declares the dead-letter stream
        pass
    context = SourceContext(
        name=f"src{unique}",
        publisher=JetStreamPublisher(js, timeout=5),
        state=KeyValueState(await state_bucket(js, f"state_{unique}"), "src."),
        stats=ComponentStats(f"src{unique}", "source"),
        logger=logging.getLogger("test"),
        dead_letter_subject=f"dl{unique}.src{unique}",
    )
    await context.dead_letter(
        b"line 7", reason="parse", error="bad line", origin="orders.csv:7", message_id="m7"
    )
    [letter] = await list_dead_letters(js, config, component=f"src{unique}")
    assert (letter.kind, letter.origin, letter.original_subject) == (
        "source",
        "orders.csv:7",
        None,
    )

    skipped = await replay_dead_letters(js, config)
    assert [(o.seq, o.target) for o in skipped.skipped] == [(letter.seq, None)]
    assert "use --to" in skipped.skipped[0].detail
    replayed = await replay_dead_letters(js, config, to_subject=f"out{unique}.manual")

    assert [o.seq for o in replayed.replayed] == [letter.seq]
    [message] = await stored(nc, unique, f"out{unique}.manual")
    assert message.data == b"line 7"
    assert message.headers == {
        "Busway-Replay-Count": "1",
        "Nats-Msg-Id": f"replay:DL_{unique}:{letter.seq}:1",
    }
    assert await list_dead_letters(js, config) == []


async def test_purge_deletes_what_the_filters_select(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server.url, unique), tmp_path)
    js = nc.jetstream()
    async with Bus(config):
        await dead_letter_four(nc, unique)
    everything = await list_dead_letters(js, config)
    bob = next(d for d in everything if d.body == BOB)

    assert await purge_dead_letters(js, config, error_contains="valid JSON", dry_run=True) == 2
    assert len(await list_dead_letters(js, config)) == 4
    assert await purge_dead_letters(js, config, sequences=[bob.seq]) == 1
    assert bodies(await list_dead_letters(js, config)) == [d.body for d in everything if d != bob]
    # Only a component: its whole subject is purged at once.
    assert await purge_dead_letters(js, config, component=f"parse{unique}") == 2
    assert bodies(await list_dead_letters(js, config)) == [ADA]
    assert await purge_dead_letters(js, config, component=f"parse{unique}") == 0
    assert await purge_dead_letters(js, config) == 1
    assert await list_dead_letters(js, config) == []
    info = await js.stream_info(f"IN_{unique}")
    assert info.state.messages == 5  # the inputs themselves are untouched


# ---------------------------------------------------------------------------------------------
# The command line


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "busway.toml"
    path.write_text(text)
    return path


async def test_cli_list_show_replay_and_purge(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path, config_text(nats_server.url, unique))
    config = decode_test_config(path.read_text(), tmp_path)
    js = nc.jetstream()
    async with Bus(config):
        await dead_letter_four(nc, unique)
        listed = run_cli("dlq", "list", str(path), "--route", f"shape{unique}", "--since", "1h")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split()[:3] == ["SEQ", "STORED", "(UTC)"]
        assert [line.split()[3] for line in lines[1:-1]] == [f"shape{unique}"] * 2
        assert all("expression" in line for line in lines[1:-1])
        assert lines[-1] == "2 dead letter(s)"

        as_json = run_cli("dlq", "list", str(path), "--reason", "decode", "--json")
        assert as_json.returncode == 0, as_json.stderr
        documents = [json.loads(line) for line in as_json.stdout.splitlines()]
        assert [d["body"] for d in documents] == [BAD_1.decode(), BAD_2.decode()]
        assert {d["component"] for d in documents} == {f"parse{unique}"}

        shown = run_cli("dlq", "show", str(path), str(documents[0]["seq"]))
        assert shown.returncode == 0, shown.stderr
        assert "reason:        decode" in shown.stdout
        assert shown.stdout.rstrip().endswith(BAD_1.decode())
        missing = run_cli("dlq", "show", str(path), "9999")
        assert missing.returncode == 1
        assert f"no message with sequence 9999 in stream DL_{unique}" in missing.stderr

        replayed = run_cli(
            "dlq", "replay", str(path), "--component", f"shape{unique}", "--to", f"in{unique}.fixed"
        )
        assert replayed.returncode == 0, replayed.stderr
        assert replayed.stdout.splitlines()[-1] == "replayed 2, failed 0, skipped 0"
        await settle_all(nc, unique)
        assert [m.data for m in await stored(nc, unique, f"out{unique}.fixed")] == [ADA, BOB]

        failed = run_cli("dlq", "replay", str(path), "--to", f"nowhere{unique}.x", "--limit", "1")
        assert failed.returncode == 1
        assert "FAILED" in failed.stdout
        assert failed.stdout.splitlines()[-1] == "replayed 0, failed 1, skipped 0"

        refused = run_cli("dlq", "purge", str(path))
        assert refused.returncode == 2
        assert "needs a filter" in refused.stderr
        purged = run_cli("dlq", "purge", str(path), "--all", "--json")
        assert purged.returncode == 0, purged.stderr
        assert json.loads(purged.stdout) == {"purged": 2, "dry_run": False}
    assert await list_dead_letters(js, config) == []


def test_cli_exit_codes_for_bad_config_and_no_server(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    bad = write_config(tmp_path, "[nats]\nservers = 5\n")
    result = run_cli("dlq", "list", str(bad))
    assert result.returncode == 2
    assert "$.nats.servers" in result.stderr

    port = free_port()
    embedded = write_config(tmp_path, config_text(None, unique, nats_listen=f"127.0.0.1:{port}"))
    result = run_cli("dlq", "list", str(embedded))
    assert result.returncode == 1
    assert f"nothing listens on nats://127.0.0.1:{port}" in result.stderr
    assert "busway run" in result.stderr

    result = run_cli("dlq", "list", str(embedded), "--since", "yesterday")
    assert result.returncode == 2
    assert "expected a duration ago" in result.stderr


def test_a_component_with_its_own_dead_letter_subject_is_looked_up_there(
    tmp_path: Path, unique: str
) -> None:
    """A route with its own `dead_letter` subject is looked up there when named."""
    text = config_text(None, unique).replace(
        f'name = "parse{unique}"', f'name = "parse{unique}"\ndead_letter = "out{unique}.dead"'
    )
    config = decode_test_config(text, tmp_path)

    assert _location(config, f"parse{unique}") == (f"OUT_{unique}", f"out{unique}.dead")
    assert _location(config, f"shape{unique}") == (f"DL_{unique}", f"dl{unique}.shape{unique}")
    assert _location(config, None) == (f"DL_{unique}", f"dl{unique}.>")


async def test_a_replay_does_not_pick_up_the_dead_letters_it_causes(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """Replayed onto a route that still fails, each message comes back once, not in a loop.

    150 messages: more than one window of pipelined publishes and deletes.
    """
    config = decode_test_config(config_text(nats_server.url, unique), tmp_path)
    js = nc.jetstream()
    component = f"shape{unique}"
    names = [b'{"name": "n%d"}' % i for i in range(150)]
    async with Bus(config):
        await publish(nc, f"in{unique}.orders", names)
        await settle_all(nc, unique)
        before = await list_dead_letters(js, config, component=component)

        report = await replay_dead_letters(js, config, component=component)
        await settle_all(nc, unique)
        after = await list_dead_letters(js, config, component=component)

    assert [o.seq for o in report.replayed] == [d.seq for d in before]
    assert sorted(bodies(after)) == sorted(bodies(before)) == sorted(names)
    assert {d.replay_count for d in after} == {1}
    assert min(d.seq for d in after) > max(d.seq for d in before)
    assert await purge_dead_letters(js, config, reason="expression") == 150
    assert await list_dead_letters(js, config) == []


async def test_two_replays_at_once_replay_each_dead_letter_once_and_report_no_failure(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """Two operators (or a retried script) replaying the same dead letters side by side.

    Both read letters the other is about to delete: the copies share their deterministic id,
    so JetStream stores each once; the run whose copy was stored reports it replayed, the other
    skipped, and a delete that finds the letter gone (10057 "no message found") is no failure.
    The bus is stopped first, so the copies stay in the input stream to be counted.
    """
    config = decode_test_config(config_text(nats_server.url, unique), tmp_path)
    js = nc.jetstream()
    component = f"shape{unique}"
    names = [b'{"name": "n%d"}' % i for i in range(300)]
    async with Bus(config):
        await publish(nc, f"in{unique}.orders", names)
        await settle_all(nc, unique)
    letters = await list_dead_letters(js, config, component=component)
    assert len(letters) == len(names)

    async def replay(into: list[ReplayReport]) -> None:
        client = await nats.connect(nats_server.url)
        try:
            into.append(await replay_dead_letters(client.jetstream(), config, component=component))
        finally:
            await client.close()

    reports: list[ReplayReport] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(replay, reports)
        tg.start_soon(replay, reports)

    first, second = reports
    assert first.failed == second.failed == []
    replayed = [o.seq for o in first.replayed + second.replayed]
    assert sorted(replayed) == [d.seq for d in letters]  # each exactly once in total
    skipped = first.skipped + second.skipped
    assert {o.seq for o in skipped} <= set(replayed)
    assert all(o.detail.startswith("already replayed by another run") for o in skipped)
    copies = [
        (m.headers or {}).get("Nats-Msg-Id", "")
        for m in await stream_messages(nc, f"IN_{unique}")
        if (m.headers or {}).get("Busway-Replay-Count") == "1"
    ]
    assert sorted(copies) == sorted(f"replay:DL_{unique}:{d.seq}:1" for d in letters)
    assert await list_dead_letters(js, config) == []


async def test_a_replay_interrupted_before_its_delete_is_finished_without_a_second_copy(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server.url, unique), tmp_path)
    js = nc.jetstream()
    async with Bus(config):
        await publish(nc, f"in{unique}.events", [BAD_1])
        await settle_all(nc, unique)
    [letter] = await list_dead_letters(js, config)
    # What an earlier replay did before it was killed: the copy is stored, the letter not deleted.
    assert letter.original_subject is not None
    await js.publish(letter.original_subject, letter.body, headers=letter.replay_headers())

    report = await replay_dead_letters(js, config)

    assert (report.replayed, report.failed) == ([], [])
    [skipped] = report.skipped
    assert skipped.seq == letter.seq
    assert skipped.detail.startswith("already replayed by another run (stored as IN_")
    assert skipped.detail.endswith("): deduplicated, not stored again")
    copies = [m for m in await stream_messages(nc, f"IN_{unique}") if m.data == BAD_1]
    assert len(copies) == 2  # the original and one replayed copy
    assert await list_dead_letters(js, config) == []


async def test_deleting_a_dead_letter_someone_else_deleted_is_no_failure(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server.url, unique), tmp_path)
    js = nc.jetstream()
    async with Bus(config):
        await publish(nc, f"in{unique}.events", [BAD_1, BAD_2])
        await settle_all(nc, unique)
    gone, there = await list_dead_letters(js, config)
    await js.delete_msg(f"DL_{unique}", gone.seq)

    assert await _delete_all(js, [gone, there]) == [None, None]
    assert await list_dead_letters(js, config) == []


def test_a_replay_carries_no_failure_headers_and_starts_a_fresh_hop_count() -> None:
    letter = DeadLetter(
        stream="BUSWAY_DEADLETTER",
        seq=7,
        time=datetime.now(UTC),
        subject="busway.deadletter.loop",
        component="loop",
        kind="route",
        reason="hop_limit",
        error="32 hops",
        original_subject="orders.in",
        original_stream="ORDERS",
        original_seq=3,
        headers={
            "Busway-Hops": "32",
            "Busway-Error-Reason": "hop_limit",
            "Busway-Original-Stream": "ORDERS",
            "X-Tenant": "acme",
        },
    )
    headers = letter.replay_headers()
    assert "Busway-Hops" not in headers
    assert "Busway-Error-Reason" not in headers
    assert headers["X-Tenant"] == "acme"
    assert headers["Busway-Replay-Origin"] == "ORDERS:3"
    assert headers["Busway-Replay-For"] == "route:loop"
