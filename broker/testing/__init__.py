"""busway.testing: test your routes and adapters against a real bus, in a few lines.

    import anyio
    from busway.testing import start_bus

    CONFIG = '''
    [[streams]]
    name = "ORDERS"
    subjects = ["orders.>"]

    [[routes]]
    name = "big"
    from = "orders.new"
    when = "total > `100`"
    to = ["orders.big"]
    '''

    async def test_big_orders_are_routed() -> None:
        async with start_bus(CONFIG) as harness:
            async with harness.collect("orders.big") as got:
                await harness.publish("orders.new", {"total": 250}, id="o-1")
                [message] = await got.wait(1)

`start_bus` runs a real `busway.Bus` on its own embedded nats-server (free loopback ports, a
temporary store), so routes, stages, retries and dead letters behave as in production. The
`memory` sink and source (`type = "memory"`) stand in for the outside world where a test wants
to see or drive it from code. Works under pytest's anyio plugin and under plain
`asyncio.run`.

`busway.testing.conformance` holds the checks every adapter must pass, as pytest base classes
an adapter's own test module subclasses.
"""

from busway.testing._harness import Collected, Harness, eventually, harness_registry, start_bus
from busway.testing._memory import (
    MemoryHub,
    MemorySink,
    MemorySinkConfig,
    MemorySource,
    MemorySourceConfig,
    memory_adapter,
)

__all__ = [
    "Collected",
    "Harness",
    "MemoryHub",
    "MemorySink",
    "MemorySinkConfig",
    "MemorySource",
    "MemorySourceConfig",
    "eventually",
    "harness_registry",
    "memory_adapter",
    "start_bus",
]
