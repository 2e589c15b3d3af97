"""Fault injection: the engine on its worst days, bounded in count and time (issue 8)."""
