"""One bus message as one e-mail: recipients, subject and body from templates, and a
`Message-ID` derived from the message id.

The `Message-ID` is `<busway.<id>@<domain>>`, the same for every delivery of one message, so
a redelivery after a lost SMTP answer (the mail was accepted, the ack was not) is recognisable
as the same mail by the receiving side: mail clients thread it as one, and deduplicating
filters (procmail's `formail -D`, Gmail) drop the copy. SMTP itself cannot refuse a duplicate.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import quote

from busway import Message, PermanentError
from busway.adapters._template import Fields, Template, no_line_breaks

__all__ = ["MailTemplate", "message_id"]


def message_id(busway_id: str, domain: str) -> str:
    """`<busway.<id>@<domain>>`, the id made of characters an RFC 5322 msg-id may hold."""
    return f"<busway.{quote(busway_id, safe='-_~+=')}@{domain}>"


@dataclass(frozen=True, slots=True)
class Mail:
    """What is sent for one message: the envelope and the e-mail itself."""

    sender: str
    recipients: list[str]
    email: EmailMessage


class MailTemplate:
    """The sink's compiled templates; `render(message)` builds its mail."""

    def __init__(
        self,
        *,
        sender: str,
        to: list[str],
        cc: list[str],
        subject: str,
        body: str | None,
        content_type: str,
        domain: str,
    ) -> None:
        header = no_line_breaks
        self.sender = sender
        self.to = [Template.compile(t, escape=header("the To header"), where="$.to") for t in to]
        self.cc = [Template.compile(t, escape=header("the Cc header"), where="$.cc") for t in cc]
        self.subject = Template.compile(
            subject, escape=header("the Subject header"), where="$.subject"
        )
        self.body = Template.compile(body, where="$.body") if body is not None else None
        self.subtype = content_type.split("/", 1)[1]
        self.domain = domain

    def render(self, message: Message) -> Mail:
        """The mail for `message`; PermanentError (MissingField) if a template cannot fill."""
        fields = Fields(message)
        to = [template.render(fields) for template in self.to]
        cc = [template.render(fields) for template in self.cc]
        for address in (*to, *cc):
            if "@" not in email.utils.parseaddr(address)[1]:
                raise PermanentError(
                    f"message {message.id}: recipient {address!r} is not an e-mail address"
                )
        mail = EmailMessage()
        mail["From"] = self.sender
        mail["To"] = ", ".join(to)
        if cc:
            mail["Cc"] = ", ".join(cc)
        mail["Subject"] = self.subject.render(fields)
        mail["Message-ID"] = message_id(message.id, self.domain)
        mail["Date"] = email.utils.formatdate(localtime=False)
        mail["X-Busway-Message-Id"] = message_id(message.id, self.domain)[1:-1]
        mail.set_content(self._text(message, fields), subtype=self.subtype)
        return Mail(sender=email.utils.parseaddr(self.sender)[1], recipients=to + cc, email=mail)

    def _text(self, message: Message, fields: Fields) -> str:
        if self.body is not None:
            return self.body.render(fields)
        try:
            return message.data.decode("utf-8")
        except UnicodeDecodeError:
            raise PermanentError(
                f"message {message.id}: the body is not UTF-8 text; set `body` to a template "
                "that picks text out of it"
            ) from None
