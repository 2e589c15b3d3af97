"""Log output: readable lines for people by default, one JSON object per line for machines."""

from __future__ import annotations

import logging
import sys
import time

import orjson

__all__ = ["configure_logging"]

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", ...extra}` per line, for log shippers."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        for key, value in vars(record).items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class HumanFormatter(logging.Formatter):
    """`12:00:00 INFO    busway.route.x: message`, with ` [trace <id>]` on a line about a
    message that carries W3C trace context (`extra=log_extra(headers)`), and `[wN] ` before
    the logger name in a worker of `busway run --workers`."""

    def __init__(self, tag: str = "") -> None:
        super().__init__(f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace = getattr(record, "trace_id", None)
        return f"{line} [trace {trace}]" if trace else line


def configure_logging(
    *, log_format: str = "human", level: str = "info", worker: int | None = None
) -> None:
    """Send busway's logs (and uvicorn's) to stderr in `log_format` ("human" or "json").

    `worker` (`busway run --workers`) tags each line with the worker's number (`[w2]`, or a
    `worker` field in JSON): the workers share the supervisor's stderr.
    """
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        tag = f"[w{worker}] " if worker is not None else ""
        handler.setFormatter(HumanFormatter(tag))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("nats").setLevel(logging.WARNING)
