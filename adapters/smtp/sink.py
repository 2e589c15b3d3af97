"""The `smtp` sink: each message becomes one e-mail, sent through an SMTP server.

    [[sinks]]
    name = "order-alerts"
    type = "smtp"
    from = "orders.failed"
    host = "smtp.example.com"
    port = 587
    security = "starttls"                  # or "tls" (port 465), "none" (a local relay)
    username = "busway"
    password = "${SMTP_PASSWORD}"          # from the environment, never in the file
    sender = "Busway <busway@example.com>"
    to = ["ops@example.com", "{header.X-Owner}"]
    subject = "Order {body.order.id} failed"
    body = "Order {body.order.id} of {body.customer.name} failed: {body.reason}"

Templates use the syntax every sink shares (`busway.adapters._template`). Without `body` the
message body itself is the mail's text. Each message's `Message-ID` comes from its id (see
`_mail`), so a redelivered mail is recognisable as the same one.

One connection serves a batch; each mail's outcome is its own (`BatchError`). SMTP's answer
decides: a 5xx (mailbox unknown, message refused) is permanent and dead-letters the message
with the server's reply, a 4xx (greylisting, mailbox full, try later) and a lost or refused
connection are retryable (nak with back-off, circuit breaker). A mail some recipients refused
permanently while others took it counts as delivered (sending again would duplicate it for
the others), with a warning naming the refused addresses. A refused login stops start-up.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Sequence
from typing import Literal

import aiosmtplib
import msgspec

from busway import (
    BatchError,
    BuildContext,
    ConfigError,
    DeliveryError,
    Duration,
    Message,
    PermanentError,
    RetryableError,
    Sink,
    SinkConfig,
    StartupError,
)
from busway.adapters.smtp._mail import Mail, MailTemplate

__all__ = ["SmtpSink", "SmtpSinkConfig"]

logger = logging.getLogger("busway.adapters.smtp")


class SmtpSinkConfig(SinkConfig, tag="smtp", frozen=True, kw_only=True):
    """An SMTP server (submission or relay) and the mail each message becomes."""

    host: str
    """Host name or address of the SMTP server."""
    port: int | None = None
    """TCP port (default: 465 with `security = "tls"`, 587 with `starttls`, 25 with `none`)."""
    security: Literal["starttls", "tls", "none"] = "starttls"
    """`starttls`: upgrade a plain connection (required: a server without STARTTLS fails);
    `tls`: TLS from the first byte (SMTPS); `none`: plain text, only to a relay on the same
    host or network."""
    ca_file: str | None = None
    """PEM file of the CA that signed the server's certificate (default: the system's CAs)."""
    validate_certs: bool = True
    """`false` skips certificate checks: only for a test server."""
    username: str | None = None
    """Login name (with `password`); without it no AUTH is tried."""
    password: str | None = None
    """Login password: write `"${SMTP_PASSWORD}"` or `"${file:/run/secrets/smtp}"`, never the
    password itself. Never logged."""
    sender: str
    """`From` of every mail and the envelope sender (`Name <address>` or an address)."""
    to: list[str]
    """Recipients, each a template (`"{header.X-Owner}"`) or an address."""
    cc: list[str] = msgspec.field(default_factory=list)
    """Copy recipients, templates as `to`."""
    subject: str
    """The subject line, a template."""
    body: str | None = None
    """The text, a template; without it the message body itself (UTF-8 text)."""
    content_type: Literal["text/plain", "text/html"] = "text/plain"
    """The body's type."""
    message_id_domain: str | None = None
    """The domain in each `Message-ID` (`<busway.<id>@domain>`; default: this host's name).
    Keep it the same on every daemon, so every copy of a mail has the same id."""
    timeout: Duration = Duration(30.0)
    """How long connecting, logging in and each SMTP command may take."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.to:
            raise ValueError("to must name at least one recipient")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if "@" not in self.sender:
            raise ValueError(f"sender {self.sender!r} is not an e-mail address")
        if float(self.timeout) <= 0:
            raise ValueError("timeout must be positive")


_DEFAULT_PORTS = {"tls": 465, "starttls": 587, "none": 25}


class SmtpSink(Sink):
    """Sends each message as one e-mail; see the module docstring for the error mapping."""

    def __init__(self, config: SmtpSinkConfig, context: BuildContext) -> None:
        self.config = config
        self.port = config.port or _DEFAULT_PORTS[config.security]
        self.label = f"smtp://{config.host}:{self.port}"
        self._ca_file = context.resolve_path(config.ca_file) if config.ca_file else None
        try:
            self.template = MailTemplate(
                sender=config.sender,
                to=config.to,
                cc=config.cc,
                subject=config.subject,
                body=config.body,
                content_type=config.content_type,
                domain=config.message_id_domain or socket.getfqdn(),
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._healthy = True

    def _client(self) -> aiosmtplib.SMTP:
        config = self.config
        context: ssl.SSLContext | None = None
        if config.security != "none":
            context = ssl.create_default_context(
                cafile=str(self._ca_file) if self._ca_file else None
            )
            if not config.validate_certs:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        return aiosmtplib.SMTP(
            hostname=config.host,
            port=self.port,
            timeout=float(config.timeout),
            use_tls=config.security == "tls",
            start_tls=config.security == "starttls",
            tls_context=context,
            username=config.username,
            password=config.password,
        )

    async def open(self) -> None:
        """Connect and log in once: a refused login stops start-up, unreachable does not."""
        client = self._client()
        try:
            await client.connect()
            await client.quit()
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise StartupError(self._login_refused(exc)) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._healthy = False
            logger.warning("%s not reachable yet, will retry: %s", self.label, _reply(exc))
        finally:
            client.close()

    def _login_refused(self, exc: aiosmtplib.SMTPAuthenticationError) -> str:
        return (
            f"{self.label}: the server refused the login of {self.config.username!r} "
            f"({exc.code} {_first_line(exc.message)}); check username and password"
        )

    async def write(self, batch: Sequence[Message]) -> None:
        """Send one mail per message over one connection; BatchError for those that failed."""
        failures: dict[int, DeliveryError] = {}
        mails: list[tuple[int, Message, Mail]] = []
        for index, message in enumerate(batch):
            try:
                mails.append((index, message, self.template.render(message)))
            except PermanentError as exc:
                failures[index] = exc
        if mails:
            await self._send_all(mails, failures)
        if failures:
            raise BatchError(failures)

    async def _send_all(
        self, mails: list[tuple[int, Message, Mail]], failures: dict[int, DeliveryError]
    ) -> None:
        client = self._client()
        try:
            try:
                await client.connect()
            except aiosmtplib.SMTPAuthenticationError as exc:
                raise RetryableError(self._login_refused(exc)) from None
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise RetryableError(f"connecting to {self.label}: {_reply(exc)}") from None
            for position, (index, message, mail) in enumerate(mails):
                try:
                    await self._send(client, message, mail)
                except (aiosmtplib.SMTPServerDisconnected, OSError) as exc:
                    lost = RetryableError(f"{self.label}: connection lost: {_reply(exc)}")
                    for later, _, _ in mails[position:]:
                        failures[later] = lost
                    break
                except DeliveryError as exc:
                    failures[index] = exc
            else:
                # Every mail was accepted: a lost goodbye changes nothing.
                with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                    await client.quit()
        except RetryableError:
            self._healthy = False
            raise
        finally:
            client.close()
        self._healthy = not any(isinstance(e, RetryableError) for e in failures.values())

    async def _send(self, client: aiosmtplib.SMTP, message: Message, mail: Mail) -> None:
        try:
            refused, _ = await client.send_message(
                mail.email, sender=mail.sender, recipients=mail.recipients
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            detail = "; ".join(
                f"{r.recipient}: {r.code} {_first_line(r.message)}" for r in exc.recipients
            )
            # A 4xx among them: retrying may reach that recipient; only 5xx alone is final.
            text = f"message {message.id}: every recipient refused ({detail})"
            raise _by_code(min(codes), text) from None
        except aiosmtplib.SMTPResponseException as exc:
            if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
                raise
            raise _by_code(
                exc.code,
                f"message {message.id}: {self.label} answered {exc.code} "
                f"{_first_line(exc.message)}",
            ) from None
        if refused:
            logger.warning(
                "message %s: sent, but %s refused %s",
                message.id,
                self.label,
                ", ".join(f"{address} ({r.code})" for address, r in refused.items()),
            )

    async def close(self) -> None:
        """Nothing stays open between batches."""

    def ready(self) -> bool:
        """False after a failed delivery that may heal, until a mail goes out again."""
        return self._healthy


def _by_code(code: int, text: str) -> DeliveryError:
    """5xx: permanent (dead letter); anything else, 4xx above all: retry later."""
    if 500 <= code < 600:
        return PermanentError(text)
    return RetryableError(text)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _reply(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return (
        f"{code} {_first_line(message)}"
        if isinstance(code, int) and code > 0
        else _first_line(message)
    )
