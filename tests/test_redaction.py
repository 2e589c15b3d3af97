"""Data-loss prevention: the detectors, the `redact` stage, and `[redaction]` on what busway shows.

A card number in a failing message must not leave in clear through any window busway opens on
it: its log line (caplog sees records as every handler does), the dead letter's reason, the
component's last error in `/status`, `busway dlq show` and `dlq list`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import msgspec
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from busway import Bus, ConfigError
from busway._config.model import RedactionConfig
from busway._observe.redact import redact, redaction
from busway.routers import Reject
from busway.routers.dlp import Dlp, iban_valid, is_card_number, luhn_valid
from busway.routers.stages import DlpRules
from tests.support import NatsServer, decode_test_config, run_cli, stream_messages, wait_settled

CARD = "4111 1111 1111 1111"  # a Visa test number: issuer prefix, length and Luhn all fit
CARD_DIGITS = CARD.replace(" ", "")
MASKED_CARD = "**** **** **** 1111"
IBAN = "NL91ABNA0417164300"  # the standard example IBAN (checksum valid)


def rules(**fields: Any) -> DlpRules:
    return msgspec.convert(fields, DlpRules)


# -- the detectors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"card {CARD} exp 2027", f"card {MASKED_CARD} exp 2027"),
        ("card 4111-1111-1111-1111", "card ****-****-****-1111"),
        ("amex 378282246310005.", "amex ***********0005."),
        ("mc 5555555555554444,", "mc ************4444,"),
        ("luhn fails 4111111111111112", "luhn fails 4111111111111112"),
        ("unknown issuer 9111111111111111", "unknown issuer 9111111111111111"),
        ("ns timestamp 1764569658123456789", "ns timestamp 1764569658123456789"),
        ("at 2026-12-01 06:14:18, seq 123456789012", "at 2026-12-01 06:14:18, seq 123456789012"),
        (f"{CARD} 2027 then more", f"{MASKED_CARD} 2027 then more"),
    ],
)
def test_card_numbers_are_masked_only_when_issuer_length_and_luhn_fit(
    text: str, shown: str
) -> None:
    assert Dlp(rules(builtins=["card"], fields=[])).mask_text(text) == shown


def test_luhn_card_and_iban_checks() -> None:
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")
    assert is_card_number(CARD_DIGITS) and not is_card_number("4111111111111")  # Luhn fails
    assert iban_valid(IBAN) and not iban_valid("NL91ABNA0417164301")
    assert iban_valid("GB82WEST12345698765432") and not iban_valid("GB82WEST1234569876543")


def test_iban_email_and_your_own_patterns_are_masked() -> None:
    dlp = Dlp(
        rules(
            builtins=["iban", "email"],
            patterns=[{"name": "ssn", "regex": r"\b\d{3}-\d{2}-\d{4}\b", "mask": "***-**-****"}],
            fields=[],
        )
    )
    text = f"pay {IBAN} or NL91 ABNA 0417 1643 00, mail ada@example.com, ssn 078-05-1120"
    assert dlp.mask_text(text) == (
        "pay NL************4300 or NL** **** **** **43 00, mail ***@example.com, ssn ***-**-****"
    )
    assert dlp.mask_text("NL91ABNA0417164301 is not an IBAN") == "NL91ABNA0417164301 is not an IBAN"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            '{"user": "ada", "Password": "p\\"w", "n": 1}',
            '{"user": "ada", "Password": "[redacted]", "n": 1}',
        ),
        ('{"token": 12345}', '{"token": "[redacted]"}'),
        ('{"body": "{\\"api_key\\": \\"k-1\\"}"}', '{"body": "{\\"api_key\\": \\"[redacted]\\"}"}'),
        ("{'secret': 'x y'}", "{'secret': '[redacted]'}"),
        ("GET /hook?token=abc&page=2", "GET /hook?token=[redacted]&page=2"),
        ('{"tokens_used": 3}', '{"tokens_used": 3}'),
    ],
)
def test_secret_fields_are_masked_in_json_nested_json_reprs_and_query_strings(
    text: str, shown: str
) -> None:
    assert Dlp(rules(builtins=[])).mask_text(text) == shown


def test_documents_are_masked_at_every_depth_including_cards_written_as_numbers() -> None:
    dlp = Dlp(rules(builtins=["card", "email"]))
    document = {
        "card": int(CARD_DIGITS),
        "lines": [{"note": f"paid with {CARD}", "qty": 2}, {"Authorization": "Bearer x"}],
        "contact": "ada@example.com",
        "id": 12,
    }
    assert dlp.mask_document(document) == {
        "card": "************1111",
        "lines": [{"note": f"paid with {MASKED_CARD}", "qty": 2}, {"Authorization": "[redacted]"}],
        "contact": "***@example.com",
        "id": 12,
    }


def test_log_records_are_masked_before_any_handler_sees_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("busway.test.redaction")
    with caplog.at_level(logging.INFO, logger="busway.test.redaction"):
        with redaction(rules()):
            logger.info("failed on %s: %s", {"password": "hunter2"}, f"card {CARD}")
            assert redact(f"card {CARD}") == f"card {MASKED_CARD}"
        logger.info("after: %s", CARD)  # rules are no longer active once the block ends
    assert [record.getMessage() for record in caplog.records] == [
        f"failed on {{'password': '[redacted]'}}: card {MASKED_CARD}",
        f"after: {CARD}",
    ]


def test_redaction_is_on_by_default_and_can_be_turned_off() -> None:
    with redaction(RedactionConfig()):
        assert redact(f"card {CARD}") == f"card {MASKED_CARD}"
    with redaction(RedactionConfig(enabled=False)):
        assert redact(f"card {CARD}") == f"card {CARD}"


# -- through a real nats-server --------------------------------------------------------------


def config_text(server: NatsServer, unique: str, routes: str) -> str:
    return f"""
[nats]
servers = ["{server.url}"]
publish_timeout = "2s"

[dead_letter]
stream = "DL_{unique}"
subject_prefix = "dl{unique}"

[redaction]
builtins = ["card", "email"]

[[streams]]
name = "IN_{unique}"
subjects = ["in{unique}.>"]

[[streams]]
name = "OUT_{unique}"
subjects = ["out{unique}.>"]

{routes}
"""


async def dead_letters(nc: NatsClient, unique: str) -> list[Msg]:
    return await stream_messages(nc, f"DL_{unique}")


@pytest.mark.anyio
async def test_redact_stage_masks_a_card_number_or_dead_letters_the_message(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    routes = f"""
[[routes]]
name = "mask{unique}"
from = "in{unique}.payments"
to = ["out{unique}.masked"]
stages = [{{ redact = {{ builtins = ["card", "iban"], fields = ["cvv"] }} }}]

[[routes]]
name = "refuse{unique}"
from = "in{unique}.refunds"
to = ["out{unique}.refunds"]
stages = [{{ redact = {{ action = "dead_letter", paths = ["payer"] }} }}]
"""
    config = decode_test_config(config_text(nats_server, unique, routes), tmp_path)
    js = nc.jetstream()
    payment = {"id": 1, "card": CARD, "cvv": 123, "iban": IBAN, "memo": f"card {CARD_DIGITS}"}
    async with Bus(config):
        await js.publish(f"in{unique}.payments", orjson.dumps(payment))
        await js.publish(
            f"in{unique}.refunds", orjson.dumps({"id": 2, "payer": {"card": CARD_DIGITS}})
        )
        await js.publish(
            f"in{unique}.refunds", orjson.dumps({"id": 3, "payer": {"name": "Ada"}, "x": CARD})
        )
        await wait_settled(nc, f"IN_{unique}", f"busway-route-mask{unique}")
        await wait_settled(nc, f"IN_{unique}", f"busway-route-refuse{unique}")

    outputs = {m.subject: orjson.loads(m.data) for m in await stream_messages(nc, f"OUT_{unique}")}
    assert outputs[f"out{unique}.masked"] == {
        "id": 1,
        "card": MASKED_CARD,
        "cvv": "[redacted]",
        "iban": "NL************4300",
        "memo": "card ************1111",
    }
    # Only `payer` is searched: id 3's card elsewhere passes.
    assert outputs[f"out{unique}.refunds"]["id"] == 3
    [dead] = await dead_letters(nc, unique)
    headers = dead.headers or {}
    assert headers["Busway-Error-Reason"] == "dlp"
    assert headers["Busway-Dlp-Rule"] == "card"
    assert headers["Busway-Error"] == (
        "stages[0].redact: the message holds a match of rule 'card' at $.payer.card; "
        "dead-lettered by the data-loss-prevention rules"
    )


def refuse_card(body: dict[str, Any]) -> dict[str, Any]:
    """A user function whose error quotes the payload, as real ones do."""
    raise Reject(f"card {body['card']} declined for {body['email']}")


@pytest.mark.anyio
async def test_a_failing_message_is_masked_in_logs_dead_letter_status_and_dlq_show(
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    routes = f"""
[[routes]]
name = "pay{unique}"
from = "in{unique}.payments"
to = ["out{unique}.paid"]
stages = [{{ python = "tests.test_redaction:refuse_card" }}]
"""
    text = config_text(nats_server, unique, routes)
    path = tmp_path / "busway.toml"
    path.write_text(text)
    config = decode_test_config(text, tmp_path)
    body = {"id": 7, "card": CARD, "email": "ada@example.com"}
    with caplog.at_level(logging.INFO, logger="busway"):
        async with Bus(config) as bus:
            await nc.jetstream().publish(f"in{unique}.payments", orjson.dumps(body))
            await wait_settled(nc, f"IN_{unique}", f"busway-route-pay{unique}")
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{bus.http_port}/status")

    expected = (
        f"tests.test_redaction:refuse_card rejected the message: card {MASKED_CARD} "
        "declined for ***@example.com"
    )
    # The log line
    [logged] = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert expected in logged
    assert CARD not in caplog.text and "ada@" not in caplog.text
    # /status
    [route] = [c for c in response.json()["components"] if c["name"] == f"pay{unique}"]
    assert route["last_error"] == f"rejected: {expected}"
    # The stored dead letter: its reason masked, its body kept as it came (for replay).
    [dead] = await dead_letters(nc, unique)
    assert (dead.headers or {})["Busway-Error"] == expected
    assert orjson.loads(dead.data) == body
    # `busway dlq show` and `dlq list`, in text and JSON: the body masked on display too.
    seq = str(dead.metadata.sequence.stream)
    for args in (("show", seq), ("show", seq, "--json"), ("list",), ("list", "--json")):
        shown = run_cli("dlq", args[0], str(path), *args[1:])
        assert shown.returncode == 0, shown.stderr
        assert CARD not in shown.stdout and "ada@example.com" not in shown.stdout, args
    shown = run_cli("dlq", "show", str(path), seq)
    assert f"error:         {expected}" in shown.stdout
    assert f'"card":"{MASKED_CARD}"' in shown.stdout


@pytest.mark.anyio
async def test_changed_redaction_rules_need_a_restart_not_a_reload(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    """The rules are process-wide (logging is): a reload must not half-apply new ones."""
    routes = f"""
[[routes]]
name = "r{unique}"
from = "in{unique}.a"
to = ["out{unique}.a"]
"""
    text = config_text(nats_server, unique, routes)
    config = decode_test_config(text, tmp_path)
    changed = decode_test_config(text.replace('["card", "email"]', '["card"]'), tmp_path)
    async with Bus(config) as bus:
        with pytest.raises(ConfigError, match=r"\[redaction\] changed: that needs a restart"):
            await bus.reload(changed)
        assert redact("ada@example.com") == "***@example.com"  # the running rules still apply
