"""One template syntax for every sink (busway.adapters._template), and the old forms still
accepted with a deprecation warning that says what to write instead."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest

from busway import Message, PermanentError
from busway.adapters._template import Template
from busway.adapters.file._template import PathTemplate
from busway.adapters.http.templates import Template as HttpTemplate
from busway.adapters.sql._subject import SubjectTemplate
from tests.support import run_cli

MESSAGE = Message(
    subject="orders.eu.new",
    data=orjson.dumps({"order": {"id": 17, "lines": ["a", "b"]}, "region": "eu"}),
    headers={"X-Tenant": "acme"},
    id="orders:17",
    stream="ORDERS",
    sequence=4,
    attempt=1,
)


def test_every_field_of_the_one_syntax() -> None:
    text = (
        "{id}|{subject}|{subject[1]}|{subject[-1]}|{stream}|{seq}|{header.X-Tenant}|"
        "{header.x-tenant}|{body.order.id}|{body.order.lines.1}|{{literal}}"
    )
    assert Template.compile(text).render(MESSAGE) == (
        "orders:17|orders.eu.new|eu|new|ORDERS|4|acme|acme|17|b|{literal}"
    )


def test_the_same_template_means_the_same_in_every_sink() -> None:
    text = "{header.X-Tenant}/{body.order.id}/{subject[1]}"
    assert PathTemplate(text).render(MESSAGE) == "acme/17/eu"
    assert HttpTemplate.compile("https://h/" + text, url=False).render(MESSAGE) == (
        "https://h/acme/17/eu"
    )
    assert Template.compile(text).render(MESSAGE) == "acme/17/eu"


@pytest.mark.parametrize(
    ("old", "new"),
    [("{header[X-Tenant]}", "{header.X-Tenant}"), ("{body[order.id]}", "{body.order.id}")],
)
def test_the_file_sinks_old_brackets_still_work_with_a_deprecation_warning(
    old: str, new: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="busway.config"):
        template = PathTemplate(f"out/{old}.json")
    assert template.render(MESSAGE) == PathTemplate(f"out/{new}.json").render(MESSAGE)
    [record] = [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert f"{old} is deprecated, write {new}" in record.getMessage()


def test_the_sql_sources_bare_column_still_works_with_a_deprecation_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="busway.config"):
        old = SubjectTemplate("orders.{region}")
    new = SubjectTemplate("orders.{body.region}")
    assert old.render({"region": "eu"}) == new.render({"region": "eu"}) == "orders.eu"
    assert old.fields == new.fields == ["region"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("{region} is deprecated, write {body.region}" in m for m in messages), messages


def test_the_canonical_forms_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="busway.config"):
        PathTemplate("out/{header.X-Tenant}/{body.order.id}-{id}.json")
        SubjectTemplate("orders.{body.region}")
        HttpTemplate.compile("https://h/{body.order.id}", url=True)
    assert caplog.records == []


def test_a_missing_field_is_a_permanent_error_naming_it() -> None:
    with pytest.raises(PermanentError, match=r"header 'X-Missing' is missing"):
        Template.compile("{header.X-Missing}").render(MESSAGE)
    with pytest.raises(PermanentError, match=r"the body has no field 'order.nope'"):
        Template.compile("{body.order.nope}").render(MESSAGE)


def test_an_unknown_field_is_refused_when_compiled() -> None:
    with pytest.raises(ValueError, match=r"unknown field \{nope\}"):
        Template.compile("x{nope}")


def test_busway_check_shows_the_deprecation(tmp_path: Path) -> None:
    config = tmp_path / "busway.toml"
    config.write_text(
        '[nats]\nlisten = "127.0.0.1:0"\n\n[[streams]]\nname = "S"\nsubjects = ["s.>"]\n\n'
        '[[sinks]]\nname = "out"\ntype = "file"\nfrom = "s.>"\nmode = "per-message"\n'
        'path = "out/{header[X-Tenant]}/{id}.json"\n'
    )
    done = run_cli("check", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "{header[X-Tenant]} is deprecated, write {header.X-Tenant}" in done.stderr
