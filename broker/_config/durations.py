"""Durations live with the routers (stage configs use them); the engine re-exports them."""

from busway.routers.durations import Duration, parse_duration

__all__ = ["Duration", "parse_duration"]
