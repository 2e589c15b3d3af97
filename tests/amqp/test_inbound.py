"""How the amqp source names and checks a delivery (pure functions: no broker needed)."""

from __future__ import annotations

from datetime import UTC, datetime

from busway.adapters.amqp._inbound import Delivered, headers_of, malformed_reason, message_id


def _delivered(**changes: object) -> Delivered:
    fields: dict[str, object] = {"body": b'{"a": 1}', "exchange": "x", "routing_key": "r.k"}
    fields.update(changes)
    return Delivered(**fields)  # type: ignore[arg-type]


def test_the_message_id_property_names_the_message() -> None:
    assert message_id("src", _delivered(message_id="order-17")) == "src:order-17"


def test_without_message_id_a_redelivery_gets_the_same_content_hash() -> None:
    first = message_id("src", _delivered(timestamp=datetime(2025, 1, 1, tzinfo=UTC)))
    again = message_id(
        "src", _delivered(timestamp=datetime(2025, 1, 1, tzinfo=UTC), redelivered=True)
    )
    assert first == again
    assert first.startswith("src:sha256:")


def test_without_message_id_other_bodies_keys_or_headers_get_other_ids() -> None:
    base = message_id("src", _delivered())
    assert message_id("src", _delivered(body=b'{"a": 2}')) != base
    assert message_id("src", _delivered(routing_key="other")) != base
    assert message_id("src", _delivered(headers={"h": 1})) != base


def test_a_message_id_with_control_characters_or_spaces_is_hashed() -> None:
    found = message_id("src", _delivered(message_id="a b\r\nNats-Msg-Id: x"))
    assert found.startswith("src:sha256:")


def test_json_sources_refuse_other_content_types_encodings_and_bodies() -> None:
    def reason(**changes: object) -> str | None:
        return malformed_reason(_delivered(**changes), json=True, require_id=False)

    assert reason() is None
    assert reason(content_type="application/json; charset=utf-8") is None
    assert reason(content_type="application/cloudevents+json") is None
    assert "content type 'text/xml'" in (reason(content_type="text/xml") or "")
    assert "content encoding 'gzip'" in (reason(content_encoding="gzip") or "")
    assert "body is not JSON" in (reason(body=b"\x1f\x8b not json") or "")


def test_bytes_sources_take_any_body_unless_an_id_is_required() -> None:
    odd = _delivered(body=b"\x00\xff", content_type="image/png")
    assert malformed_reason(odd, json=False, require_id=False) is None
    assert "no message_id" in (malformed_reason(odd, json=False, require_id=True) or "")


def test_headers_carry_amqp_properties_and_never_a_forged_nats_or_busway_header() -> None:
    delivered = _delivered(
        message_id="m1",
        content_type="application/json",
        correlation_id="c-9",
        headers={
            "X-Tenant": "acme",
            "Retries": 3,
            "Nats-Msg-Id": "forged",
            "busway-component": "forged",
            "Bad Name": "x",
            "Split": "a\r\nInjected: 1",
            "Nested": {"a": 1},
        },
    )
    headers = headers_of(delivered, "src:m1")
    assert headers == {
        "Nats-Msg-Id": "src:m1",
        "X-Tenant": "acme",
        "Retries": "3",
        "Amqp-Exchange": "x",
        "Amqp-Routing-Key": "r.k",
        "Amqp-Message-Id": "m1",
        "Content-Type": "application/json",
        "Amqp-Correlation-Id": "c-9",
    }
