"""Busway's routing brain: subject matching, expressions and routes, pure and broker-free.

Nothing here imports NATS: a route is a function from a decoded message to zero or more
outputs, testable without a server. The engine (busway) feeds it and owns the acks.
"""

from busway.routers.pipeline import Reject

__all__ = ["Reject"]
