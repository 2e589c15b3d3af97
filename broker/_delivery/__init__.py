"""The delivery contract: a consumer's ack/nak/term, retries, dead letters, crash isolation."""
