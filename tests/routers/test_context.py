"""Message-context functions in route expressions: subject(), header(), meta(), now(), uuid()."""

from __future__ import annotations

import orjson
import pytest

from busway.routers.context import MessageContext
from busway.routers.route import RouteCompileError, RoutingError, compile_route

CONTEXT = MessageContext(
    subject="orders.eu", headers={"X-Tier": "gold"}, stream="ORDERS", sequence=7, attempt=2
)


def test_header_and_subject_drive_the_predicate_and_the_mapping() -> None:
    route = compile_route(
        name="r",
        to=["out"],
        when="header('X-Tier') == 'gold'",
        transform="{id: id, from: subject(), seq: meta('seq'), stream: meta('stream'), "
        "again: meta('redelivered')}",
    )
    assert route.needs_context
    [output] = route.process(b'{"id": 1}', CONTEXT)
    assert orjson.loads(output.body) == {
        "id": 1,
        "from": "orders.eu",
        "seq": 7,
        "stream": "ORDERS",
        "again": True,
    }
    plain = MessageContext(subject="o", headers=None, stream="S", sequence=1, attempt=1)
    assert route.process(b'{"id": 1}', plain) == []


def test_routes_without_context_functions_need_no_context() -> None:
    assert not compile_route(name="r", to=["o"], when="total > `1`").needs_context
    assert not compile_route(name="r", to=["o"], transform="{t: now(), u: uuid()}").needs_context


def test_now_and_uuid_produce_fresh_values() -> None:
    route = compile_route(name="r", to=["o"], transform="{t: now(), u: uuid()}")
    first = orjson.loads(route.process(b"{}")[0].body)
    second = orjson.loads(route.process(b"{}")[0].body)
    assert first["t"].endswith("+00:00")
    assert len(first["u"]) == 36
    assert first["u"] != second["u"]


def test_wrong_arity_is_a_compile_error() -> None:
    with pytest.raises(RouteCompileError, match="when"):
        compile_route(name="r", to=["o"], when="header()")


def test_bad_meta_key_is_a_routing_error_naming_the_expression() -> None:
    route = compile_route(name="r", to=["o"], when="meta('nope') == `1`")
    with pytest.raises(RoutingError, match="meta\\(\\) takes") as caught:
        route.process(b"{}", CONTEXT)
    assert caught.value.expression == "meta('nope') == `1`"
