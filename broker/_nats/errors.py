"""The one place nats-py's exceptions become busway's (see the tree in `busway._errors`).

    nats-py                                      busway
    nats.js.errors.APIError (JetStream's answer) JetStreamError (code, status, description)
    nats.errors.NoRespondersError                JetStreamError (status 503: JetStream absent)
    nats.errors.Error, TimeoutError              BusUnavailable (connection lost, no answer)
    a failed publish (any of the above)          PublishError (`publish_error`: what to do)

Code outside `busway._nats` catches busway errors only: every function of this package that
calls nats-py translates its failures here, with a message naming the operation, like
httpcore's `map_exceptions`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import nats.errors
import nats.js.errors

from busway._errors import (
    BusUnavailable,
    JetStreamError,
    PublishError,
    RetryableError,
    StartupError,
)

__all__ = [
    "STORE_FULL_CODES",
    "TRANSPORT_ERRORS",
    "is_refusal",
    "looks_transient",
    "map_exceptions",
    "publish_error",
    "startup_errors",
    "translate",
]

# JetStream's error codes for "no room": account resources (10002), insufficient resources
# (10023), memory or storage resources exceeded (10028, 10047), a stream limit with
# discard-new (10077: maximum messages / bytes / messages per subject exceeded).
STORE_FULL_CODES = frozenset({10002, 10023, 10028, 10047, 10077})

TRANSPORT_ERRORS = (nats.errors.Error, TimeoutError)
"""What a nats-py call raises when it fails (JetStream's answers are `nats.errors.Error` too)."""


def translate(exc: BaseException, operation: str) -> JetStreamError | BusUnavailable:
    """Busway's error for nats-py's `exc`, raised by `operation` ("read state 'k'")."""
    if isinstance(exc, nats.errors.NoRespondersError):  # nothing serves the JetStream API
        return JetStreamError(
            f"{operation}: JetStream does not answer (no responders)",
            status=503,
            description="no responders",
        )
    if isinstance(exc, nats.js.errors.APIError):
        code = exc.err_code
        return JetStreamError(
            f"{operation}: JetStream refused: {exc.description} (code {code})",
            code=code,
            status=exc.code,
            description=exc.description or "",
        )
    return BusUnavailable(f"{operation}: {exc or type(exc).__name__}")


@contextlib.contextmanager
def map_exceptions(operation: str) -> Iterator[None]:
    """Raise nats-py's failures inside the block as `translate` says, naming `operation`."""
    try:
        yield
    except TRANSPORT_ERRORS as exc:
        raise translate(exc, operation) from exc


@contextlib.contextmanager
def startup_errors(what: str) -> Iterator[None]:
    """nats-py's (and busway's) failures inside the block as a StartupError about `what`."""
    try:
        yield
    except nats.js.errors.APIError as exc:
        raise StartupError(
            f"{what}: JetStream refused: {exc.description} (code {exc.err_code})"
        ) from exc
    except (nats.errors.Error, TimeoutError) as exc:
        raise StartupError(f"{what}: {exc or type(exc).__name__}") from exc
    except JetStreamError as exc:
        raise StartupError(
            f"{what}: JetStream refused: {exc.description} (code {exc.code})"
        ) from exc
    except BusUnavailable as exc:
        raise StartupError(f"{what}: {exc}") from exc


def publish_error(exc: BaseException, subject: str) -> PublishError:
    """Our error for a failed JetStream publish to `subject`, saying what to do."""
    if isinstance(exc, PublishError):
        return exc
    if isinstance(exc, nats.js.errors.NoStreamResponseError):
        return PublishError(f"no stream captures subject {subject!r} (or JetStream is down)")
    if isinstance(exc, nats.js.errors.APIError):
        refused = PublishError(
            f"JetStream refused {subject!r}: {exc.description} (code {exc.err_code})"
        )
        refused.store_full = exc.err_code in STORE_FULL_CODES
        refused.subject = subject
        refused.description = f"{exc.description} (code {exc.err_code})"
        return refused
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return PublishError(f"no PubAck for {subject!r} in time: JetStream slow or unreachable")
    if isinstance(exc, asyncio.CancelledError):
        return PublishError(f"publish to {subject!r} abandoned (connection closed)")
    return PublishError(f"publish to {subject!r} failed: {exc!r}")


def looks_transient(exc: BaseException) -> bool:
    """An unclassified failure a retry may cure: I/O, a timeout, NATS going away, or a
    `RetryableError`."""
    return isinstance(exc, OSError | TimeoutError | nats.errors.Error | RetryableError)


def is_refusal(exc: BaseException) -> bool:
    """JetStream answered the publish (refused it, or no stream): nothing was stored."""
    return isinstance(exc, nats.js.errors.APIError | nats.js.errors.NoStreamResponseError)
