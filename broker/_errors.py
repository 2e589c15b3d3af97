"""Busway's exception tree: every error busway raises is one of these.

    BuswayError
    ├── ConfigError              bad configuration: names the file, key path, line, what to do
    ├── StartupError             a service could not start (bind, connect, embedded server)
    └── DeliveryError            a message could not be handled
        ├── RetryableError       transient: the input is naked and redelivered with back-off
        │   ├── PublishError     JetStream did not confirm a publish (timeout, no stream, down)
        │   ├── BusUnavailable   NATS did not answer: connection lost or closed, a timeout
        │   └── JetStreamError   JetStream answered an operation with an error (its code)
        ├── PermanentError       retrying cannot help: the message is dead-lettered, then acked
        └── BatchError           a sink wrote part of a batch: per-message outcomes

Foreign exceptions (nats-py, OS errors, adapters' libraries) are translated into this tree once,
at the module that talks to the foreign library, so the engine only ever decides on these types.
nats-py's are translated in `busway._nats.errors` (`map_exceptions`, `publish_error`).
"""

from __future__ import annotations

from collections.abc import Mapping


class BuswayError(Exception):
    """Root of every error busway raises."""


class ConfigError(BuswayError):
    """The configuration is invalid; the message names file, key path and expectation.

    Raised by `busway check` and at start-up, before anything connects.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        path: str | None = None,
        line: int | None = None,
    ) -> None:
        self.file = file
        self.path = path
        self.line = line
        self.detail = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        if self.path:
            where += f" at {self.path}"
        return f"{where}: {self.detail}"

    def located(
        self, *, file: str | None = None, path_prefix: str = "", line: int | None = None
    ) -> ConfigError:
        """The same error placed under `path_prefix` (for nested decoding) and in `file`."""
        path = self.path or "$"
        if path_prefix:
            path = path_prefix + path[1:]
        return ConfigError(
            self.detail,
            file=file or self.file,
            path=path,
            line=line if line is not None else self.line,
        )


class StartupError(BuswayError):
    """A service could not start: a port is taken, NATS is unreachable, a stream is refused."""


class DeliveryError(BuswayError):
    """A message could not be handled. Subclasses say whether a retry can help.

    `headers` are added to the message's dead letter if it ends there (e.g. an HTTP sink's
    `Busway-Http-Status`), so an operator can filter on them without parsing the error text.
    """

    headers: dict[str, str] | None = None


class RetryableError(DeliveryError):
    """A transient failure: the message is naked and redelivered after a back-off.

    `retry_after` (seconds) lets the failing side ask for a specific delay, e.g. an HTTP
    `Retry-After`; without it the engine's exponential back-off applies.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PublishError(RetryableError):
    """JetStream did not confirm a publish: timed out, no stream for the subject, or refused.

    `unconfirmed` is True when the message was sent and only its PubAck is missing (timeout,
    connection lost): it may have been stored. False when it was refused or never sent.

    `store_full` is True when JetStream refused because a limit is reached (a stream's
    `max_bytes` / `max_msgs` with discard-new, the account's or the server's storage): writes
    there keep failing until space is freed, which readiness reports.
    """

    unconfirmed: bool = False
    store_full = False
    subject: str | None = None
    """The subject the refused publish was for."""
    description = ""
    """JetStream's own words for a refusal (`maximum bytes exceeded`), if it refused."""


class BusUnavailable(RetryableError):
    """NATS did not answer an operation: the connection is lost, closing or slow (a timeout).

    Transient by nature: nats-py reconnects on its own, so a retry after a back-off can pass.
    """


class JetStreamError(RetryableError):
    """JetStream answered an operation with an error: `code` is its error code (10058...),
    `status` the HTTP-like status (404, 400, 503), `description` its own words."""

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        status: int | None = None,
        description: str = "",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.description = description

    @property
    def not_found(self) -> bool:
        """The stream, consumer, message or key the operation named does not exist."""
        return self.status == 404


class PermanentError(DeliveryError):
    """Retrying cannot help (bad payload, rejected by the peer): the message is dead-lettered."""


class BatchError(DeliveryError):
    """A sink delivered part of a batch; `failures` maps batch indices to their error.

    Messages whose index is absent were delivered and are acked. Each failure is handled on its
    own: a `RetryableError` is naked, a `PermanentError` (or any other error) dead-lettered.
    """

    def __init__(self, failures: Mapping[int, DeliveryError]) -> None:
        self.failures = dict(failures)
        super().__init__(f"{len(self.failures)} message(s) of the batch failed")
