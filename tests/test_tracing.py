"""Traces: W3C trace context carried through every hop (HTTP in, routes, splits, sinks out, dead
letters), OpenTelemetry spans per hop when `[tracing]` is on, trace ids in logs; through a
real bus, real HTTP and a real nats-server."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from busway import Bus
from busway._observe.logging import HumanFormatter
from tests.configs import config_toml, io_streams
from tests.http_support import Receiver, serving
from tests.support import NatsServer, decode_test_config, eventually, stream_messages

pytestmark = pytest.mark.anyio

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE}-{CALLER_SPAN}-01"


def config_text(server: NatsServer, unique: str, url: str, tracing: str = "") -> str:
    return (
        config_toml(server, streams=io_streams(unique), dead_letter=unique, body=tracing)
        + f"""
[[sources]]
name = "api"
type = "http"
path = "/orders"
subject = "in{unique}.orders"

[[routes]]
name = "lines"
from = "in{unique}.orders"
stages = [{{ split = "lines" }}]
to = ["out{unique}.line"]

[[sinks]]
name = "hook"
type = "http"
from = "out{unique}.>"
url = "{url}/hook"
"""
    )


def parent_of(traceparent: str) -> tuple[str, str, str]:
    """(trace id, parent span id, flags) of a traceparent."""
    _, trace, span, flags = traceparent.split("-")
    return trace, span, flags


async def test_trace_context_is_carried_from_http_through_a_split_to_the_sink_and_dead_letters(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as url:
        config = decode_test_config(config_text(nats_server, unique, url), tmp_path)
        async with Bus(config) as bus:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
                traced = {"traceparent": SAMPLED, "tracestate": "vendor=abc"}
                split = await http.post("/orders", json={"lines": [1, 2]}, headers=traced)
                # `lines` is not an array: dead-lettered, with its trace context.
                failing = await http.post("/orders", json={"lines": 3}, headers=traced)
                forged = await http.post(
                    "/orders",
                    json={"lines": [9]},
                    headers={"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"},
                )
            assert [split.status_code, failing.status_code, forged.status_code] == [202] * 3

            async def delivered() -> bool:
                return len(receiver.seen) == 3

            await eventually(delivered)
    # No [tracing]: the context passes untouched through every hop.
    carried = [seen for seen in receiver.seen if seen.body in (b"1", b"2")]
    assert len(carried) == 2
    for seen in carried:
        assert seen.headers["traceparent"] == SAMPLED
        assert seen.headers["tracestate"] == "vendor=abc"
    (plain,) = [seen for seen in receiver.seen if seen.body == b"9"]
    assert "traceparent" not in plain.headers  # an all-zero trace id is invalid: dropped
    outputs = await stream_messages(nc, f"OUT_{unique}")
    assert sorted((m.headers or {}).get("traceparent", "") for m in outputs) == [
        "",
        SAMPLED,
        SAMPLED,
    ]
    (letter,) = await stream_messages(nc, f"DL_{unique}")
    assert (letter.headers or {})["traceparent"] == SAMPLED
    assert (letter.headers or {})["tracestate"] == "vendor=abc"


async def test_spans_per_hop_share_the_trace_and_chain_from_ingress_to_sink(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    exporter = InMemorySpanExporter()
    tracing = "[tracing]\nenabled = true\nsample_ratio = 0.0\n"  # the caller decided: sampled
    async with serving(receiver.app()) as url:
        text = config_text(nats_server, unique, url, tracing)
        config = decode_test_config(text, tmp_path)
        async with Bus(config, span_exporter=exporter) as bus:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
                answer = await http.post(
                    "/orders", json={"lines": [1, 2]}, headers={"traceparent": SAMPLED}
                )
            assert answer.status_code == 202

            async def delivered() -> bool:
                return len(receiver.seen) == 2

            await eventually(delivered)
    spans: tuple[ReadableSpan, ...] = exporter.get_finished_spans()
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    assert sorted(by_name) == ["ingress api", "route lines", "sink hook write"]
    (ingress,) = by_name["ingress api"]
    (route,) = by_name["route lines"]
    writes = by_name["sink hook write"]
    assert len(writes) == 2
    assert {f"{span.context.trace_id:032x}" for span in spans} == {TRACE}

    def span_id(span: ReadableSpan) -> int:
        return span.context.span_id

    assert ingress.parent is not None and f"{ingress.parent.span_id:016x}" == CALLER_SPAN
    assert route.parent is not None and route.parent.span_id == span_id(ingress)
    assert all(w.parent is not None and w.parent.span_id == span_id(route) for w in writes)
    # The partner gets the sink span as its parent: the trace continues there.
    sent = sorted(parent_of(seen.headers["traceparent"])[1] for seen in receiver.seen)
    assert sent == sorted(f"{span_id(w):016x}" for w in writes)


async def test_an_unsampled_new_trace_records_no_span_but_still_carries_a_trace_id(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    exporter = InMemorySpanExporter()
    tracing = "[tracing]\nenabled = true\nsample_ratio = 0.0\n"
    async with serving(receiver.app()) as url:
        config = decode_test_config(config_text(nats_server, unique, url, tracing), tmp_path)
        async with Bus(config, span_exporter=exporter) as bus:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
                answer = await http.post("/orders", json={"lines": [1, 2]})
            assert answer.status_code == 202

            async def delivered() -> bool:
                return len(receiver.seen) == 2

            await eventually(delivered)
    assert exporter.get_finished_spans() == ()
    (stored,) = await stream_messages(nc, f"IN_{unique}")
    trace, _, flags = parent_of((stored.headers or {})["traceparent"])
    assert flags == "00"
    assert {parent_of(seen.headers["traceparent"]) for seen in receiver.seen} == {
        parent_of((stored.headers or {})["traceparent"])
    }
    assert trace != TRACE


async def test_spans_are_exported_over_otlp_http(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    posts: list[ExportTraceServiceRequest] = []

    async def collect(request: Request) -> Response:
        assert request.headers["content-type"] == "application/x-protobuf"
        posts.append(ExportTraceServiceRequest.FromString(await request.body()))
        return Response(b"", status_code=200, media_type="application/x-protobuf")

    collector = Starlette(routes=[Route("/v1/traces", collect, methods=["POST"])])
    receiver = Receiver()
    async with serving(collector) as otlp, serving(receiver.app()) as url:
        tracing = (
            f'[tracing]\nenabled = true\nsample_ratio = 1.0\notlp_endpoint = "{otlp}/v1/traces"\n'
            f'service_name = "busway-{unique}"\n'
        )
        config = decode_test_config(config_text(nats_server, unique, url, tracing), tmp_path)
        async with Bus(config) as bus:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
                assert (await http.post("/orders", json={"lines": [1]})).status_code == 202

            async def delivered() -> bool:
                return len(receiver.seen) == 1

            await eventually(delivered)
        # Leaving the bus flushed the exporter.
    names = sorted(
        span.name
        for post in posts
        for resource in post.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    )
    assert names == ["ingress api", "route lines", "sink hook write"]
    services = {
        attribute.value.string_value
        for post in posts
        for resource in post.resource_spans
        for attribute in resource.resource.attributes
        if attribute.key == "service.name"
    }
    assert services == {f"busway-{unique}"}


async def test_a_dead_letter_log_line_carries_the_trace_id(
    nats_server: NatsServer, unique: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as url:
        config = decode_test_config(config_text(nats_server, unique, url), tmp_path)
        with caplog.at_level(logging.ERROR, logger="busway.route.lines"):
            async with Bus(config) as bus:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
                    await http.post("/orders", json={"lines": 3}, headers={"traceparent": SAMPLED})

                async def logged() -> bool:
                    return any("dead-lettered" in r.getMessage() for r in caplog.records)

                await eventually(logged)
    (record,) = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert record.trace_id == TRACE  # type: ignore[attr-defined]
    assert HumanFormatter().format(record).endswith(f"[trace {TRACE}]")
    assert orjson.loads(_json_line(record))["trace_id"] == TRACE


def _json_line(record: logging.LogRecord) -> str:
    from busway._observe.logging import JsonFormatter

    return JsonFormatter().format(record)


def test_tracing_off_never_imports_opentelemetry(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import pathlib, sys, anyio
        from busway import Bus
        from tests.support import decode_test_config
        text = '[nats]\\nlisten = "127.0.0.1:0"\\n'
        config = decode_test_config(text, pathlib.Path(sys.argv[1]))

        async def main():
            async with Bus(config):
                pass

        anyio.run(main)
        loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
        print(loaded)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


async def test_tracing_with_a_caller_that_sent_nothing_gets_a_trace_at_full_sampling(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    receiver = Receiver()
    async with serving(receiver.app()) as url:
        tracing = "[tracing]\nenabled = true\nsample_ratio = 1.0\n"
        config = decode_test_config(config_text(nats_server, unique, url, tracing), tmp_path)
        async with Bus(config, span_exporter=exporter) as bus:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
                assert (await http.post("/orders", json={"lines": [1]})).status_code == 202

            async def delivered() -> bool:
                return len(receiver.seen) == 1

            await eventually(delivered)
    spans = exporter.get_finished_spans()
    (ingress,) = [span for span in spans if span.name == "ingress api"]
    assert ingress.parent is None  # a new trace starts at the ingress
    assert len({span.context.trace_id for span in spans}) == 1
    (stored,) = await stream_messages(nc, f"IN_{unique}")
    flags = int(parent_of((stored.headers or {})["traceparent"])[2], 16)
    assert flags & 1 == 1  # sampled (the SDK also sets W3C level 2's "random" bit)
