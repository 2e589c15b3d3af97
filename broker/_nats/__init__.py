"""The NATS boundary: connection, JetStream streams/consumers/KV, the continuous pull, the
publish fast path, the embedded server.
"""
