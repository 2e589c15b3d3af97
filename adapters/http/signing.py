"""Webhook signatures in the Standard Webhooks style, so receivers can use its libraries.

Each request carries

    webhook-id: <message id>              the same on every retry: receivers dedup on it
    webhook-timestamp: <unix seconds>     receivers reject old ones (replay protection)
    webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">

with the secret given as `whsec_<base64>` (usually `${file:/run/secrets/...}` or `${ENV}`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable

__all__ = ["WebhookSigner"]

_PREFIX = "whsec_"


class WebhookSigner:
    """Signs request bodies with one secret."""

    def __init__(self, secret: str, clock: Callable[[], float] = time.time) -> None:
        self._key = decode_secret(secret)
        self._clock = clock

    def headers(self, message_id: str, body: bytes) -> dict[str, str]:
        """The three `webhook-*` headers for `body` sent as `message_id`, signed now."""
        timestamp = str(int(self._clock()))
        signed = b"%s.%s.%s" % (message_id.encode(), timestamp.encode(), body)
        digest = hmac.new(self._key, signed, hashlib.sha256).digest()
        return {
            "webhook-id": message_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": "v1," + base64.b64encode(digest).decode(),
        }


def decode_secret(secret: str) -> bytes:
    """The key bytes of `whsec_<base64>`; ValueError saying what is expected."""
    if not secret.startswith(_PREFIX):
        raise ValueError("signing_secret must look like whsec_<base64> (Standard Webhooks)")
    try:
        key = base64.b64decode(secret[len(_PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError("signing_secret: the part after whsec_ is not valid base64") from None
    if len(key) < 16:
        raise ValueError("signing_secret must hold at least 16 random bytes (24 recommended)")
    return key
