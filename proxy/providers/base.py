"""What every provider adapter provides: the seam where all provider differences live.

An adapter knows its upstream URL, how to set the real key, which API a path is, where usage sits
in a body or a stream, and the provider's error body shape. Pure logic: no I/O.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

import orjson
from aiohttp import ClientTimeout
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from ..config import ProviderConfig
from ..errors import ProxyError
from ..records import ApiKind, CountSource, TokenCounts, Usage
from .sse import MAX_EVENT_BYTES, SSEEvent, event_at, event_ends, events_of, whole_end

# Where SDKs send keys: stripped from every upstream request (the adapter sets the real one).
CLIENT_KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")


@dataclass(frozen=True, slots=True)
class Call:
    """What one request is, as far as metering cares."""

    kind: ApiKind
    path: str  # path sent upstream (after /{provider})
    model: str | None  # from the body, or the URL (Gemini model, Azure deployment)
    stream: bool


def as_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


Marks: TypeAlias = tuple[re.Pattern[bytes] | bytes, ...]


def _next_mark(marks: Marks, block: bytes, pos: int) -> int:
    """Offset of the first mark in `block` at or after `pos`; -1 when there is none."""
    first = -1
    for mark in marks:
        if isinstance(mark, bytes):
            at = block.find(mark, pos)
        else:
            m = mark.search(block, pos)
            at = m.start() if m is not None else -1
        if at >= 0 and (first < 0 or at < first):
            first = at
    return first


class StreamTap:
    """Watches a stream for metering; may ask to drop or rewrite an event.

    `feed` takes the upstream's chunks and returns the bytes to relay: whole events only (a
    partial one waits for its end). Events that can matter to metering are found by a search of
    the bytes for `marks` and go through `on_event` one by one; runs of events between them go
    through `pass_block` as they came, with no per-event work. Taps keep the raw bytes of what may
    carry text and parse them only at the end if the provider never reported usage, so there is
    no per-chunk JSON parsing or tokenizing.
    """

    __slots__ = ("usage", "_text_events", "_keep_text", "error", "kept_bytes", "_covered", "marks", "_carry")

    # What occurs in every event that `on_event` would do more with than keep its text and relay
    # it (a superset is fine: a false match only costs that event a parse); None: every event.
    # Literal bytes, or patterns that start with a literal: each is one fast scan of a chunk.
    MARKS: ClassVar[Marks | None] = None

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self._text_events: list[bytes] = []  # raw bytes of whole events (one or more per item)
        self._keep_text = True
        self.kept_bytes = 0
        self.error: str | None = None  # an error event the upstream sent mid-stream
        # Kept items already counted by a cumulative `usage` (servers that report usage on every
        # chunk): None when the usage seen so far does not cover the text that came with it.
        self._covered: int | None = None
        self.marks = self.MARKS
        self._carry = b""

    # -- the stream as chunks -----------------------------------------
    def feed(self, chunk: bytes) -> bytes:
        """One upstream chunk in; the bytes to relay now (the events it completed) out."""
        buf = self._carry + chunk if self._carry else chunk
        end = whole_end(buf)
        if end == len(buf):
            self._carry = b""
        elif len(buf) - end > MAX_EVENT_BYTES:
            # A misbehaving upstream that never ends an event: pass it on as one, memory stays bounded.
            self._carry = b""
        else:
            self._carry = buf[end:]
            if not end:
                return b""
            buf = buf[:end]
        return self.on_block(buf)

    def flush(self) -> bytes:
        """The stream ended: whatever is left (an event without its blank line)."""
        rest, self._carry = self._carry, b""
        return self.on_block(rest) if rest.strip() else b""

    def on_block(self, block: bytes) -> bytes:
        """Whole events in, the bytes to relay out: marked events one by one, the rest as a run."""
        marks = self.marks
        if marks is None:
            return self.on_events(block)
        at = _next_mark(marks, block, 0)
        if at < 0:
            return self.pass_block(block)
        ends = event_ends(block)
        out: list[bytes] = []
        pos = 0
        while at >= 0:
            start, end = event_at(ends, at)
            if start > pos:
                out.append(self.pass_block(block[pos:start]))
            out.append(self.on_events(block[start:end]))
            pos = end
            at = _next_mark(marks, block, end) if end < len(block) else -1
        if pos < len(block):
            out.append(self.pass_block(block[pos:]))
        return b"".join(out)

    def on_events(self, block: bytes) -> bytes:
        """Whole events through `on_event` one by one (the exact path)."""
        return b"".join([b for b in map(self.on_event, events_of(block)) if b])

    def pass_block(self, block: bytes) -> bytes:
        """Whole events none of which `marks` matched: keep them for a text count, relay as they are."""
        self.keep_text(block)
        return block

    # -- one event ----------------------------------------------------
    def on_event(self, ev: SSEEvent) -> bytes | None:
        """Inspect one event; return the bytes to relay (usually `ev.raw`), or None to drop it."""
        raise NotImplementedError

    def is_text(self, ev: SSEEvent) -> bool:
        """Whether a kept event is one `on_event` keeps for its text (runs also hold others)."""
        return True

    def finish(self) -> None:
        """The stream ended (cleanly or not): work out anything deferred."""

    @property
    def output_final(self) -> bool:
        """True once the provider has reported the final output count."""
        return not self._keep_text

    def keep_text(self, raw: bytes) -> None:
        """Keep whole events' raw bytes, to count their text if usage never comes."""
        if self._keep_text:
            self._text_events.append(raw)
            self.kept_bytes += len(raw)

    def output_usage_final(self) -> None:
        """Usage is known for good: stop holding text for a fallback count."""
        self._keep_text = False
        self._text_events.clear()
        self._covered = None

    def usage_covers_kept_text(self, covers: bool = True) -> None:
        """The cumulative usage just seen counts every text event kept so far (or, with False, not)."""
        self._covered = len(self._text_events) if covers else None

    @property
    def text_beyond_usage(self) -> bool:
        """True when `unreported_text` is output on top of `usage` (add), not all of it (max)."""
        return self._covered is not None and self.usage is not None

    def output_text(self) -> str:
        return self._text_of(self._text_events)

    def unreported_text(self) -> str:
        """Text that no usage seen so far accounts for (all of it, unless usage is cumulative)."""
        return self._text_of(self._text_events[self._covered or 0 :])

    def _text_of(self, items: list[bytes]) -> str:
        parts: list[str] = []
        for raw in items:
            for ev in events_of(raw):
                if not self.is_text(ev):
                    continue
                try:
                    obj = orjson.loads(ev.data)
                except orjson.JSONDecodeError:
                    continue
                self.collect_text(obj, parts)
        return "".join(parts)

    def collect_text(self, obj: Any, out: list[str]) -> None:
        raise NotImplementedError


class Adapter:
    """Base class; one instance per configured provider."""

    family = "openai"  # error body shape: openai | anthropic | gemini

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.config = config
        self.base_url = config.base_url
        self.base = URL(config.base_url)
        self.url_cache: dict[str, URL] = {}  # routed path -> upstream URL (forwarding fills it)
        t = config.timeouts
        # Streams get an idle (per-read) timeout, never a total one: a long generation is not a hung one.
        self.stream_timeout = ClientTimeout(total=None, sock_connect=t.connect, sock_read=t.idle)
        self.body_timeout = ClientTimeout(total=t.read, sock_connect=t.connect)

    # -- request side -------------------------------------------------
    def classify(self, method: str, path: str, query: MultiMapping[str]) -> tuple[ApiKind, str | None, bool]:
        """(kind, model named by the URL, stream named by the URL) for an upstream path."""
        raise NotImplementedError

    def call(self, method: str, path: str, query: MultiMapping[str], body: Mapping[str, Any] | None) -> Call:
        kind, url_model, url_stream = self.classify(method, path, query)
        model = url_model
        if model is None and body is not None:
            m = body.get("model")
            model = m if isinstance(m, str) else None
        stream = url_stream or bool(body is not None and body.get("stream") is True)
        return Call(kind, path, model, stream)

    def pricing_model(self, model: str | None) -> str:
        """The name prices and encodings are looked up by (Azure maps deployments)."""
        return model or "unknown"

    def native_path(self, call: Call, model: str | None) -> str | None:
        """This provider's own path for a call routed elsewhere first (fallbacks across types)."""
        return None

    def prepare_body(self, call: Call, body: dict[str, Any]) -> tuple[bool, bool]:
        """Adjust the body before forwarding. Returns (changed, strip_usage_chunk)."""
        return False, False

    def upstream_query(self, query: MultiMapping[str]) -> list[tuple[str, str]]:
        return [(k, v) for k, v in query.items() if k != "key"]

    def set_auth(self, headers: CIMultiDict[str]) -> None:
        raise NotImplementedError

    def max_output_tokens(self, call: Call, body: Mapping[str, Any]) -> int | None:
        raise NotImplementedError

    def set_max_output_tokens(self, call: Call, body: dict[str, Any], value: int) -> None:
        raise NotImplementedError

    # -- response side ------------------------------------------------
    def usage_from_body(self, call: Call, obj: Any) -> Usage | None:
        raise NotImplementedError

    def new_tap(self, call: Call, strip_usage: bool) -> StreamTap:
        raise NotImplementedError

    def text_from_body(self, call: Call, obj: Any) -> str:
        """Generated text of a non-streamed answer, for a fallback count when usage is missing."""
        raise NotImplementedError

    def error_body(self, err: ProxyError) -> bytes:
        raise NotImplementedError

    def stream_error_event(self, call: Call, err: ProxyError) -> bytes:
        """A final event telling a streaming client why its stream ended early."""
        raise NotImplementedError

    def choices(self, call: Call, body: Mapping[str, Any]) -> int:
        """How many completions the request asks for (output is reserved for each)."""
        return 1


def openai_usage(u: Mapping[str, Any] | None, model: str | None) -> Usage | None:
    """OpenAI-style usage objects: chat/completions/embeddings and the Responses API."""
    if not isinstance(u, Mapping):
        return None
    if "input_tokens" in u:  # Responses API
        prompt = as_int(u.get("input_tokens"))
        output = as_int(u.get("output_tokens"))
        pdet = u.get("input_tokens_details") or {}
        cdet = u.get("output_tokens_details") or {}
    else:
        prompt = as_int(u.get("prompt_tokens"))
        output = as_int(u.get("completion_tokens"))
        pdet = u.get("prompt_tokens_details") or {}
        cdet = u.get("completion_tokens_details") or {}
    if not isinstance(pdet, Mapping):
        pdet = {}
    if not isinstance(cdet, Mapping):
        cdet = {}
    cached = as_int(pdet.get("cached_tokens")) or as_int(u.get("prompt_cache_hit_tokens"))  # DeepSeek
    cached = min(cached, prompt)
    reasoning = min(as_int(cdet.get("reasoning_tokens")), output)
    # positional (input, cached_input, cache_write, output, reasoning): keywords cost 3x as much
    tokens = TokenCounts(prompt - cached, cached, 0, output, reasoning)
    return Usage(tokens, CountSource.PROVIDER, CountSource.PROVIDER, model)
