"""Stream taps on whole chunks: `feed` (runs of events passed on as they came, marked events one by
one) relays the same bytes and meters the same as splitting every event and calling `on_event`,
over any chunking, line endings, and malformed or adversarial streams.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.providers.anthropic import MessagesTap
from proxy.providers.base import StreamTap, _next_mark
from proxy.providers.gemini import GenerateTap
from proxy.providers.openai import ChatTap, ResponsesTap
from proxy.providers.sse import SSESplitter, whole_end

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def _ev(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + b"data: " + body.encode() + b"\n\n"


_CHAT = {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi \"usage\" error"}}]}
# Whole events and the pieces they are made of: the generator glues these in any order, so
# streams are sometimes well formed and often not, with markers in and across every place.
JUNK: list[bytes] = [
    b": keep-alive comment\n\n", b": \"usageMetadata\" in a comment\n",
    b"data: ", b"data:", b"event: ", b"event:", b"\n", b"\r\n", b"\r", b"\n\n", b"\r\r", b"\r\n\r\n",
    b'"usage"', b',"usage":null', b":null", b":{", b'"error"', b"[DONE]", b"message_", b"error",
    b'"usageMetadata"', b"response.completed", b"{", b"}", b",", b" ", b"x",
]
CHAT_EVENTS: list[bytes] = [
    _ev({**_CHAT, "usage": None}),
    _ev(_CHAT),
    _ev({**_CHAT, "usage": {"prompt_tokens": 3, "completion_tokens": 2}}),
    _ev({"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}),
    _ev({"id": "c", "choices": [], "usage": None}),
    _ev({"error": {"message": "boom"}}),
    b"data: [DONE]\n\n",
    b'data: [DONE]\n,"usage":null\n\n',  # [DONE] goes out as it came, even when stripping
    b'data: {"choices":[{"delta":{"content":"a"}}], "usage": null}\r\n\r\n',
    b'data: {"choices":[{"delta":{"content":"b"}}], "usage":null}\n\n',
    # a data field on two lines, "usage" at the end of the first (a comment line in between)
    b'data: {"choices":[{"delta":{"content":"c"}}],"usage"\n:null\ndata: :{"prompt_tokens":1,"completion_tokens":2}}\n\n',
]
MESSAGES_EVENTS: list[bytes] = [
    _ev({"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1}}}, "message_start"),
    _ev({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "yo"}}, "content_block_delta"),
    _ev({"type": "content_block_start", "content_block": {"type": "text", "text": "no"}}, "content_block_start"),
    _ev({"type": "message_delta", "usage": {"output_tokens": 5}}, "message_delta"),
    _ev({"type": "message_stop"}, "message_stop"),
    _ev({"type": "error", "error": {"message": "overloaded"}}, "error"),
    b"event:error\ndata: {}\n\n",
    b"event: ping\ndata: {}\n\n",
]
GEMINI_EVENTS: list[bytes] = [
    _ev({"candidates": [{"content": {"parts": [{"text": "g"}]}}],
         "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": 3}}),
    _ev({"candidates": [{"content": {"parts": [{"text": "h"}]}}]}).replace(b"\n", b"\r\n"),
    _ev({"error": {"code": 500, "message": "x"}}),
]
RESPONSES_EVENTS: list[bytes] = [
    _ev({"delta": "r"}, "response.output_text.delta"),
    *(_ev({"type": name, "response": {"usage": {"input_tokens": 2, "output_tokens": 7}}}, name)
      for name in ("response.completed", "response.incomplete", "response.failed")),
    _ev({"type": "response.completed", "response": {"usage": {"input_tokens": 1, "output_tokens": 2}}}),
    _ev({"type": "error", "message": "x"}, "error"),
]


def _crlf(events: list[bytes]) -> list[bytes]:
    """The events as sent, and with CRLF line endings."""
    return events + [e.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for e in events]


TAPS: dict[str, tuple[Callable[[], StreamTap], list[bytes]]] = {
    "chat-strip": (lambda: ChatTap(True), _crlf(CHAT_EVENTS)),
    "chat": (lambda: ChatTap(False), _crlf(CHAT_EVENTS)),
    "responses": (ResponsesTap, _crlf(RESPONSES_EVENTS)),
    "messages": (MessagesTap, _crlf(MESSAGES_EVENTS)),
    "gemini": (GenerateTap, _crlf(GEMINI_EVENTS)),
}


def _by_events(tap: StreamTap, chunks: list[bytes]) -> tuple[list[bytes], list[tuple[Any, ...]]]:
    """The reference: every event split out and passed to `on_event`."""
    splitter = SSESplitter()
    sent, states = [], []
    for chunk in chunks:
        sent.append(b"".join(b for b in map(tap.on_event, splitter.feed(chunk)) if b))
        states.append(_midway(tap))
    sent.append(b"".join(b for b in map(tap.on_event, splitter.flush()) if b))
    return sent, states


def _by_chunks(tap: StreamTap, chunks: list[bytes]) -> tuple[list[bytes], list[tuple[Any, ...]]]:
    sent, states = [], []
    for chunk in chunks:
        sent.append(tap.feed(chunk))
        states.append(_midway(tap))
    sent.append(tap.flush())
    return sent, states


def _midway(tap: StreamTap) -> tuple[Any, ...]:
    """What the overrun check reads between chunks."""
    return tap.usage, tap.output_final, tap.output_text(), tap.error


def _final(tap: StreamTap) -> tuple[Any, ...]:
    tap.finish()
    return (tap.usage, tap.output_final, tap.error, tap.output_text(), tap.unreported_text(),
            tap.text_beyond_usage)


def _chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@pytest.mark.parametrize("name", sorted(TAPS))
def test_chunks_meter_and_relay_like_events(name: str) -> None:
    new_tap, events = TAPS[name]

    @SETTINGS
    @given(pieces=st.lists(st.sampled_from(events) | st.sampled_from(JUNK), max_size=40),
           cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
    def check(pieces: list[bytes], cuts: list[int]) -> None:
        chunks = _chunked(b"".join(pieces), cuts)
        exact, fast = new_tap(), new_tap()
        assert _by_chunks(fast, chunks) == _by_events(exact, chunks)
        assert _final(fast) == _final(exact)

    check()


@SETTINGS
@given(data=st.binary(max_size=64) | st.lists(st.sampled_from([b"\n", b"\r", b"a", b":"]), max_size=24).map(b"".join))
def test_whole_end_cuts_where_the_splitter_does(data: bytes) -> None:
    splitter = SSESplitter()
    splitter.feed(data)
    assert whole_end(data) == len(data) - len(splitter.pending)


def _stream(*events: bytes) -> bytes:
    return b"".join(events)


def test_usage_chunk_split_across_reads_is_still_dropped() -> None:
    """The client did not ask for usage: the usage-only chunk goes, `"usage":null` goes, wherever
    the reads cut, and the usage is metered."""
    stream = _stream(*(_ev({**_CHAT, "usage": None}) for _ in range(3)),
                     _ev({"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}}),
                     b"data: [DONE]\n\n")
    for cut in range(1, len(stream)):
        tap = ChatTap(strip=True)
        sent = tap.feed(stream[:cut]) + tap.feed(stream[cut:]) + tap.flush()
        tap.finish()
        assert sent == _stream(*(_ev(_CHAT) for _ in range(3)), b"data: [DONE]\n\n")
        assert tap.usage is not None and tap.usage.tokens.output == 7 and tap.output_final


@pytest.mark.parametrize("name", sorted(TAPS))
def test_one_read_with_everything_passes_bytes_through(name: str) -> None:
    """The common case: nothing to change, the chunk is relayed as the very same bytes object."""
    chunk = _stream(_ev(_CHAT), _ev(_CHAT))
    assert TAPS[name][0]().feed(chunk) is chunk


def test_runs_without_marks_are_kept_whole_and_parsed_only_when_asked() -> None:
    tap = MessagesTap()
    deltas = _stream(*(_ev({"type": "content_block_delta", "delta": {"type": "text_delta", "text": t}},
                           "content_block_delta") for t in "abc"))
    tap.feed(_ev({"type": "message_start", "message": {"usage": {"input_tokens": 3}}}, "message_start")
             + deltas + b"event: ping\ndata: {}\n\n")
    assert tap.output_text() == "abc" and not tap.output_final
    tap.feed(_ev({"type": "message_delta", "usage": {"output_tokens": 3}}, "message_delta")
             + _ev({"type": "message_stop"}, "message_stop"))
    assert tap.output_final and tap.output_text() == "" and tap.kept_bytes > 0


def test_gemini_reads_only_the_last_usage_of_a_run() -> None:
    def gem(text: str, usage: int | None) -> bytes:
        obj: dict[str, Any] = {"candidates": [{"content": {"parts": [{"text": text}]}}]}
        if usage is not None:
            obj["usageMetadata"] = {"promptTokenCount": 1, "candidatesTokenCount": usage}
        return _ev(obj).replace(b"\n\n", b"\r\n\r\n")

    tap = GenerateTap()
    tap.feed(gem("a", 1) + gem("b", 2) + gem("c", None))
    tap.finish()
    assert tap.usage is not None and tap.usage.tokens.output == 2
    assert tap.text_beyond_usage and tap.unreported_text() == "c" and tap.output_text() == "abc"


def test_marks_cover_what_on_event_looks_at() -> None:
    """The chat marks find every usage that is not null (and, when stripping, not compact)."""
    def marked(tap: StreamTap, data: bytes) -> bool:
        assert tap.marks is not None
        return _next_mark(tap.marks, data, 0) >= 0

    chat, strip = ChatTap(False), ChatTap(True)
    for data in (b'"usage":{', b'"usage" :{', b'"usage"\t:\t{', b'"error"', b'"usage"\n:null'):
        assert marked(chat, data) and marked(strip, data)
    assert not marked(chat, b',"usage":null') and not marked(chat, b', "usage" : null')
    assert not marked(strip, b',"usage":null') and marked(strip, b', "usage":null')
    assert marked(strip, b'"usage":null') and marked(strip, b"data: [DONE]")
