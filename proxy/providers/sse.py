"""Incremental Server-Sent Events splitter: bytes in, whole events out, raw bytes kept.

It only finds event boundaries and the `event:` / `data:` fields; it never re-encodes, so a relay
can pass each event's original bytes on unchanged (or drop one) across any TCP chunking.
`whole_end` and `event_ends` give the same boundaries as the splitter without building events,
for relays that pass whole runs of events on as they came.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass

# An event ends at a blank line; the SSE spec allows \n, \r\n and \r line endings.
_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# Each alone: when only one kind occurs in a block, its literal scan cuts the same events and is
# several times faster than the alternation (which has no literal prefix to search for).
_LF, _CRLF, _CR = re.compile(rb"\n\n"), re.compile(rb"\r\n\r\n"), re.compile(rb"\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")
_EOL = b"\r\n"
MAX_EVENT_BYTES = 16 * 1024 * 1024


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


def whole_end(buf: bytes) -> int:
    """Where the last complete event in `buf` ends (0: none), exactly as the splitter cuts.

    Boundaries sit in runs of CR/LF bytes, and how a run splits depends only on the run itself,
    so the common endings are decided from the last few bytes and any other from one run.
    """
    n = len(buf)
    if buf.endswith(b"\n\n"):
        if n == 2 or buf[n - 3] not in _EOL:
            return n
    elif buf.endswith(b"\r\n\r\n") and (n == 4 or buf[n - 5] not in _EOL):
        return n
    p = max(buf.rfind(b"\n\n"), buf.rfind(b"\r\r"), buf.rfind(b"\r\n\r\n"))
    if p < 0:
        return 0
    start, end = p, p + 2
    while start and buf[start - 1] in _EOL:
        start -= 1
    while end < n and buf[end] in _EOL:
        end += 1
    last = 0
    for m in _BOUNDARY.finditer(buf, start, end):
        last = m.end()
    return last


def event_ends(block: bytes) -> list[int]:
    """The end offset of every event in a block of whole events (a trailing rest counts as one)."""
    if b"\r" not in block:
        boundary = _LF
    elif b"\n\n" not in block:
        boundary = _CRLF if b"\r\r" not in block else _CR if b"\n" not in block else _BOUNDARY
    else:
        boundary = _BOUNDARY
    ends = [m.end() for m in boundary.finditer(block)]
    if not ends or ends[-1] < len(block):
        ends.append(len(block))
    return ends


def event_at(ends: list[int], pos: int) -> tuple[int, int]:
    """(start, end) of the event holding offset `pos`, given its block's `event_ends`."""
    i = bisect_right(ends, pos)
    return (ends[i - 1] if i else 0), ends[i]


def events_of(block: bytes) -> list[SSEEvent]:
    """The events of a block of whole events (a trailing rest, as a stream's last, counts as one)."""
    start = 0
    events: list[SSEEvent] = []
    for end in event_ends(block):
        events.append(parse_event(block[start:end]))
        start = end
    return events


class SSESplitter:
    """Feed it chunks as they arrive; it returns the events completed so far."""

    __slots__ = ("_buf", "max_event_bytes")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
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
