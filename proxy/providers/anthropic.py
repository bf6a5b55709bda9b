"""Anthropic Messages: `x-api-key`, message_start / message_delta usage (cumulative: assign), errors.

`anthropic-version` and `anthropic-beta` headers pass through from the client unchanged.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from multidict import CIMultiDict, MultiMapping

from ..errors import ProxyError
from ..records import ApiKind, TokenCounts, Usage
from .base import Adapter, Call, StreamTap, as_int
from .sse import SSEEvent

# Events named message_start/_delta/_stop or error carry usage or end the stream: looked at one by
# one. The others are relayed as they came (content_block_delta's are kept for a fallback count).
_MARKS = (re.compile(rb"event: ?(?:message_|error)"),)


def anthropic_usage(u: Any, model: str | None, prior: Usage | None = None) -> Usage | None:
    """Anthropic usage; with `prior`, non-null fields of a later event overwrite it (never add)."""
    if not isinstance(u, Mapping):
        return prior
    base = prior.tokens if prior else TokenCounts()

    def pick(field: str, old: int) -> int:
        v = u.get(field)
        return as_int(v) if v is not None else old

    tokens = TokenCounts(
        input=pick("input_tokens", base.input),
        cache_write=pick("cache_creation_input_tokens", base.cache_write),
        cached_input=pick("cache_read_input_tokens", base.cached_input),
        output=pick("output_tokens", base.output),
    )
    return Usage(tokens, model=model or (prior.model if prior else None))


class MessagesTap(StreamTap):
    __slots__ = ("_final",)

    MARKS = _MARKS

    def __init__(self) -> None:
        super().__init__()
        self._final = False

    def on_event(self, ev: SSEEvent) -> bytes | None:
        name = ev.event
        if name == "content_block_delta":
            self.keep_text(ev.raw)
        elif name in ("message_start", "message_delta"):
            try:
                obj = orjson.loads(ev.data)
            except orjson.JSONDecodeError:
                return ev.raw
            if not isinstance(obj, dict):
                return ev.raw
            if name == "message_start":
                msg = obj.get("message")
                if isinstance(msg, dict):
                    self.usage = anthropic_usage(msg.get("usage"), msg.get("model"), self.usage)
            elif isinstance(obj.get("usage"), Mapping):
                # Cumulative: the final output count (and, on newer APIs, input and cache counts).
                self.usage = anthropic_usage(obj["usage"], None, self.usage)
                self._final = True
        elif name == "message_stop" and self._final:
            self.output_usage_final()
        elif name == "error":
            self.error = ev.data.decode("utf-8", "replace")
        return ev.raw

    def is_text(self, ev: SSEEvent) -> bool:
        return ev.event == "content_block_delta"

    def collect_text(self, obj: Any, out: list[str]) -> None:
        delta = obj.get("delta") if isinstance(obj, dict) else None
        if isinstance(delta, dict):
            for field in ("text", "partial_json", "thinking"):
                v = delta.get(field)
                if isinstance(v, str):
                    out.append(v)


class AnthropicAdapter(Adapter):
    family = "anthropic"

    def classify(self, method: str, path: str, query: MultiMapping[str]) -> tuple[ApiKind, str | None, bool]:
        if method == "POST" and path.endswith("/messages/count_tokens"):
            return ApiKind.COUNT_TOKENS, None, False
        if method == "POST" and path.endswith("/messages"):
            return ApiKind.MESSAGES, None, False
        return ApiKind.OTHER, None, False

    def set_auth(self, headers: CIMultiDict[str]) -> None:
        if self.config.api_key:
            headers["x-api-key"] = self.config.api_key
        headers.setdefault("anthropic-version", "2023-06-01")

    def max_output_tokens(self, call: Call, body: Mapping[str, Any]) -> int | None:
        v = body.get("max_tokens")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def set_max_output_tokens(self, call: Call, body: dict[str, Any], value: int) -> None:
        body["max_tokens"] = value

    def usage_from_body(self, call: Call, obj: Any) -> Usage | None:
        if not isinstance(obj, dict):
            return None
        if call.kind == ApiKind.COUNT_TOKENS:
            return Usage(TokenCounts())  # counting is free; nothing billed
        model = obj.get("model") if isinstance(obj.get("model"), str) else None
        return anthropic_usage(obj.get("usage"), model)

    def new_tap(self, call: Call, strip_usage: bool) -> StreamTap:
        return MessagesTap()

    def text_from_body(self, call: Call, obj: Any) -> str:
        out: list[str] = []
        for block in (obj.get("content") or ()) if isinstance(obj, dict) else ():
            if not isinstance(block, dict):
                continue
            for field in ("text", "thinking"):
                if isinstance(block.get(field), str):
                    out.append(block[field])
            if block.get("type") == "tool_use":
                out.append(orjson.dumps(block.get("input")).decode())
        return "".join(out)

    def error_body(self, err: ProxyError) -> bytes:
        return orjson.dumps({"type": "error", "error": {"type": err.anthropic_type, "message": err.message}})

    def stream_error_event(self, call: Call, err: ProxyError) -> bytes:
        return b"event: error\ndata: " + self.error_body(err) + b"\n\n"
