"""Sinks on JetStream: the sink worker (batching, settling) and the circuit breaker."""
