"""Before any source sees a request: per-address limits, trusted proxies, the admin endpoints.

A real bus (real nats-server, real listener) and real HTTP from loopback addresses: Linux
routes all of 127.0.0.0/8 to `lo`, so a client bound to 127.0.0.2 is "another address".
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus, ConfigError
from tests.support import Daemons, NatsServer, decode_test_config, free_port, run_cli

pytestmark = pytest.mark.anyio

KEY = "right-key-0123456789abcdef"
TOKEN = "admin-token-0123456789abcdef"
TOO_MANY = {
    "type": "urn:busway:problem:rate-limited",
    "title": "Too Many Requests",
    "status": 429,
    "detail": "too many requests from this address; retry after the Retry-After delay",
}
UNAUTHORIZED = {
    "type": "urn:busway:problem:unauthorized",
    "title": "Unauthorized",
    "status": 401,
    "detail": "the request carries no valid credentials: send a valid X-API-Key header",
}


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def config_text(server: NatsServer, unique: str, http: str) -> str:
    return f"""
[nats]
servers = ["{server.url}"]

[http]
listen = "127.0.0.1:0"
{http}

[[streams]]
name = "IN_{unique}"
subjects = ["in{unique}.>"]

[[sources]]
name = "api"
type = "http"
path = "/orders"
subject = "in{unique}.orders"
auth = {{ api_keys = ["{key_hash(KEY)}"] }}
"""


MakeBus = Callable[[str], AbstractAsyncContextManager[Bus]]


@pytest.fixture
def make_bus(nats_server: NatsServer, unique: str, tmp_path: Path) -> MakeBus:
    """`async with make_bus(http_lines) as bus`: a bus with these extra `[http]` lines."""

    @asynccontextmanager
    async def make(http: str) -> AsyncIterator[Bus]:
        config = decode_test_config(config_text(nats_server, unique, http), tmp_path)
        async with Bus(config) as bus:
            yield bus

    return make


def client(bus: Bus, source: str = "127.0.0.1", port: int | None = None) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(local_address=source)
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port or bus.http_port}", transport=transport
    )


async def refused_total(bus: Bus, reason: str) -> float:
    async with client(bus, "127.0.0.3") as http:  # an address no test limits
        text = (await http.get("/metrics")).text
    line = f'busway_http_refused_total{{reason="{reason}"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


async def test_guessing_api_keys_gets_429_after_the_burst_and_other_addresses_are_unaffected(
    make_bus: MakeBus, nc: NatsClient, unique: str
) -> None:
    async with make_bus("auth_failure_limit = { rate = 0.01, burst = 5 }") as bus:
        async with client(bus) as attacker:
            answers = [
                await attacker.post("/orders", json={}, headers={"X-API-Key": f"guess-{n}"})
                for n in range(20)
            ]
            # Even the right key is refused from an address that spent its failures: it
            # is not looked at, so guessing learns nothing.
            right_from_attacker = await attacker.post(
                "/orders", json={}, headers={"X-API-Key": KEY}
            )
        async with client(bus, "127.0.0.2") as partner:
            partner_answer = await partner.post("/orders", json={}, headers={"X-API-Key": KEY})
        assert [a.status_code for a in answers] == [401] * 5 + [429] * 15
        assert answers[0].json() == UNAUTHORIZED
        assert answers[-1].json() == TOO_MANY
        assert int(answers[-1].headers["retry-after"]) >= 1
        assert right_from_attacker.status_code == 429
        assert partner_answer.status_code == 202
        assert await refused_total(bus, "auth_failures") == 16
        stats = next(s for s in bus.metrics.stats if s.name == "api")
        assert stats.errors == {"bad_api_key": 5}  # the source never saw the other 15
    assert (await nc.jetstream().stream_info(f"IN_{unique}")).state.messages == 1


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket(
    make_bus: MakeBus,
) -> None:
    http = 'auth_failure_limit = { rate = 0.01, burst = 3 }\ntrusted_proxies = ["127.0.0.1/32"]'
    async with make_bus(http) as bus, client(bus) as proxy:

        async def via_proxy(forwarded: str, key: str) -> int:
            headers = {"X-API-Key": key, "X-Forwarded-For": forwarded}
            return (await proxy.post("/orders", json={}, headers=headers)).status_code

        # The attacker forges an X-Forwarded-For entry; the proxy appends the real address.
        attacker = [await via_proxy("198.51.100.7, 203.0.113.9", "guess") for _ in range(5)]
        partner = await via_proxy("192.0.2.44", KEY)
        # An untrusted peer's X-Forwarded-For is ignored: it is judged by its own address.
        async with client(bus, "127.0.0.2") as untrusted:
            spoofed = [
                (
                    await untrusted.post(
                        "/orders",
                        json={},
                        headers={"X-API-Key": "guess", "X-Forwarded-For": f"192.0.2.{n}"},
                    )
                ).status_code
                for n in range(5)
            ]
    assert attacker == [401, 401, 401, 429, 429]
    assert partner == 202
    assert spoofed == [401, 401, 401, 429, 429]


async def test_the_per_address_rate_limit_spares_the_probes(make_bus: MakeBus) -> None:
    async with make_bus("rate_limit = { rate = 0.01, burst = 3 }") as bus, client(bus) as http:
        statuses = [
            (await http.post("/orders", json={}, headers={"X-API-Key": KEY})).status_code
            for _ in range(5)
        ]
        probes = [(await http.get(path)).status_code for path in ("/healthz", "/readyz") * 3]
        limited = await http.post("/orders", json={}, headers={"X-API-Key": KEY})
    assert statuses == [202, 202, 202, 429, 429]
    assert limited.json() == TOO_MANY
    assert probes == [200] * 6


async def test_an_admin_token_guards_metrics_and_status_but_not_the_probes(
    make_bus: MakeBus,
) -> None:
    async with make_bus(f'admin_token = "{TOKEN}"') as bus, client(bus) as http:
        anonymous = [await http.get(path) for path in ("/metrics", "/status")]
        wrong = await http.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        allowed = [await http.get(path, headers=bearer) for path in ("/metrics", "/status")]
        probes = [(await http.get(path)).status_code for path in ("/healthz", "/readyz")]
    for refused in [*anonymous, wrong]:
        assert refused.status_code == 401
        assert refused.json() == {
            "type": "urn:busway:problem:unauthorized",
            "title": "Unauthorized",
            "status": 401,
            "detail": "the request carries no valid credentials",
        }
        assert refused.headers["www-authenticate"] == 'Bearer realm="busway-admin"'
    assert [a.status_code for a in allowed] == [200, 200]
    assert "busway_http_refused_total" in allowed[0].text
    assert 'busway_http_refused_total{reason="admin_unauthorized"} 3.0' in allowed[0].text
    assert probes == [200, 200]


async def test_an_admin_listener_serves_metrics_and_status_and_the_main_one_no_longer_does(
    make_bus: MakeBus,
) -> None:
    admin = free_port()
    async with (
        make_bus(f'admin_listen = "127.0.0.1:{admin}"') as bus,
        client(bus) as main,
        client(bus, port=admin) as private,
    ):
        on_main = [(await main.get(p)).status_code for p in ("/metrics", "/status")]
        probes = [(await main.get(p)).status_code for p in ("/healthz", "/readyz")]
        ingest = await main.post("/orders", json={}, headers={"X-API-Key": KEY})
        on_admin = [(await private.get(p)).status_code for p in ("/metrics", "/status")]
        admin_probes = [(await private.get(p)).status_code for p in ("/healthz", "/readyz")]
        no_ingest = await private.post("/orders", json={}, headers={"X-API-Key": KEY})
    assert on_main == [404, 404]
    assert probes == [200, 200]
    assert ingest.status_code == 202
    assert on_admin == [200, 200]
    assert admin_probes == [200, 200]
    assert no_ingest.status_code == 404
    assert no_ingest.json()["detail"] == "nothing is served at this path"


def test_a_listener_reachable_from_other_hosts_needs_admin_protection(tmp_path: Path) -> None:
    text = """
[http]
listen = "0.0.0.0:8080"
"""
    with pytest.raises(ConfigError) as refused:
        decode_test_config(text, tmp_path)
    assert "0.0.0.0:8080" in str(refused.value)
    assert "set admin_token" in str(refused.value) and "admin_listen" in str(refused.value)
    for fix in (f'admin_token = "{TOKEN}"', 'admin_listen = "10.0.0.5:9090"'):
        decode_test_config(text + fix + "\n", tmp_path)  # accepted


def test_busway_status_reads_a_daemon_behind_an_admin_listener_and_token(
    nats_server: NatsServer,
    unique: str,
    tmp_path: Path,
    daemons: Daemons,
) -> None:
    admin = f'admin_listen = "127.0.0.1:{free_port()}"'
    listen = f'listen = "127.0.0.1:{free_port()}"'
    text = config_text(nats_server, unique, f'{admin}\nadmin_token = "{TOKEN}"')
    path = tmp_path / "busway.toml"
    path.write_text(text.replace('listen = "127.0.0.1:0"', listen))
    daemon = daemons.start(path)
    daemon.wait_ready()
    result = run_cli("status", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("busway: ready (nats up)")
    # An operator with another token is refused like anyone else.
    other = tmp_path / "other.toml"
    other.write_text(path.read_text().replace(TOKEN, "x" * 32))
    wrong = run_cli("status", str(other))
    assert wrong.returncode == 1
    assert "401" in wrong.stderr
    assert daemon.terminate() == 0
