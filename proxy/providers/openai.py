"""OpenAI and OpenAI-compatible servers (vLLM, Ollama, Groq, Mistral, DeepSeek): paths, usage, SSE.

Streams: the proxy asks for `stream_options.include_usage` and, when the client had not, removes
the usage-only chunk and the `"usage":null` fields it causes, so the client sees what it asked for.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from multidict import CIMultiDict, MultiMapping

from ..errors import ProxyError
from ..records import ApiKind, Usage
from .base import Adapter, Call, StreamTap, openai_usage
from .sse import SSEEvent

# Usage present (not null) anywhere in a chunk: top level, or Groq's x_groq.usage.
_HAS_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null')
# Chat events to look at one by one: usage that is not null, and errors. Every other event is
# relayed as it came (or, when stripping, with its compact `,"usage":null` removed, which is all
# `on_event` would do to it; [DONE] is relayed untouched). The lookaheads stay on one line: an
# SSE data line never spans two.
_CHAT_MARKS = (re.compile(rb'"usage"(?![ \t]*:[ \t]*null)'), b'"error"')
_CHAT_STRIP_MARKS = (re.compile(rb'"usage"(?:(?<!,"usage")|(?!:null))'), b'"error"', b"[DONE]")
_RESPONSES_MARKS = (re.compile(rb"response\.(?:completed|incomplete|failed)"), re.compile(rb"event: ?error"))
_RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_RESPONSES_TEXT = frozenset(
    {"response.output_text.delta", "response.function_call_arguments.delta", "response.refusal.delta"}
)

_SUFFIX_KINDS = (
    ("/chat/completions", ApiKind.CHAT),
    ("/completions", ApiKind.COMPLETIONS),
    ("/embeddings", ApiKind.EMBEDDINGS),
    ("/responses", ApiKind.RESPONSES),
)


_KIND_SUFFIX = {kind: suffix for suffix, kind in _SUFFIX_KINDS}


def openai_kind(method: str, path: str) -> ApiKind:
    if method != "POST":
        return ApiKind.OTHER
    for suffix, kind in _SUFFIX_KINDS:
        if path.endswith(suffix):
            return kind
    return ApiKind.OTHER


class ChatTap(StreamTap):
    """Chat and legacy completions streams: usage arrives in a chunk of its own (or in every one).

    Servers that repeat cumulative usage on every chunk (vLLM, Groq's x_groq) are not parsed per
    chunk: the last such chunk is kept and read once, at the end.
    """

    __slots__ = ("strip", "model", "_last_usage")

    def __init__(self, strip: bool) -> None:
        super().__init__()
        self.strip = strip
        self.model: str | None = None
        self._last_usage: bytes | None = None
        self.marks = _CHAT_STRIP_MARKS if strip else _CHAT_MARKS

    def pass_block(self, block: bytes) -> bytes:
        self.keep_text(block)
        # No mark: every "usage" here is the compact `,"usage":null`, so one replace is exact.
        return block.replace(b',"usage":null', b"") if self.strip else block

    def is_text(self, ev: SSEEvent) -> bool:
        return ev.data[:6] != b"[DONE]"

    def on_event(self, ev: SSEEvent) -> bytes | None:
        data = ev.data
        if data[:6] == b"[DONE]":
            return ev.raw
        if _HAS_USAGE.search(data):
            if _EMPTY_CHOICES.search(data):
                usage = _chunk_usage(data)
                if usage is not None:  # the usage-only chunk: final, once per stream
                    self.usage = usage
                    self._last_usage = None
                    self.output_usage_final()
                    return None if self.strip else ev.raw
            # Cumulative usage riding on a content chunk: it counts this chunk's text too.
            self.keep_text(ev.raw)
            self._last_usage = data
            self.usage_covers_kept_text()
            return ev.raw
        if b'"error"' in data[:16]:
            self.error = data.decode("utf-8", "replace")
        self.keep_text(ev.raw)
        # Without the client's include_usage, chunks would carry no `"usage":null`.
        if not self.strip:
            return ev.raw
        raw = ev.raw
        if b',"usage":null' in raw:  # the compact form every OpenAI chunk uses: no regex needed
            return raw.replace(b',"usage":null', b"")
        return _USAGE_NULL.sub(b"", raw) if b'"usage"' in raw else raw

    def finish(self) -> None:
        if self._last_usage is not None and self.usage is None:
            self.usage = _chunk_usage(self._last_usage)
            if self.usage is None:
                self.usage_covers_kept_text(False)  # unreadable after all: count all the text
        self._last_usage = None

    def collect_text(self, obj: Any, out: list[str]) -> None:
        if not isinstance(obj, dict):
            return
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            text = choice.get("text")  # legacy completions
            if isinstance(text, str):
                out.append(text)
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            for field in ("content", "refusal", "reasoning_content"):
                v = delta.get(field)
                if isinstance(v, str):
                    out.append(v)
            for call in delta.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    out.extend(v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str))


def _chunk_usage(data: bytes) -> Usage | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if u is None and isinstance(obj.get("x_groq"), dict):
        u = obj["x_groq"].get("usage")
    model = obj.get("model")
    return openai_usage(u, model if isinstance(model, str) else None)


class ResponsesTap(StreamTap):
    """Responses API streams: usage is on the terminal response.* event."""

    MARKS = _RESPONSES_MARKS

    def is_text(self, ev: SSEEvent) -> bool:
        return ev.event in _RESPONSES_TEXT

    def on_event(self, ev: SSEEvent) -> bytes | None:
        name = ev.event
        if name in _RESPONSES_TEXT:
            self.keep_text(ev.raw)
        elif name in _RESPONSES_TERMINAL or (not name and b'"response.completed"' in ev.data[:64]):
            try:
                obj = orjson.loads(ev.data)
            except orjson.JSONDecodeError:
                return ev.raw
            resp = obj.get("response") if isinstance(obj, dict) else None
            if isinstance(resp, dict):
                usage = openai_usage(resp.get("usage"), resp.get("model"))
                if usage is not None:
                    self.usage = usage
                    self.output_usage_final()
                if name == "response.failed":
                    self.error = "response.failed"
        elif name == "error":
            self.error = ev.data.decode("utf-8", "replace")
        return ev.raw

    def collect_text(self, obj: Any, out: list[str]) -> None:
        if isinstance(obj, dict) and isinstance(obj.get("delta"), str):
            out.append(obj["delta"])


class OpenAIAdapter(Adapter):
    family = "openai"

    def classify(self, method: str, path: str, query: MultiMapping[str]) -> tuple[ApiKind, str | None, bool]:
        if path.endswith("/responses/input_tokens"):
            return ApiKind.OTHER, None, False
        return openai_kind(method, path), None, False

    def native_path(self, call: Call, model: str | None) -> str | None:
        suffix = _KIND_SUFFIX.get(call.kind)
        return f"/v1{suffix}" if suffix else None

    def set_auth(self, headers: CIMultiDict[str]) -> None:
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"

    def prepare_body(self, call: Call, body: dict[str, Any]) -> tuple[bool, bool]:
        if not call.stream or call.kind not in (ApiKind.CHAT, ApiKind.COMPLETIONS):
            return False, False
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            return False, False
        body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
        return True, True

    def choices(self, call: Call, body: Mapping[str, Any]) -> int:
        n = body.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 128 else 1

    def max_output_tokens(self, call: Call, body: Mapping[str, Any]) -> int | None:
        names = ("max_output_tokens",) if call.kind == ApiKind.RESPONSES else ("max_completion_tokens", "max_tokens")
        for name in names:
            v = body.get(name)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return None

    def set_max_output_tokens(self, call: Call, body: dict[str, Any], value: int) -> None:
        if call.kind == ApiKind.RESPONSES:
            body["max_output_tokens"] = value
        elif "max_tokens" in body and "max_completion_tokens" not in body:
            body["max_tokens"] = value
        else:
            body["max_completion_tokens"] = value

    def usage_from_body(self, call: Call, obj: Any) -> Usage | None:
        if not isinstance(obj, dict):
            return None
        usage = openai_usage(obj.get("usage"), obj.get("model") if isinstance(obj.get("model"), str) else None)
        if usage is None and isinstance(obj.get("x_groq"), dict):
            usage = openai_usage(obj["x_groq"].get("usage"), None)
        return usage

    def text_from_body(self, call: Call, obj: Any) -> str:
        out: list[str] = []
        if not isinstance(obj, dict):
            return ""
        for item in obj.get("output") or ():  # Responses API
            for part in (item.get("content") or ()) if isinstance(item, dict) else ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(part["text"])
            if isinstance(item, dict) and isinstance(item.get("arguments"), str):
                out.append(item["arguments"])
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("text"), str):
                out.append(choice["text"])
            msg = choice.get("message")
            if isinstance(msg, dict):
                if isinstance(msg.get("content"), str):
                    out.append(msg["content"])
                for tc in msg.get("tool_calls") or ():
                    fn = tc.get("function") if isinstance(tc, dict) else None
                    if isinstance(fn, dict):
                        out.extend(v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str))
        return "".join(out)

    def new_tap(self, call: Call, strip_usage: bool) -> StreamTap:
        if call.kind == ApiKind.RESPONSES:
            return ResponsesTap()
        return ChatTap(strip_usage)

    def error_body(self, err: ProxyError) -> bytes:
        return orjson.dumps(
            {"error": {"message": err.message, "type": err.openai_type, "param": None, "code": err.code}}
        )

    def stream_error_event(self, call: Call, err: ProxyError) -> bytes:
        if call.kind == ApiKind.RESPONSES:
            event = {"type": "error", "code": err.code, "message": err.message, "param": None}
            return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"
        return b"data: " + self.error_body(err) + b"\n\ndata: [DONE]\n\n"
