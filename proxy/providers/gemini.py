"""Google Gemini (Generative Language API): `models/{m}:method` paths, `x-goog-api-key`, usageMetadata.

usageMetadata is cumulative on every stream chunk (keep the last); thoughts are extra output.
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
from .sse import SSEEvent, event_at, event_ends, parse_event

_MARKS = (b'"error"',)  # an error chunk: looked at on its own
_METHOD = re.compile(r"/models/([^/:]+):([A-Za-z]+)$")
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
           413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
           504: "DEADLINE_EXCEEDED"}


def gemini_usage(u: Any, model: str | None) -> Usage | None:
    if not isinstance(u, Mapping):
        return None
    prompt = as_int(u.get("promptTokenCount")) + as_int(u.get("toolUsePromptTokenCount"))
    cached = min(as_int(u.get("cachedContentTokenCount")), prompt)
    thoughts = as_int(u.get("thoughtsTokenCount"))
    output = as_int(u.get("candidatesTokenCount")) + thoughts
    return Usage(TokenCounts(input=prompt - cached, cached_input=cached, output=output, reasoning=thoughts), model=model)


class GenerateTap(StreamTap):
    """`alt=sse` streams: every chunk is a whole GenerateContentResponse."""

    __slots__ = ("_last_usage",)

    MARKS = _MARKS

    def __init__(self) -> None:
        super().__init__()
        self._last_usage: bytes | None = None

    def pass_block(self, block: bytes) -> bytes:
        # Usage is cumulative: only the run's last usageMetadata counts, the ones before it are
        # replaced by it. Its event is read on its own; the text before it is covered by it.
        at = block.rfind(b'"usageMetadata"')
        if at < 0:
            self.keep_text(block)
            return block
        start, end = event_at(event_ends(block), at)
        ev = parse_event(block[start:end])
        if b'"usageMetadata"' not in ev.data:  # the name outside its data (a comment): go one by one
            return self.on_events(block)
        self.keep_text(block[:end])
        self._last_usage = ev.data
        self.usage_covers_kept_text()
        if end < len(block):
            self.keep_text(block[end:])
        return block

    def on_event(self, ev: SSEEvent) -> bytes | None:
        if b'"error"' in ev.data[:16]:
            self.error = ev.data.decode("utf-8", "replace")
        self.keep_text(ev.raw)
        if b'"usageMetadata"' in ev.data:
            # Parsed once, at the end: it is cumulative, and counts this chunk's text too.
            self._last_usage = ev.data
            self.usage_covers_kept_text()
        return ev.raw

    def finish(self) -> None:
        if self._last_usage is not None:
            try:
                obj = orjson.loads(self._last_usage)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                self.usage = gemini_usage(obj.get("usageMetadata"), obj.get("modelVersion"))
        if self.usage is None:
            self.usage_covers_kept_text(False)  # unreadable after all: count all the text

    def collect_text(self, obj: Any, out: list[str]) -> None:
        if not isinstance(obj, dict):
            return
        for cand in obj.get("candidates") or ():
            content = cand.get("content") if isinstance(cand, dict) else None
            parts = content.get("parts") if isinstance(content, dict) else None
            for part in parts or ():
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(part["text"])


class GeminiAdapter(Adapter):
    family = "gemini"

    def classify(self, method: str, path: str, query: MultiMapping[str]) -> tuple[ApiKind, str | None, bool]:
        m = _METHOD.search(path)
        if method != "POST" or not m:
            return ApiKind.OTHER, None, False
        model, verb = m.group(1), m.group(2)
        if verb == "generateContent":
            return ApiKind.GENERATE, model, False
        if verb == "streamGenerateContent":
            return ApiKind.GENERATE, model, True
        if verb == "countTokens":
            return ApiKind.COUNT_TOKENS, model, False
        if verb in ("embedContent", "batchEmbedContents"):
            return ApiKind.EMBEDDINGS, model, False
        return ApiKind.OTHER, model, False

    def set_auth(self, headers: CIMultiDict[str]) -> None:
        if self.config.api_key:
            headers["x-goog-api-key"] = self.config.api_key

    def max_output_tokens(self, call: Call, body: Mapping[str, Any]) -> int | None:
        gen = body.get("generationConfig")
        v = gen.get("maxOutputTokens") if isinstance(gen, Mapping) else None
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def set_max_output_tokens(self, call: Call, body: dict[str, Any], value: int) -> None:
        gen = body.get("generationConfig")
        body["generationConfig"] = {**(gen if isinstance(gen, dict) else {}), "maxOutputTokens": value}

    def choices(self, call: Call, body: Mapping[str, Any]) -> int:
        gen = body.get("generationConfig")
        n = gen.get("candidateCount") if isinstance(gen, Mapping) else None
        return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 8 else 1

    def usage_from_body(self, call: Call, obj: Any) -> Usage | None:
        if call.kind == ApiKind.COUNT_TOKENS:
            return Usage(TokenCounts())
        if isinstance(obj, list):  # streamGenerateContent without alt=sse: a JSON array
            obj = next((o for o in reversed(obj) if isinstance(o, dict) and "usageMetadata" in o), None)
        if not isinstance(obj, dict):
            return None
        return gemini_usage(obj.get("usageMetadata"), obj.get("modelVersion"))

    def new_tap(self, call: Call, strip_usage: bool) -> StreamTap:
        return GenerateTap()

    def text_from_body(self, call: Call, obj: Any) -> str:
        out: list[str] = []
        for o in obj if isinstance(obj, list) else [obj]:
            GenerateTap().collect_text(o, out)
        return "".join(out)

    def error_body(self, err: ProxyError) -> bytes:
        status = _STATUS.get(err.status, "INTERNAL")
        return orjson.dumps({"error": {"code": err.status, "message": err.message, "status": status}})

    def stream_error_event(self, call: Call, err: ProxyError) -> bytes:
        return b"data: " + self.error_body(err) + b"\n\n"
