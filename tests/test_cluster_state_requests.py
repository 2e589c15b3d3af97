"""Request-reply across daemons: a request taken by daemon A is answered by a route on daemon B.

The request is stored in JetStream and the answer comes back on A's reply subject through
NATS, so the daemon that serves the HTTP caller need not run the route. Here A runs only the
HTTP source and B only the route.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from busway import Bus
from tests.support import NatsServer, decode_test_config

pytestmark = pytest.mark.anyio


def common(server: NatsServer, unique: str) -> str:
    return f"""
[nats]
servers = ["{server.url}"]

[http]
listen = "127.0.0.1:0"

[[streams]]
name = "XRQ_{unique}"
subjects = ["xrq{unique}.>"]
"""


async def test_a_request_on_one_daemon_is_answered_by_a_route_on_another(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    caller_side = (
        common(nats_server, unique)
        + f"""
[[sources]]
name = "api{unique}"
type = "http"
path = "/quotes"
subject = "xrq{unique}.quotes"
reply_timeout = "20s"
"""
    )
    route_side = (
        common(nats_server, unique)
        + f"""
[[routes]]
name = "quote{unique}"
from = "xrq{unique}.quotes"
stages = [
  {{ set_headers = {{ "Busway-Http-Status" = "'201'" }} }},
  {{ reply = "{{sku: sku, total: qty}}" }},
]
"""
    )
    async with (
        Bus(decode_test_config(caller_side, tmp_path)) as caller,
        Bus(decode_test_config(route_side, tmp_path)) as router,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{caller.http_port}") as client,
    ):
        answers = [await client.post("/quotes", json={"sku": f"s{i}", "qty": i}) for i in range(5)]
        [route_stats] = router.metrics.stats
        [source_stats] = caller.metrics.stats
    assert [(a.status_code, a.json()) for a in answers] == [
        (201, {"sku": f"s{i}", "total": i}) for i in range(5)
    ]
    assert (source_stats.kind, route_stats.kind) == ("source", "route")
