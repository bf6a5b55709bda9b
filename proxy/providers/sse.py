"""Incremental Server-Sent Events splitter: bytes in, whole events out, raw bytes kept.

It only finds event boundaries and the `event:` / `data:` fields; it never re-encodes, so a relay
can pass each event's original bytes on unchanged (or drop one) across any TCP chunking.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# An event ends at a blank line; the SSE spec allows \n, \r\n and \r line endings.
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    raw: bytes  # the event's bytes including its terminating blank line
    event: str  # the `event:` field, "" when absent
    data: bytes  # the `data:` lines joined with b"\n"


def parse_event(raw: bytes) -> SSEEvent:
    event = ""
    data: list[bytes] = []
    for line in _LINE.split(raw):
        if not line or line[:1] == b":":
            continue
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    return SSEEvent(raw, event, b"\n".join(data))


class SSESplitter:
    """Feed it chunks as they arrive; it returns the events completed so far."""

    __slots__ = ("_buf", "max_event_bytes")

    def __init__(self, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self._buf = b""
        self.max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buf = self._buf + chunk if self._buf else chunk
        events: list[SSEEvent] = []
        start = 0
        for m in _BOUNDARY.finditer(buf):
            events.append(parse_event(buf[start : m.end()]))
            start = m.end()
        rest = buf[start:]
        if len(rest) > self.max_event_bytes:
            # A misbehaving upstream that never ends an event: flush it as one so memory stays bounded.
            events.append(parse_event(rest))
            rest = b""
        self._buf = rest
        return events

    def flush(self) -> list[SSEEvent]:
        """Whatever is left when the stream ends (an event without its blank line)."""
        rest, self._buf = self._buf, b""
        return [parse_event(rest)] if rest.strip() else []

    @property
    def pending(self) -> bytes:
        return self._buf
