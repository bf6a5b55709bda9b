"""A fast fake OpenAI + Anthropic upstream for the benchmark: a bare asyncio Protocol speaking HTTP/1.1.

It owns only the wire shapes the proxy meters (chat completions and messages, plain and streamed,
with usage) and the knobs a benchmark needs (latency, stream length, chunk pacing). It is not a
general HTTP server: no pipelining beyond in-order replies, no TLS, no compression.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

try:
    import orjson

    _loads: Callable[[bytes], object] = orjson.loads
except ImportError:  # the fake must also run from a plain interpreter
    _loads = json.loads

_MAX_HEAD_BYTES = 64 * 1024
_MAX_CACHED_MODELS = 64


@dataclass(frozen=True)
class FakeSettings:
    latency_s: float
    chunk_interval_s: float
    stream_tokens: int
    completion_tokens: int
    prompt_tokens: int


@dataclass(frozen=True)
class Reply:
    """One precomputed reply: the head, and either a whole body or SSE events sent one by one."""

    head: bytes
    events: tuple[bytes, ...]  # already framed as HTTP chunks when streamed
    streamed: bool


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _head(status: str, content_type: str, length: int | None, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"content-type: {content_type}", "x-request-id: req_bench"]
    if length is None:
        lines += ["transfer-encoding: chunked", "cache-control: no-cache"]
    else:
        lines.append(f"content-length: {length}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _openai_body(s: FakeSettings, model: str) -> bytes:
    text = " ".join(["hello"] * s.completion_tokens)
    return _dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens,
                "total_tokens": s.prompt_tokens + s.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
            "system_fingerprint": "fp_bench",
        }
    )


def _openai_events(s: FakeSettings, model: str, include_usage: bool) -> list[bytes]:
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": model}
    tail: dict[str, object] = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, object], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + _dumps({**base, "choices": [choice], **tail}) + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": "hello "}, None) for _ in range(s.stream_tokens)]
    events.append(chunk({}, "stop"))
    if include_usage:
        usage = {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.stream_tokens,
            "total_tokens": s.prompt_tokens + s.stream_tokens,
        }
        events.append(b"data: " + _dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def _anthropic_body(s: FakeSettings, model: str) -> bytes:
    return _dumps(
        {
            "id": "msg_bench",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": " ".join(["hello"] * s.completion_tokens)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": s.prompt_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": s.completion_tokens,
            },
        }
    )


def _anthropic_events(s: FakeSettings, model: str) -> list[bytes]:
    def event(name: str, data: dict[str, object]) -> bytes:
        return b"event: " + name.encode() + b"\ndata: " + _dumps({"type": name, **data}) + b"\n\n"

    start_usage = {
        "input_tokens": s.prompt_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    message: dict[str, object] = {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": model,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    events = [
        event("message_start", {"message": message}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    ]
    delta = {"index": 0, "delta": {"type": "text_delta", "text": "hello "}}
    events += [event("content_block_delta", delta) for _ in range(s.stream_tokens)]
    events.append(event("content_block_stop", {"index": 0}))
    events.append(
        event(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": s.stream_tokens},
            },
        )
    )
    events.append(event("message_stop", {}))
    return events


class Replies:
    """Builds replies once per (route, model, stream, include_usage, close) and keeps them."""

    def __init__(self, settings: FakeSettings) -> None:
        self._s = settings
        self._cache: dict[tuple[str, str, bool, bool, bool], Reply] = {}

    def get(self, route: str, model: str, stream: bool, include_usage: bool, close: bool) -> Reply:
        key = (route, model, stream, include_usage, close)
        reply = self._cache.get(key)
        if reply is None:
            reply = self._build(*key)
            if len(self._cache) < _MAX_CACHED_MODELS * 8:  # bounded: models come from clients
                self._cache[key] = reply
        return reply

    def _build(self, route: str, model: str, stream: bool, include_usage: bool, close: bool) -> Reply:
        s = self._s
        if stream:
            if route == "openai":
                events = _openai_events(s, model, include_usage)
            else:
                events = _anthropic_events(s, model)
            framed = [_chunk(e) for e in events] + [b"0\r\n\r\n"]
            head = _head("200 OK", "text/event-stream; charset=utf-8", None, close)
            return Reply(head, tuple(framed), True)
        body = _openai_body(s, model) if route == "openai" else _anthropic_body(s, model)
        return Reply(_head("200 OK", "application/json", len(body), close), (body,), False)


def _simple(status: str, body: bytes, close: bool) -> Reply:
    return Reply(_head(status, "application/json", len(body), close), (body,), False)


def _dechunk(buf: bytearray) -> tuple[bytes, int] | None:
    """Decode a complete chunked body at the start of buf; None while incomplete."""
    out = bytearray()
    pos = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)  # trailers are ignored
            return (bytes(out), end + 4) if end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


class FakeProtocol(asyncio.Protocol):
    """One client connection: parse requests in order, answer each, keep the connection alive."""

    def __init__(self, settings: FakeSettings, replies: Replies) -> None:
        self._s = settings
        self._replies = replies
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._head: tuple[bytes, bytes, int, bool, bool] | None = None
        self._busy = False  # a delayed or paced reply is in flight; later requests wait for it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._drain()

    def _drain(self) -> None:
        while not self._busy and self._transport is not None:
            if self._head is None:
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > _MAX_HEAD_BYTES:
                        self._transport.close()
                    return
                self._head = self._parse_head(bytes(self._buf[:end]))
                del self._buf[: end + 4]
            method, path, length, chunked, close = self._head
            if chunked:
                got = _dechunk(self._buf)
                if got is None:
                    return
                body, used = got
            else:
                if len(self._buf) < length:
                    return
                body, used = bytes(self._buf[:length]), length
            del self._buf[:used]
            self._head = None
            self._answer(method, path, body, close)

    @staticmethod
    def _parse_head(head: bytes) -> tuple[bytes, bytes, int, bool, bool]:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        method, path = parts[0], parts[1] if len(parts) > 1 else b"/"
        length, chunked, close = 0, False, parts[-1] == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                v = value.strip().lower()
                close = v == b"close" or (close and v != b"keep-alive")
        return method, path, length, chunked, close

    def _route(self, method: bytes, path: bytes, body: bytes, close: bool) -> Reply:
        path = path.split(b"?", 1)[0]
        if method == b"GET" and path == b"/healthz":
            return _simple("200 OK", b'{"ok":true}', close)
        if method != b"POST" or path not in (b"/v1/chat/completions", b"/v1/messages"):
            return _simple("404 Not Found", b'{"error":{"message":"not found","type":"not_found"}}', close)
        try:
            req = _loads(body)
            assert isinstance(req, dict)
        except (ValueError, AssertionError):
            return _simple("400 Bad Request", b'{"error":{"message":"bad json","type":"invalid_request_error"}}', close)
        model = req.get("model")
        model = model if isinstance(model, str) else "unknown"
        stream = req.get("stream") is True
        opts = req.get("stream_options")
        include_usage = stream and isinstance(opts, dict) and opts.get("include_usage") is True
        route = "openai" if path == b"/v1/chat/completions" else "anthropic"
        return self._replies.get(route, model, stream, include_usage, close)

    def _answer(self, method: bytes, path: bytes, body: bytes, close: bool) -> None:
        reply = self._route(method, path, body, close)
        paced = reply.streamed and self._s.chunk_interval_s > 0
        if self._s.latency_s <= 0 and not paced:
            self._send(reply.head + b"".join(reply.events), close)
            return
        self._busy = True
        asyncio.get_running_loop().create_task(self._answer_later(reply, paced, close))

    async def _answer_later(self, reply: Reply, paced: bool, close: bool) -> None:
        if self._s.latency_s > 0:
            await asyncio.sleep(self._s.latency_s)
        if not paced:
            self._send(reply.head + b"".join(reply.events), close)
        else:
            self._send(reply.head + reply.events[0], False)
            for event in reply.events[1:]:
                await asyncio.sleep(self._s.chunk_interval_s)
                if self._transport is None:
                    return  # the client hung up mid-stream
                self._send(event, False)
            if close and self._transport is not None:
                self._transport.close()
        self._busy = False
        if self._buf:
            self._drain()

    def _send(self, data: bytes, close: bool) -> None:
        if self._transport is None:
            return
        self._transport.write(data)
        if close:
            self._transport.close()


async def serve(host: str, port: int, settings: FakeSettings) -> None:
    loop = asyncio.get_running_loop()
    replies = Replies(settings)
    server = await loop.create_server(
        lambda: FakeProtocol(settings, replies), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"fake upstream listening on http://{host}:{bound}", flush=True)
    async with server:
        await stop.wait()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9999)
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay before each reply's first byte")
    p.add_argument("--chunk-interval-ms", type=float, default=0.0, help="pause between stream events")
    p.add_argument("--stream-tokens", type=int, default=10, help="content chunks per stream")
    p.add_argument("--completion-tokens", type=int, default=10, help="output tokens of plain replies")
    p.add_argument("--prompt-tokens", type=int, default=9, help="input tokens reported in usage")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = FakeSettings(
        latency_s=args.latency_ms / 1000,
        chunk_interval_s=args.chunk_interval_ms / 1000,
        stream_tokens=args.stream_tokens,
        completion_tokens=args.completion_tokens,
        prompt_tokens=args.prompt_tokens,
    )
    coro = serve(args.host, args.port, settings)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
