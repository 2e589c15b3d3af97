"""MQTT topics <-> NATS subjects, by the rules nats-server's own MQTT listener applies.

Using the same rules means a topic names the same subject whether a device publishes through
busway's `mqtt` source or straight into the embedded server's MQTT listener:

    sensors/cold-1/temp   <->  sensors.cold-1.temp    `/` between two levels is `.`
    /sensors/temp         <->  /.sensors.temp         a leading `/` is `/.`
    sensors/temp/         <->  sensors.temp./         a trailing `/` is `./`
    sensors//temp         <->  sensors./.temp         a `/` beside another is `./` or `/.`
    spBv1.0/plant1        <->  spBv1//0.plant1        a `.` in a topic is `//`

A topic holding a space or a control character has no subject (ValueError); so has one
whose level is `*` or `>` (they would be subject wildcards).
"""

from __future__ import annotations

__all__ = ["subject_to_topic", "topic_to_subject"]

_FORBIDDEN = frozenset(" \t\r\n\x00")


def topic_to_subject(topic: str) -> str:
    """The NATS subject of MQTT topic name `topic`; ValueError when it cannot have one."""
    if not topic:
        raise ValueError("an empty topic has no subject")
    out: list[str] = []
    last = len(topic) - 1
    for index, char in enumerate(topic):
        if char == "/":
            if index == 0 or out[-1].endswith("."):
                out.append("/.")
            elif index == last or topic[index + 1] == "/":
                out.append("./")
            else:
                out.append(".")
        elif char == ".":
            out.append("//")
        elif char in _FORBIDDEN or char < " ":
            raise ValueError(f"topic {topic!r} holds a space or control character")
        else:
            out.append(char)
    subject = "".join(out)
    if any(token in ("*", ">") for token in subject.split(".")):
        raise ValueError(f"topic {topic!r} has a level `*` or `>`, a wildcard in NATS")
    return subject


def subject_to_topic(subject: str) -> str:
    """The MQTT topic of NATS subject `subject` (the inverse of `topic_to_subject`)."""
    out: list[str] = []
    index = 0
    last = len(subject) - 1
    while index <= last:
        char = subject[index]
        if char == "/":
            if index < last and subject[index + 1] in "./":
                out.append("/" if subject[index + 1] == "." else ".")
                index += 1
            # a lone `/` stands beside a `.` that already made the level separator
        elif char == ".":
            out.append("/")
        else:
            out.append(char)
        index += 1
    return "".join(out)
