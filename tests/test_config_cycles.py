"""Route cycles in a config: refused when no message could leave them, counted when one may.

The checks run where `busway check` and `Bus` run them: when the plan is built.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from busway import ConfigError, default_registry
from busway._config.plan import Plan, build_plan
from tests.support import REPO, decode_test_config, run_cli

STREAMS = """
[[streams]]
name = "A"
subjects = ["a.>"]

[[streams]]
name = "B"
subjects = ["b.>"]
"""


def plan_of(routes: str, tmp_path: Path, *, extra: str = "") -> Plan:
    config = decode_test_config(STREAMS + extra + routes, tmp_path)
    return build_plan(config, default_registry())


def refusal(routes: str, tmp_path: Path, *, extra: str = "") -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        plan_of(routes, tmp_path, extra=extra)
    return caught.value


def route(name: str, source: str, to: str, more: str = "") -> str:
    return f'\n[[routes]]\nname = "{name}"\nfrom = "{source}"\nto = ["{to}"]\n{more}\n'


def test_two_routes_feeding_each_other_are_refused_with_both_named(tmp_path: Path) -> None:
    error = refusal(route("ping", "a.in", "b.in") + route("pong", "b.in", "a.in"), tmp_path)
    text = str(error)
    assert "route 'ping' → route 'pong' → route 'ping'" in text
    assert "route 'ping' publishes 'b.in', which route 'pong' reads (from 'b.in')" in text
    assert "route 'pong' publishes 'a.in', which route 'ping' reads (from 'a.in')" in text
    assert "forever" in text
    assert error.path == "$.routes[0].to[0]"


def test_a_cycle_through_wildcards_and_a_wiretap_is_found(tmp_path: Path) -> None:
    extra = '\n[[streams]]\nname = "C"\nsubjects = ["c.>"]\n'
    routes = route("one", "a.>", "b.x") + route(
        "two", "b.*", "c.out", 'stages = [{ wiretap = "a.copy" }]'
    )
    error = refusal(routes, tmp_path, extra=extra)
    assert "route 'one' → route 'two' → route 'one'" in str(error)
    assert "route 'two' publishes 'a.copy', which route 'one' reads (from 'a.>')" in str(error)


def test_a_cycle_with_a_condition_is_allowed_and_its_routes_count_hops(tmp_path: Path) -> None:
    routes = route("ping", "a.in", "b.in", 'when = "again"') + route("pong", "b.in", "a.in")
    plan = plan_of(routes, tmp_path)
    assert plan.cycles.counted == {"ping", "pong"}
    assert plan.hop_limit(plan.config.routes[0]) == 32
    assert len(plan.cycles.notes) == 1
    assert "route 'ping' → route 'pong' → route 'ping' can form a cycle" in plan.cycles.notes[0]


def test_routes_outside_any_cycle_do_not_count_hops(tmp_path: Path) -> None:
    plan = plan_of(route("ping", "a.in", "b.in") + route("pong", "b.in", "a.out"), tmp_path)
    assert plan.cycles.counted == frozenset()
    assert plan.hop_limit(plan.config.routes[0]) is None
    assert plan.cycles.notes == ()


def test_a_cycle_through_an_enrich_request_is_refused(tmp_path: Path) -> None:
    routes = route(
        "asker", "a.in", "a.out", 'stages = [{ enrich = { request = "b.lookup" } }]'
    ) + route("answerer", "b.lookup", "a.in", 'when = "x"')
    error = refusal(routes, tmp_path)
    assert "through an enrich request" in str(error)
    assert error.path == "$.routes[0].stages[0].enrich.request"


@pytest.mark.parametrize("kind", ["routes", "sinks"])
def test_a_component_reading_its_own_dead_letters_is_refused(kind: str, tmp_path: Path) -> None:
    component = (
        route("retrier", "busway.deadletter.>", "a.in")
        if kind == "routes"
        else '\n[[sinks]]\nname = "retrier"\ntype = "file"\nfrom = "busway.deadletter.>"\n'
        'path = "out.jsonl"\n'
    )
    error = refusal(component, tmp_path)
    assert "reads its own dead letters" in str(error)
    assert error.path == f"$.{kind}[0].dead_letter"


def test_re_feeding_dead_letters_is_a_cycle_cut_at_run_time(tmp_path: Path) -> None:
    routes = route("work", "a.in", "a.out") + route("refeed", "busway.deadletter.work", "a.in")
    plan = plan_of(routes, tmp_path)
    assert plan.cycles.counted == {"work", "refeed"}
    assert "dead-lettered after" in plan.cycles.notes[0]


def test_a_dead_letter_cycle_between_sinks_only_is_refused(tmp_path: Path) -> None:
    sinks = "".join(
        f'\n[[sinks]]\nname = "{name}"\ntype = "file"\nfrom = "busway.deadletter.{other}"\n'
        f'path = "{name}.jsonl"\n'
        for name, other in (("left", "right"), ("right", "left"))
    )
    error = refusal(sinks, tmp_path)
    assert "no route to count it" in str(error)


def test_a_route_with_a_reply_stage_counts_hops(tmp_path: Path) -> None:
    plan = plan_of(route("answer", "a.in", "a.out", 'stages = [{ reply = "@" }]'), tmp_path)
    assert plan.cycles.counted == {"answer"}


def test_the_examples_have_no_cycles() -> None:
    registry = default_registry()
    for name in ("busway.toml", "files/busway.toml"):
        config = decode_test_config((REPO / "deploy" / name).read_text(), REPO / "deploy")
        assert build_plan(config, registry).cycles.counted == frozenset()


def test_busway_check_refuses_a_static_cycle_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "busway.toml"
    path.write_text(STREAMS + route("ping", "a.in", "b.in") + route("pong", "b.in", "a.in"))
    result = run_cli("check", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    line = STREAMS.count("\n") + route("ping", "a.in", "b.in").count("\n") - 1
    assert result.stderr.startswith(f"busway: {path}:{line} at $.routes[0].to[0]: route 'ping'")


def test_busway_check_notes_a_conditional_cycle(tmp_path: Path) -> None:
    path = tmp_path / "busway.toml"
    path.write_text(
        STREAMS + route("ping", "a.in", "b.in", 'when = "again"') + route("pong", "b.in", "a.in")
    )
    result = run_cli("check", str(path))
    assert result.returncode == 0, result.stderr
    assert "note: route 'ping' → route 'pong' → route 'ping' can form a cycle" in result.stdout
