"""Route stages without a broker: what each stage does to a message, and its errors."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import anyio
import msgspec
import orjson
import pytest

from busway.routers.context import MessageContext
from busway.routers.durations import decode_hook
from busway.routers.pipeline import OUT, REPLY, TAP, Output
from busway.routers.route import Route, RouteCompileError, RoutingError, compile_route
from busway.routers.stage_compiler import python_timeout
from busway.routers.stages import StageConfig
from busway.routers.throttle import TokenBuckets
from busway.routers.user_code import ThreadedCall
from tests.support import eventually

CONTEXT = MessageContext(
    subject="orders.in",
    headers={"Busway-Reply-To": "_INBOX.abc.1", "X-Tier": "gold"},
    stream="ORDERS",
    sequence=42,
    attempt=1,
)


class Models(msgspec.Struct):
    """A msgspec type for the `validate` stage, loaded by import path."""

    id: int
    qty: int


def route(*stages: dict[str, Any], to: tuple[str, ...] = ("out",), **kwargs: Any) -> Route:
    return compile_route(
        name="r",
        to=to,
        stages=[msgspec.convert(stage, StageConfig, dec_hook=decode_hook) for stage in stages],
        **kwargs,
    )


def bodies(outputs: list[Output]) -> list[tuple[str, Any]]:
    return [(output.subject, orjson.loads(output.body)) for output in outputs]


def test_a_stage_has_exactly_one_kind() -> None:
    with pytest.raises(msgspec.ValidationError, match="exactly one kind"):
        msgspec.convert({"filter": "a", "transform": "b"}, StageConfig)
    with pytest.raises(msgspec.ValidationError, match="found none"):
        msgspec.convert({}, StageConfig)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"filtre": "a"}, StageConfig)


def test_filter_then_transform() -> None:
    r = route({"filter": "total > `10`"}, {"transform": "{id: id}"})
    assert bodies(r.process(b'{"id": 1, "total": 11}')) == [("out", {"id": 1})]
    assert r.process(b'{"id": 2, "total": 3}') == []


def test_switch_first_match_wins_and_default_catches_the_rest() -> None:
    r = route(
        {
            "switch": {
                "cases": [
                    {"when": "country == 'NL'", "to": ["eu.nl"]},
                    {"when": "total > `100`", "to": ["big"]},
                ],
                "default": ["other"],
            }
        },
        to=(),
    )
    assert [o.subject for o in r.process(b'{"country": "NL", "total": 500}')] == ["eu.nl"]
    assert [o.subject for o in r.process(b'{"country": "US", "total": 500}')] == ["big"]
    assert [o.subject for o in r.process(b'{"country": "US", "total": 5}')] == ["other"]


def test_switch_all_is_a_recipient_list_and_no_match_without_default_filters() -> None:
    r = route(
        {
            "switch": {
                "all": True,
                "cases": [
                    {"when": "country == 'NL'", "to": ["eu.nl", "audit"]},
                    {"when": "total > `100`", "to": ["big", "audit"]},
                ],
            }
        },
        to=(),
    )
    outputs = r.process(b'{"country": "NL", "total": 500}')
    assert [o.subject for o in outputs] == ["eu.nl", "audit", "big"]
    assert r.process(b'{"country": "US", "total": 5}') == []


def test_set_remove_rename() -> None:
    r = route(
        {"set": {"meta.source": "'web'", "total": "sum(lines[].price)", "a": "b", "b": "a"}},
        {"remove": ["lines", "missing.path"]},
        {"rename": {"customer_id": "customer.id", "absent": "never"}},
    )
    [(_, body)] = bodies(
        r.process(b'{"a": 1, "b": 2, "customer_id": 7, "lines": [{"price": 2}, {"price": 3}]}')
    )
    assert body == {"a": 2, "b": 1, "total": 5, "meta": {"source": "web"}, "customer": {"id": 7}}


def test_set_through_a_non_object_is_a_routing_error() -> None:
    r = route({"set": {"a.b": "`1`"}})
    with pytest.raises(RoutingError, match="'a' holds a int") as caught:
        r.process(b'{"a": 5}')
    assert caught.value.stage == "stages[0].set"
    assert not caught.value.transient


def test_bad_path_is_a_compile_error_naming_the_field() -> None:
    with pytest.raises(RouteCompileError) as caught:
        route({"remove": ["ok", "bad..path"]})
    assert caught.value.field == "stages[0].remove[1]"


def test_split_makes_one_message_per_element_with_correlation_headers() -> None:
    r = route({"split": "lines"}, {"transform": "sku"})
    outputs = r.process(b'{"lines": [{"sku": "a"}, {"sku": "b"}, {"sku": "c"}]}', CONTEXT)
    assert bodies(outputs) == [("out", "a"), ("out", "b"), ("out", "c")]
    assert [o.headers for o in outputs] == [
        {
            "Busway-Correlation-Id": "ORDERS:42",
            "Busway-Split-Index": str(i),
            "Busway-Split-Count": "3",
        }
        for i in range(3)
    ]
    assert r.process(b'{"lines": []}', CONTEXT) == []
    with pytest.raises(RoutingError, match="not an array"):
        r.process(b'{"lines": 5}', CONTEXT)


def test_split_with_a_correlation_expression() -> None:
    r = route({"split": {"on": "lines", "correlation_id": "order"}})
    outputs = r.process(b'{"order": "o-9", "lines": [1, 2]}', CONTEXT)
    assert {o.headers["Busway-Correlation-Id"] for o in outputs if o.headers} == {"o-9"}


def test_set_headers_from_expressions() -> None:
    r = route({"set_headers": {"X-Customer": "customer.id", "X-Tags": "tags", "X-None": "nope"}})
    [output] = r.process(b'{"customer": {"id": "c1"}, "tags": ["a", 1]}')
    assert output.headers == {"X-Customer": "c1", "X-Tags": '["a",1]'}


def test_wiretap_copies_without_changing_the_flow() -> None:
    r = route({"wiretap": "audit.orders"}, {"transform": "{id: id}"})
    outputs = r.process(b'{"id": 1, "secret": "x"}')
    assert [(o.kind, o.subject) for o in outputs] == [(OUT, "out"), (TAP, "audit.orders")]
    assert orjson.loads(outputs[1].body) == {"id": 1, "secret": "x"}


def test_reply_answers_the_requesters_inbox() -> None:
    r = route({"transform": "{ok: `true`, id: id}"}, {"reply": "@"}, to=())
    [output] = r.process(b'{"id": 3}', CONTEXT)
    assert output == Output(REPLY, "_INBOX.abc.1", b'{"ok":true,"id":3}', None)
    no_inbox = MessageContext("orders.in", None, "ORDERS", 1, 1)
    assert r.process(b'{"id": 3}', no_inbox) == []


def test_validate_against_a_json_schema(tmp_path: Path) -> None:
    schema = tmp_path / "order.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "required": ["id", "lines"],
                "properties": {
                    "id": {"type": "integer"},
                    "lines": {"type": "array", "items": {"properties": {"qty": {"minimum": 1}}}},
                },
            }
        )
    )
    r = route({"validate": {"schema": "order.json"}}, resolve_path=lambda p: tmp_path / p)
    assert len(r.process(b'{"id": 1, "lines": [{"qty": 2}]}')) == 1
    with pytest.raises(RoutingError) as caught:
        r.process(b'{"id": 1, "lines": [{"qty": 2}, {"qty": 0}]}')
    assert caught.value.kind == "validation"
    assert caught.value.headers == {"Busway-Validation-Path": "$.lines[1].qty"}
    assert "0 is less than the minimum of 1" in str(caught.value)


def test_a_broken_schema_is_a_compile_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"type": 12}')
    with pytest.raises(RouteCompileError, match="not a valid JSON Schema") as caught:
        route({"validate": {"schema": "bad.json"}}, resolve_path=lambda p: tmp_path / p)
    assert caught.value.field == "stages[0].validate"
    with pytest.raises(RouteCompileError, match="cannot read schema"):
        route({"validate": {"schema": "absent.json"}}, resolve_path=lambda p: tmp_path / p)


def test_validate_against_a_msgspec_type() -> None:
    r = route({"validate": {"type": "tests.routers.test_stages:Models"}})
    assert len(r.process(b'{"id": 1, "qty": 2}')) == 1
    with pytest.raises(RoutingError) as caught:
        r.process(b'{"id": 1, "qty": "two"}')
    assert caught.value.headers == {"Busway-Validation-Path": "$.qty"}
    with pytest.raises(RouteCompileError, match="has no 'Nope'"):
        route({"validate": {"type": "tests.routers.test_stages:Nope"}})


def double(body: dict[str, Any]) -> dict[str, Any] | None:
    if body.get("drop"):
        return None
    if body.get("boom"):
        raise KeyError("boom")
    return {**body, "n": body["n"] * 2}


def tier(body: dict[str, Any], context: MessageContext | None) -> dict[str, Any]:
    assert context is not None
    return {**body, "tier": (context.headers or {}).get("X-Tier")}


def reject_all(body: Any) -> Any:
    from busway.routers.pipeline import Reject

    raise Reject("not for us")


@pytest.mark.anyio
async def test_python_stage_sync_with_and_without_context() -> None:
    r = route(
        {"python": "tests.routers.test_stages:double"},
        {"python": "tests.routers.test_stages:tier"},
    )
    assert r.needs_context
    assert r.is_async  # a blocking function runs in a worker thread: the route waits for it
    services = FakeServices()
    outputs = await r.process_async(b'{"n": 2}', CONTEXT, services)
    assert bodies(outputs) == [("out", {"n": 4, "tier": "gold"})]
    assert await r.process_async(b'{"n": 2, "drop": true}', CONTEXT, services) == []


@pytest.mark.anyio
async def test_python_errors_name_the_function_transient_unless_rejected() -> None:
    r = route({"python": "tests.routers.test_stages:double"})
    with pytest.raises(
        RoutingError, match=r"tests\.routers\.test_stages:double raised KeyError"
    ) as e:
        await r.process_async(b'{"n": 1, "boom": true}', None, FakeServices())
    assert e.value.transient
    r = route({"python": "tests.routers.test_stages:reject_all"})
    with pytest.raises(RoutingError, match="rejected the message: not for us") as e:
        await r.process_async(b"{}", None, FakeServices())
    assert not e.value.transient
    with pytest.raises(RouteCompileError, match="cannot import module 'no_such_module'"):
        route({"python": "no_such_module:f"})
    with pytest.raises(RouteCompileError, match="expected 'module:name'"):
        route({"python": "just_a_name"})
    with pytest.raises(msgspec.ValidationError, match="positive duration"):
        msgspec.convert(
            {"python": {"function": "m:f", "timeout": 0}}, StageConfig, dec_hook=decode_hook
        )


_gate = threading.Event()
"""Released by the tests once they no longer need `blocks` to hang (never by a sleep)."""
_calls: list[int] = []


def blocks(body: dict[str, Any]) -> dict[str, Any]:
    """A blocking stage that hangs until `_gate` is set (as a stuck driver call would)."""
    _calls.append(body["n"])
    _gate.wait(60)
    return body


async def hangs(body: dict[str, Any]) -> dict[str, Any]:
    """An async stage that never returns by itself."""
    await anyio.sleep_forever()
    return body


@pytest.mark.anyio
async def test_a_hung_async_stage_times_out_as_a_transient_error() -> None:
    r = route({"python": {"function": "tests.routers.test_stages:hangs", "timeout": "50ms"}})
    with pytest.raises(RoutingError, match=r"hangs did not return within 0\.05s") as caught:
        await r.process_async(b"{}", None, FakeServices())
    assert caught.value.kind == "timeout" and caught.value.transient


@pytest.mark.anyio
async def test_a_blocking_stage_runs_off_the_loop_and_keeps_its_thread_when_it_overruns() -> None:
    _gate.clear()
    _calls.clear()
    r = route(
        {
            "python": {
                "function": "tests.routers.test_stages:blocks",
                "timeout": "50ms",
                "threads": 1,
            }
        }
    )
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        with pytest.raises(RoutingError, match="did not return within") as caught:
            await r.process_async(b'{"n": 1}', None, FakeServices())
        assert caught.value.kind == "timeout" and caught.value.transient
        assert ticks > 0  # the loop ran while the function blocked its thread
        # Its one thread is still taken: a second call waits instead of starting another.
        second: list[Any] = []
        done = anyio.Event()

        async def call_again() -> None:
            second.extend(await r.process_async(b'{"n": 2}', None, FakeServices()))
            done.set()

        tg.start_soon(call_again)
        await anyio.wait_all_tasks_blocked()
        assert _calls == [1]
        _gate.set()  # the stuck call returns, gives its thread back, and the second one runs
        with anyio.fail_after(30):
            await done.wait()
        tg.cancel_scope.cancel()
    assert _calls == [1, 2]
    assert bodies(second) == [("out", {"n": 2})]


@pytest.mark.anyio
async def test_threaded_calls_count_the_stuck_ones_until_they_return() -> None:
    release = threading.Event()
    call = ThreadedCall(lambda: release.wait(60), timeout=0.05, threads=2)
    for _ in range(2):
        with pytest.raises(TimeoutError):
            await call()
    assert call.stuck == 2
    release.set()

    async def none_stuck() -> bool:  # each returning thread frees its place via the loop
        return call.stuck == 0

    await eventually(none_stuck)
    assert await call() is True


def test_the_python_timeout_defaults_to_a_third_of_ack_wait_at_most_10s() -> None:
    assert python_timeout(None) == 10.0
    assert python_timeout(6.0) == 2.0
    assert python_timeout(300.0) == 10.0


def test_expression_errors_name_stage_and_source() -> None:
    r = route({"filter": "abs(name) > `1`"})
    with pytest.raises(RoutingError) as caught:
        r.process(b'{"name": "x"}')
    assert caught.value.kind == "expression"
    assert caught.value.dead_letter_headers() == {
        "Busway-Expression": "abs(name) > `1`",
        "Busway-Stage": "stages[0].filter",
    }
    with pytest.raises(RouteCompileError) as compile_error:
        route({"switch": {"cases": [{"when": "a ==", "to": ["x"]}]}}, to=())
    assert compile_error.value.field == "stages[0].switch.cases[0].when"


def test_not_json_is_a_decode_error() -> None:
    with pytest.raises(RoutingError) as caught:
        route({"filter": "a"}).process(b"not json")
    assert caught.value.kind == "decode"


class FakeServices:
    """RouteServices in memory: a canned answer per subject, a dict of seen dedupe keys."""

    def __init__(self, answers: dict[str, bytes] | None = None) -> None:
        self.answers = answers or {}
        self.requests: list[tuple[str, bytes]] = []
        self.seen: dict[tuple[str, str], str] = {}

    async def request(
        self, subject: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> bytes:
        self.requests.append((subject, body))
        if subject not in self.answers:
            raise TimeoutError
        return self.answers[subject]

    async def claim(self, scope: str, key: str, owner: str, window: float) -> bool:
        return self.seen.setdefault((scope, key), owner) == owner


@pytest.mark.anyio
async def test_enrich_merges_the_answer() -> None:
    services = FakeServices({"customers.lookup": b'{"name": "Ada", "tier": "gold"}'})
    r = route({"enrich": {"request": "customers.lookup", "body": "{id: customer}", "into": "c"}})
    assert r.is_async
    outputs = await r.process_async(b'{"customer": 7}', CONTEXT, services)
    assert bodies(outputs) == [("out", {"customer": 7, "c": {"name": "Ada", "tier": "gold"}})]
    assert services.requests == [("customers.lookup", b'{"id":7}')]
    merged = route({"enrich": {"request": "customers.lookup"}})
    outputs = await merged.process_async(b'{"customer": 7}', CONTEXT, services)
    assert bodies(outputs) == [("out", {"customer": 7, "name": "Ada", "tier": "gold"})]


@pytest.mark.anyio
async def test_enrich_timeout_is_transient() -> None:
    r = route({"enrich": {"request": "nobody.home", "timeout": "10ms"}})
    with pytest.raises(RoutingError, match=r"no answer from 'nobody\.home'") as caught:
        await r.process_async(b"{}", CONTEXT, FakeServices())
    assert caught.value.transient


@pytest.mark.anyio
async def test_dedupe_drops_repeats_but_not_redeliveries_of_the_same_input() -> None:
    services = FakeServices()
    r = route({"dedupe": {"key": "order_id"}})
    assert len(await r.process_async(b'{"order_id": 1}', CONTEXT, services)) == 1
    # The same input again (a redelivery: same stream sequence) must be published again.
    assert len(await r.process_async(b'{"order_id": 1}', CONTEXT, services)) == 1
    other = MessageContext("orders.in", None, "ORDERS", 43, 1)
    assert await r.process_async(b'{"order_id": 1}', other, services) == []
    assert len(await r.process_async(b'{"order_id": 2}', other, services)) == 1
    with pytest.raises(RoutingError, match="is null"):
        await r.process_async(b"{}", other, services)


def test_token_buckets_queue_excess_fairly() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2, per=1.0, clock=lambda: now[0])
    assert [buckets.delay("a") for _ in range(4)] == [0.0, 0.0, 0.5, 1.0]
    assert buckets.delay("b") == 0.0  # keys are independent
    now[0] = 10.0
    assert buckets.delay("a") == 0.0  # refilled, capped at the burst


def test_aggregate_group_completion_and_body() -> None:
    r = route(
        {"aggregate": {"by": "order", "count": 3, "into": "{order: key, skus: messages[].sku}"}},
        {"set": {"complete": "`true`"}},
    )
    aggregation = r.aggregation
    assert aggregation is not None
    group = aggregation.group("o1", [{"sku": "a"}, {"sku": "b"}])
    assert not aggregation.is_complete(group)
    group = aggregation.group("o1", [{"sku": "a"}, {"sku": "b"}, {"sku": "c"}])
    assert aggregation.is_complete(group)
    assert aggregation.body(group) == {"order": "o1", "skus": ["a", "b", "c"]}
    by_predicate = route({"aggregate": {"by": "order", "complete_when": "messages[?last]"}})
    assert by_predicate.aggregation is not None
    assert by_predicate.aggregation.is_complete(
        by_predicate.aggregation.group("o", [{"last": False}, {"last": True}])
    )


def test_aggregate_needs_a_completion_rule() -> None:
    with pytest.raises(msgspec.ValidationError, match="needs `count`, `timeout` or"):
        msgspec.convert({"aggregate": {"by": "a"}}, StageConfig)
