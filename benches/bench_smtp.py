"""SMTP sink throughput, busway vs a hand-written aiosmtplib loop doing the same work, same run.

Against one aiosmtpd server (tests/smtp_support.py, on a free loopback port, no TLS):

* raw:    one aiosmtplib connection per batch of 256; per message: build an EmailMessage
          (From, To, Subject filled by an f-string, a Message-ID) and `send_message`;
* busway: `SmtpSink.write` on the same batches (templates for To and Subject compiled once,
          the JSON body parsed for `{body.id}`, Message-ID from the message id, per-mail
          outcome mapping).

Rounds alternate raw and busway; medians are printed with the ratio busway/raw.

    python benches/bench_smtp.py                # 3000 mails, 3 rounds
    python benches/bench_smtp.py --count 1000 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import anyio
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from busway import BuildContext, Message, default_registry
from busway._config.model import decode_config
from busway.adapters.smtp import SmtpSink
from tests.smtp_support import MailServer

BATCH = 256


def messages(count: int) -> list[Message]:
    return [
        Message(
            subject="mail.out",
            data=orjson.dumps({"id": i, "state": "late", "note": "x" * 200}),
            headers={"To": "ops@example.com"},
            id=f"orders:{i}",
            stream="MAIL",
            sequence=i,
            attempt=1,
        )
        for i in range(count)
    ]


async def raw(server: MailServer, batch: list[Message]) -> float:
    started = time.perf_counter()
    for first in range(0, len(batch), BATCH):
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port, start_tls=False)
        await client.connect()
        for message in batch[first : first + BATCH]:
            doc = orjson.loads(message.data)
            mail = EmailMessage()
            mail["From"] = "busway@example.com"
            mail["To"] = message.headers["To"]
            mail["Subject"] = f"Order {doc['id']} is {doc['state']}"
            mail["Message-ID"] = f"<busway.{message.id}@bench>"
            mail.set_content(message.data.decode())
            await client.send_message(mail)
        await client.quit()
    return len(batch) / (time.perf_counter() - started)


async def busway(server: MailServer, batch: list[Message], work: Path) -> float:
    registry = default_registry()
    config = decode_config(
        '[[streams]]\nname = "MAIL"\nsubjects = ["mail.>"]\n[[sinks]]\nname = "bench"\n'
        f'type = "smtp"\nfrom = "mail.>"\nhost = "127.0.0.1"\nport = {server.port}\n'
        'security = "none"\nsender = "busway@example.com"\nto = ["{header.To}"]\n'
        'subject = "Order {body.id} is {body.state}"\nmessage_id_domain = "bench"\n',
        base_dir=str(work),
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    sink = SmtpSink(config.sinks[0], BuildContext(base_dir=work))  # type: ignore[arg-type]
    started = time.perf_counter()
    for first in range(0, len(batch), BATCH):
        await sink.write(batch[first : first + BATCH])
    return len(batch) / (time.perf_counter() - started)


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-smtp-"))
    server = MailServer(work)
    batch = messages(args.count)
    results: dict[str, list[float]] = {"raw": [], "busway": []}
    try:
        for _ in range(args.rounds):
            results["raw"].append(await raw(server, batch))
            results["busway"].append(await busway(server, batch, work))
    finally:
        server.stop()
    assert len(server.mails) == 2 * args.count * args.rounds
    medians = {k: statistics.median(v) for k, v in results.items()}
    print(
        json.dumps(
            {
                "mails": args.count,
                "rounds": args.rounds,
                "mails_per_s": {k: round(v) for k, v in medians.items()},
                "ratio": round(medians["busway"] / medians["raw"], 2),
            },
            indent=2,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    anyio.run(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
