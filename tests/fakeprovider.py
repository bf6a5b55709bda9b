"""A fake LLM upstream for tests: speaks the real OpenAI, Azure, Anthropic and Gemini wire formats
with deterministic text and usage, records every request, and misbehaves on demand via `x-fake-*`
request headers (or `FakeProvider.controls` defaults). See WIRE-FORMATS.md sections 1-6.
"""
from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

# Prompt tokens = words in the request's text fields + this, so an empty prompt still costs something.
PROMPT_OVERHEAD = 3
DEFAULT_CHUNKS = 12
# Gemini "thinking" models report thoughts even when no x-fake-reasoning is given.
DEFAULT_THOUGHTS = 8
AZURE_SNAPSHOT = "gpt-4o-2024-08-06"
EMBEDDING_DIMENSIONS = 8
# Keys whose string (or token-id) values count as prompt text, in any provider's body.
_TEXT_KEYS = frozenset({"content", "text", "input", "prompt", "instructions", "system"})

Handler = Callable[[web.Request, "RecordedRequest", "Controls"], Awaitable[web.StreamResponse]]


def count_prompt_words(body: Any, key: str | None = None) -> int:
    """Whitespace-separated words in every text field of a request body (token ids count 1 each)."""
    if isinstance(body, dict):
        return sum(count_prompt_words(v, k) for k, v in body.items())
    if isinstance(body, list):
        return sum(count_prompt_words(v, key) for v in body)
    if key in _TEXT_KEYS:
        if isinstance(body, str):
            return len(body.split())
        if isinstance(body, int) and not isinstance(body, bool):
            return 1
    return 0


def reply_text(n: int) -> str:
    """The full text the fake generates for `n` output tokens."""
    return " ".join(f"tok{i}" for i in range(n))


def _delta(i: int) -> str:
    return f"tok{i}" if i == 0 else f" tok{i}"


@dataclass(frozen=True, slots=True)
class Controls:
    """Per-request behaviour, parsed from `x-fake-*` headers over the provider's defaults."""

    chunks: int | None = None
    chunk_delay: float = 0.0
    delay: float = 0.0
    status: int | None = None
    no_usage: bool = False
    usage_every_chunk: bool = False
    cut_after: int | None = None
    cached: int = 0
    reasoning: int = 0
    cache_write: int = 0
    malformed: bool = False
    error_after: int | None = None  # send a provider-shaped error event after N chunks, then end

    @classmethod
    def parse(cls, defaults: dict[str, str], headers: Any) -> Controls:
        raw = {k.lower(): v for k, v in defaults.items()}
        raw.update({k.lower(): v for k, v in headers.items() if k.lower().startswith("x-fake-")})

        def opt_int(name: str) -> int | None:
            return int(raw[name]) if name in raw else None

        return cls(
            chunks=opt_int("x-fake-chunks"),
            chunk_delay=float(raw.get("x-fake-chunk-delay", 0)),
            delay=float(raw.get("x-fake-delay", 0)),
            status=opt_int("x-fake-status"),
            no_usage=raw.get("x-fake-no-usage", "0") not in ("", "0", "false"),
            usage_every_chunk=raw.get("x-fake-usage-every-chunk", "0") not in ("", "0", "false"),
            cut_after=opt_int("x-fake-cut-after"),
            cached=int(raw.get("x-fake-cached", 0)),
            reasoning=int(raw.get("x-fake-reasoning", 0)),
            cache_write=int(raw.get("x-fake-cache-write", 0)),
            malformed=raw.get("x-fake-malformed", "0") not in ("", "0", "false"),
            error_after=opt_int("x-fake-error-after"),
        )


@dataclass(slots=True)
class RecordedRequest:
    """One request as the fake saw it, plus what it did about it (filled in while it answers)."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    body: bytes
    received_at: float
    api_key: str | None = None
    status: int | None = None
    # The usage object last written to the wire in provider shape (cumulative for streams), or
    # None if none reached the client: exactly what a metering proxy should have seen.
    reported_usage: dict[str, Any] | None = None
    streamed: bool = False
    chunks_sent: int = 0
    completed: bool = False  # the response (or stream terminator) was fully written
    disconnected_at: float | None = None  # time.monotonic() when the client was seen gone

    @property
    def disconnected(self) -> bool:
        return self.disconnected_at is not None

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True, slots=True)
class _Counts:
    prompt: int  # words + overhead, excluding any cache counts
    output: int  # visible words emitted
    cached: int
    cache_write: int
    reasoning: int


class _ClientGone(Exception):
    pass


class _Cut(Exception):
    pass


def _openai_error(status: int, message: str, code: str | None = None) -> web.Response:
    kinds = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             429: "requests"}
    err_type = kinds.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return web.json_response(body, status=status)


def _anthropic_error(status: int, message: str) -> web.Response:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
             529: "overloaded_error"}
    err_type = kinds.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": err_type, "message": message},
            "request_id": "req_fake"}
    return web.json_response(body, status=status)


_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                  404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
                  504: "DEADLINE_EXCEEDED"}


def _gemini_error(status: int, message: str) -> web.Response:
    body = {"error": {"code": status, "message": message,
                      "status": _GOOGLE_STATUS.get(status, "UNKNOWN")}}
    return web.json_response(body, status=status)


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    return token or None


class _Stream:
    """Writes SSE events for one response, applying the delay/cut/malformed/disconnect controls."""

    def __init__(self, fake: FakeProvider, request: web.Request, rec: RecordedRequest,
                 ctl: Controls, resp: web.StreamResponse, crlf: bool = False) -> None:
        self._fake, self._request, self._rec, self._ctl, self._resp = fake, request, rec, ctl, resp
        self._eol = "\r\n" if crlf else "\n"

    async def event(self, data: dict[str, Any] | str, event: str | None = None,
                    usage: dict[str, Any] | None = None) -> None:
        """Write one event; `usage` is what this event reports, recorded once it is on the wire."""
        payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        text = (f"event: {event}{self._eol}" if event else "") + f"data: {payload}{self._eol * 2}"
        await self._write(text)
        if usage is not None:
            self._rec.reported_usage = usage

    async def content(self, index: int, data: dict[str, Any], event: str | None = None,
                      usage: dict[str, Any] | None = None) -> None:
        """Write content chunk `index`; raises _Cut once the cut-after count is reached."""
        if index > 0 and self._ctl.chunk_delay:
            await self._fake._pause(self._request, self._ctl.chunk_delay)
        await self.event(data, event, usage)
        self._rec.chunks_sent += 1
        if self._ctl.malformed and index == 0:
            await self._write(f"data: {{this is not json{self._eol * 2}")
        if self._ctl.cut_after is not None and self._rec.chunks_sent >= self._ctl.cut_after:
            raise _Cut

    def error_due(self, index: int) -> bool:
        return self._ctl.error_after is not None and index >= self._ctl.error_after

    async def _write(self, text: str) -> None:
        if self._fake._gone(self._request):
            raise _ClientGone
        try:
            await self._resp.write(text.encode())
        except (ConnectionError, RuntimeError) as exc:  # aiohttp: writing to a closing transport
            raise _ClientGone from exc


class FakeProvider:
    """The fake upstream. Set attributes between requests to change defaults for all of them."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.disconnects: list[RecordedRequest] = []
        self.controls: dict[str, str] = {}  # x-fake-* defaults applied under each request's headers
        self.fail_next = 0  # the next N requests answer `fail_status` (for retry tests)
        self.fail_status = 503
        self.default_chunks = DEFAULT_CHUNKS
        self.model_aliases: dict[str, str] = {}  # requested model -> model reported in the reply
        self.azure_model = AZURE_SNAPSHOT
        self.gemini_crlf = True  # Gemini frames SSE events with CRLF
        self.open_streams = 0
        self.max_open_streams = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._seq = 0

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self, port: int = 0) -> FakeProvider:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_get("/v1/models", self._wrap(self._models, _openai_error))
        for path, handler in (("/v1/chat/completions", self._chat),
                              ("/v1/completions", self._completions),
                              ("/v1/embeddings", self._embeddings),
                              ("/v1/responses", self._responses),
                              ("/v1/responses/input_tokens", self._input_tokens)):
            r.add_post(path, self._wrap(handler, _openai_error))
        for op, handler in (("chat/completions", self._chat), ("completions", self._completions),
                            ("embeddings", self._embeddings)):
            r.add_post(f"/openai/deployments/{{dep}}/{op}", self._wrap(handler, _openai_error))
        r.add_post("/v1/messages", self._wrap(self._messages, _anthropic_error))
        r.add_post("/v1/messages/count_tokens", self._wrap(self._count_tokens, _anthropic_error))
        r.add_post("/v1beta/models/{tail:[^/]+}", self._wrap(self._gemini, _gemini_error))
        r.add_route("*", "/{tail:.*}", self._wrap(self._not_found, _openai_error))
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def reset(self) -> None:
        self.requests.clear()
        self.disconnects.clear()

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll until `predicate()` holds (e.g. a disconnect was noticed); TimeoutError otherwise."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)

    # ---- plumbing --------------------------------------------------------------------------

    def _wrap(self, handler: Handler,
              error: Callable[[int, str], web.Response]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def run(request: web.Request) -> web.StreamResponse:
            rec = RecordedRequest(
                method=request.method, path=request.path, query_string=request.query_string,
                headers=CIMultiDict(request.headers), body=await request.read(),
                received_at=time.monotonic())
            self.requests.append(rec)
            try:
                ctl = Controls.parse(self.controls, request.headers)
                if ctl.delay:
                    await self._pause(request, ctl.delay)
                status = ctl.status
                if status is None and self.fail_next > 0:  # fail the next N requests, then recover
                    self.fail_next -= 1
                    status = self.fail_status
                if status is not None:
                    resp: web.StreamResponse = error(status, f"fake error {status}")
                else:
                    resp = await handler(request, rec, ctl)
            except _ClientGone:
                self._mark_gone(rec)
                return web.Response(status=499)
            rec.status = resp.status
            if not rec.streamed and rec.status < 400:
                rec.completed = True
            return resp

        return run

    def _gone(self, request: web.Request) -> bool:
        transport = request.transport
        return transport is None or transport.is_closing() or self._closing.is_set()

    def _mark_gone(self, rec: RecordedRequest) -> None:
        if rec.disconnected_at is None:
            rec.disconnected_at = time.monotonic()
            self.disconnects.append(rec)

    async def _pause(self, request: web.Request, seconds: float) -> None:
        """Sleep, but notice a client hang-up within ~5 ms (aiohttp only tells us on write)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._gone(request):
                raise _ClientGone
            await asyncio.sleep(min(left, 0.005))
        if self._gone(request):
            raise _ClientGone

    async def _run_stream(self, request: web.Request, rec: RecordedRequest, ctl: Controls,
                          body: Callable[[_Stream], Awaitable[None]], crlf: bool = False,
                          headers: dict[str, str] | None = None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache", **(headers or {})})
        rec.streamed = True
        self.open_streams += 1
        self.max_open_streams = max(self.max_open_streams, self.open_streams)
        try:
            await resp.prepare(request)
            await body(_Stream(self, request, rec, ctl, resp, crlf))
            rec.completed = True
        except _Cut:
            # An abrupt transport close: no terminator, no chunked-encoding end.
            if request.transport is not None:
                request.transport.abort()
        except _ClientGone:
            self._mark_gone(rec)
        finally:
            self.open_streams -= 1
        return resp

    def _next_id(self) -> int:
        self._seq += 1
        return self._seq

    def _counts(self, body: dict[str, Any], ctl: Controls, max_tokens: int | None) -> _Counts:
        n = ctl.chunks if ctl.chunks is not None else self.default_chunks
        if ctl.chunks is None and max_tokens is not None:
            n = min(n, max_tokens)
        return _Counts(prompt=count_prompt_words(body) + PROMPT_OVERHEAD, output=n,
                       cached=ctl.cached, cache_write=ctl.cache_write, reasoning=ctl.reasoning)

    @staticmethod
    def _body(rec: RecordedRequest) -> dict[str, Any]:
        try:
            data = rec.json()
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _model(self, requested: str) -> str:
        return self.model_aliases.get(requested, requested)

    # ---- OpenAI and Azure ------------------------------------------------------------------

    def _openai_auth(self, request: web.Request, rec: RecordedRequest) -> web.Response | None:
        """Checks auth and api-version; returns an error response or None."""
        azure = request.path.startswith("/openai/")
        rec.api_key = (request.headers.get("api-key") if azure else None) or _bearer(request)
        if not rec.api_key:
            return _openai_error(401, "Missing API key", "invalid_api_key")
        if azure and not request.query.get("api-version"):
            return _openai_error(400, "Missing required query parameter api-version", "missing_api_version")
        return None

    def _openai_usage(self, c: _Counts, output: int | None = None) -> dict[str, Any]:
        out = (c.output if output is None else output) + c.reasoning
        prompt = c.prompt + c.cached + c.cache_write
        details: dict[str, Any] = {"cached_tokens": c.cached, "audio_tokens": 0}
        if c.cache_write:
            details["cache_write_tokens"] = c.cache_write
        return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
                "prompt_tokens_details": details,
                "completion_tokens_details": {"reasoning_tokens": c.reasoning, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0}}

    def _openai_model(self, request: web.Request, body: dict[str, Any]) -> str:
        if request.path.startswith("/openai/"):
            return self.azure_model
        return self._model(str(body.get("model", "")))

    async def _models(self, request: web.Request, rec: RecordedRequest, ctl: Controls) -> web.StreamResponse:
        if (err := self._openai_auth(request, rec)) is not None:
            return err
        names = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
        return web.json_response({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "fake"} for n in names]})

    async def _chat(self, request: web.Request, rec: RecordedRequest, ctl: Controls) -> web.StreamResponse:
        return await self._openai_text(request, rec, ctl, chat=True)

    async def _completions(self, request: web.Request, rec: RecordedRequest, ctl: Controls) -> web.StreamResponse:
        return await self._openai_text(request, rec, ctl, chat=False)

    async def _openai_text(self, request: web.Request, rec: RecordedRequest, ctl: Controls,
                           chat: bool) -> web.StreamResponse:
        if (err := self._openai_auth(request, rec)) is not None:
            return err
        body = self._body(rec)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        c = self._counts(body, ctl, limit if isinstance(limit, int) else None)
        finish = "length" if isinstance(limit, int) and c.output >= limit else "stop"
        azure = request.path.startswith("/openai/")
        model = self._openai_model(request, body)
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-fake{self._next_id()}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": model, "system_fingerprint": "fp_fake"}
        if not body.get("stream"):
            usage = None if ctl.no_usage else self._openai_usage(c)
            text = reply_text(c.output)
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text, "refusal": None}
            else:
                choice["text"] = text
            reply: dict[str, Any] = {**base, "choices": [choice]}
            if azure:
                reply["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": {}}]
            if usage is not None:
                reply["usage"] = usage
                rec.reported_usage = usage
            return web.json_response(reply)

        base["object"] = "chat.completion.chunk" if chat else "text_completion"
        return await self._openai_stream(request, rec, ctl, c, base, chat, finish)

    async def _openai_stream(self, request: web.Request, rec: RecordedRequest, ctl: Controls,
                             c: _Counts, base: dict[str, Any], chat: bool,
                             finish: str) -> web.StreamResponse:
        opts = self._body(rec).get("stream_options") or {}
        every = ctl.usage_every_chunk and not ctl.no_usage
        include = (bool(opts.get("include_usage")) or every) and not ctl.no_usage

        def chunk(delta: str | None, fin: str | None, done: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
            if chat:
                d: dict[str, Any] = {} if delta is None else {"content": delta}
                if delta == "":
                    d["role"] = "assistant"
                choice = {"index": 0, "delta": d, "finish_reason": fin, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": fin, "logprobs": None}
            u = self._openai_usage(c, done) if every else None
            data = {**base, "choices": [choice]}
            if include:
                data["usage"] = u  # null on every chunk but the last unless usage is continuous
            return data, u

        async def write(s: _Stream) -> None:
            if request.path.startswith("/openai/"):
                await s.event({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                               "prompt_filter_results": [{"prompt_index": 0,
                                                          "content_filter_results": {}}]})
            if chat:
                data, u = chunk("", None, 0)
                await s.event(data, usage=u)
            for i in range(c.output):
                if s.error_due(i):
                    await s.event({"error": {"message": "fake mid-stream error",
                                             "type": "server_error", "param": None, "code": None}})
                    await s.event("[DONE]")
                    return
                data, u = chunk(_delta(i), None, i + 1)
                await s.content(i, data, usage=u)
            data, u = chunk(None, finish, c.output)
            await s.event(data, usage=u)
            if include:
                usage = self._openai_usage(c)
                await s.event({**base, "choices": [], "usage": usage}, usage=usage)
            await s.event("[DONE]")

        return await self._run_stream(request, rec, ctl, write)

    async def _embeddings(self, request: web.Request, rec: RecordedRequest, ctl: Controls) -> web.StreamResponse:
        if (err := self._openai_auth(request, rec)) is not None:
            return err
        body = self._body(rec)
        raw = body.get("input", "")
        inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        dims = int(body.get("dimensions") or EMBEDDING_DIMENSIONS)
        data = []
        for i in range(len(inputs)):
            # Quarter steps are exact in float32, so tests can compare decoded vectors exactly.
            vec = [(i * dims + j) / 4 for j in range(dims)]
            emb: Any = (base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
                        if body.get("encoding_format") == "base64" else vec)
            data.append({"object": "embedding", "index": i, "embedding": emb})
        reply: dict[str, Any] = {"object": "list", "data": data,
                                 "model": self._openai_model(request, body)}
        if not ctl.no_usage:
            prompt = count_prompt_words(body) + PROMPT_OVERHEAD
            reply["usage"] = rec.reported_usage = {"prompt_tokens": prompt, "total_tokens": prompt}
        return web.json_response(reply)

    def _responses_usage(self, c: _Counts, output: int | None = None) -> dict[str, Any]:
        o = self._openai_usage(c, output)
        in_details: dict[str, Any] = {"cached_tokens": c.cached}
        if c.cache_write:
            in_details["cache_write_tokens"] = c.cache_write
        return {"input_tokens": o["prompt_tokens"], "input_tokens_details": in_details,
                "output_tokens": o["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": c.reasoning},
                "total_tokens": o["total_tokens"]}

    async def _responses(self, request: web.Request, rec: RecordedRequest, ctl: Controls) -> web.StreamResponse:
        if (err := self._openai_auth(request, rec)) is not None:
            return err
        body = self._body(rec)
        limit = body.get("max_output_tokens")
        c = self._counts(body, ctl, limit if isinstance(limit, int) else None)
        n = self._next_id()
        rid, mid = f"resp_fake{n}", f"msg_fake{n}"
        usage = None if ctl.no_usage else self._responses_usage(c)
        text = reply_text(c.output)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = {"id": mid, "type": "message", "status": "completed", "role": "assistant",
                "content": [part]}

        def response(status: str, output: list[Any], u: dict[str, Any] | None) -> dict[str, Any]:
            return {"id": rid, "object": "response", "created_at": int(time.time()),
                    "status": status, "model": self._model(str(body.get("model", ""))),
                    "output": output, "usage": u, "error": None, "incomplete_details": None,
                    "instructions": body.get("instructions"), "max_output_tokens": limit,
                    "metadata": {}, "parallel_tool_calls": True, "previous_response_id": None,
                    "reasoning": None, "temperature": 1.0, "top_p": 1.0, "tool_choice": "auto",
                    "tools": [], "text": {"format": {"type": "text"}}, "truncation": "disabled"}

        if not body.get("stream"):
            rec.reported_usage = usage
            return web.json_response(response("completed", [item], usage))

        seq = iter(range(1_000_000))

        def ev(kind: str, **fields: Any) -> tuple[dict[str, Any], str]:
            return {"type": kind, "sequence_number": next(seq), **fields}, kind

        loc = {"item_id": mid, "output_index": 0, "content_index": 0}

        async def write(s: _Stream) -> None:
            await s.event(*ev("response.created", response=response("in_progress", [], None)))
            await s.event(*ev("response.in_progress", response=response("in_progress", [], None)))
            await s.event(*ev("response.output_item.added", output_index=0,
                              item={**item, "status": "in_progress", "content": []}))
            await s.event(*ev("response.content_part.added", **loc,
                              part={**part, "text": ""}))
            for i in range(c.output):
                if s.error_due(i):
                    await s.event(*ev("error", code="server_error", message="fake mid-stream error",
                                      param=None))
                    return
                await s.content(i, *ev("response.output_text.delta", **loc, delta=_delta(i),
                                       logprobs=[]))
            await s.event(*ev("response.output_text.done", **loc, text=text, logprobs=[]))
            await s.event(*ev("response.content_part.done", **loc, part=part))
            await s.event(*ev("response.output_item.done", output_index=0, item=item))
            data, kind = ev("response.completed", response=response("completed", [item], usage))
            await s.event(data, kind, usage=usage)

        return await self._run_stream(request, rec, ctl, write)

    async def _input_tokens(self, request: web.Request, rec: RecordedRequest, ctl: Controls) -> web.StreamResponse:
        if (err := self._openai_auth(request, rec)) is not None:
            return err
        tokens = count_prompt_words(self._body(rec)) + PROMPT_OVERHEAD
        return web.json_response({"object": "response.input_tokens", "input_tokens": tokens})

    async def _not_found(self, request: web.Request, rec: RecordedRequest, ctl: Controls) -> web.StreamResponse:
        return _openai_error(404, f"Unknown path {request.method} {request.path}", "unknown_url")

    # ---- Anthropic -------------------------------------------------------------------------

    def _anthropic_auth(self, request: web.Request, rec: RecordedRequest) -> web.Response | None:
        rec.api_key = request.headers.get("x-api-key") or _bearer(request)
        if not rec.api_key:
            return _anthropic_error(401, "x-api-key header is required")
        if not request.headers.get("anthropic-version"):
            return _anthropic_error(400, "anthropic-version header is required")
        return None

    async def _messages(self, request: web.Request, rec: RecordedRequest, ctl: Controls) -> web.StreamResponse:
        if (err := self._anthropic_auth(request, rec)) is not None:
            return err
        body = self._body(rec)
        limit = body.get("max_tokens")
        c = self._counts(body, ctl, limit if isinstance(limit, int) else None)
        stop = "max_tokens" if isinstance(limit, int) and c.output >= limit else "end_turn"
        out = c.output + c.reasoning  # thinking tokens are inside output_tokens
        usage = {"input_tokens": c.prompt, "cache_creation_input_tokens": c.cache_write,
                 "cache_read_input_tokens": c.cached, "output_tokens": out,
                 "service_tier": "standard"}
        msg: dict[str, Any] = {"id": f"msg_fake{self._next_id()}", "type": "message",
                               "role": "assistant", "model": self._model(str(body.get("model", ""))),
                               "content": [], "stop_reason": None, "stop_sequence": None}
        if not body.get("stream"):
            msg.update(content=[{"type": "text", "text": reply_text(c.output)}], stop_reason=stop)
            if not ctl.no_usage:
                msg["usage"] = rec.reported_usage = usage
            return web.json_response(msg)

        async def write(s: _Stream) -> None:
            start_usage = None if ctl.no_usage else {**usage, "output_tokens": 1}
            await s.event({"type": "message_start", "message": {**msg, "usage": start_usage}},
                          "message_start", usage=start_usage)
            await s.event({"type": "content_block_start", "index": 0,
                           "content_block": {"type": "text", "text": ""}}, "content_block_start")
            await s.event({"type": "ping"}, "ping")
            for i in range(c.output):
                if s.error_due(i):
                    await s.event({"type": "error", "error": {"type": "overloaded_error",
                                                              "message": "Overloaded"}}, "error")
                    return
                await s.content(i, {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "text_delta", "text": _delta(i)}},
                                "content_block_delta")
            await s.event({"type": "content_block_stop", "index": 0}, "content_block_stop")
            delta_usage = None if ctl.no_usage else {"output_tokens": out}
            await s.event({"type": "message_delta",
                           "delta": {"stop_reason": stop, "stop_sequence": None},
                           "usage": delta_usage}, "message_delta",
                          usage=None if start_usage is None else {**start_usage, "output_tokens": out})
            await s.event({"type": "message_stop"}, "message_stop")

        return await self._run_stream(request, rec, ctl, write,
                                      headers={"request-id": "req_fake"})

    async def _count_tokens(self, request: web.Request, rec: RecordedRequest, ctl: Controls) -> web.StreamResponse:
        if (err := self._anthropic_auth(request, rec)) is not None:
            return err
        return web.json_response(
            {"input_tokens": count_prompt_words(self._body(rec)) + PROMPT_OVERHEAD})

    # ---- Gemini ----------------------------------------------------------------------------

    def _gemini_usage(self, c: _Counts, model: str, output: int | None = None) -> dict[str, Any]:
        prompt = c.prompt + c.cached
        cand = c.output if output is None else output
        thoughts = c.reasoning or (DEFAULT_THOUGHTS if "thinking" in model else 0)
        usage: dict[str, Any] = {"promptTokenCount": prompt, "candidatesTokenCount": cand,
                                 "totalTokenCount": prompt + cand + thoughts,
                                 "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]}
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        if c.cached:
            usage["cachedContentTokenCount"] = c.cached
        return usage

    async def _gemini(self, request: web.Request, rec: RecordedRequest, ctl: Controls) -> web.StreamResponse:
        rec.api_key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not rec.api_key:
            return _gemini_error(401, "Method doesn't allow unregistered callers.")
        model, _, method = request.match_info["tail"].partition(":")
        body = self._body(rec)
        if method == "countTokens":
            tokens = count_prompt_words(body) + PROMPT_OVERHEAD
            return web.json_response({"totalTokens": tokens, "promptTokensDetails": [
                {"modality": "TEXT", "tokenCount": tokens}]})
        if method not in ("generateContent", "streamGenerateContent"):
            return _gemini_error(404, f"Method {method} not found")
        limit = (body.get("generationConfig") or {}).get("maxOutputTokens")
        c = self._counts(body, ctl, limit if isinstance(limit, int) else None)
        finish = "MAX_TOKENS" if isinstance(limit, int) and c.output >= limit else "STOP"
        base = {"modelVersion": self._model(model), "responseId": f"fake{self._next_id()}"}

        def reply(text: str, fin: str | None, done: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
            cand: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
            if fin:
                cand["finishReason"] = fin
            u = None if ctl.no_usage else self._gemini_usage(c, model, done)
            data: dict[str, Any] = {"candidates": [cand], **base}
            if u is not None:
                data["usageMetadata"] = u
            return data, u

        if method == "generateContent":
            data, rec.reported_usage = reply(reply_text(c.output), finish, c.output)
            return web.json_response(data)
        if request.query.get("alt") != "sse":
            return _gemini_error(400, "the fake only streams with alt=sse")

        async def write(s: _Stream) -> None:
            for i in range(c.output):
                if s.error_due(i):
                    await s.event({"error": {"code": 503, "message": "fake mid-stream error",
                                             "status": "UNAVAILABLE"}})
                    return
                data, u = reply(_delta(i), finish if i == c.output - 1 else None, i + 1)
                await s.content(i, data, usage=u)
            if c.output == 0:
                data, u = reply("", finish, 0)
                await s.event(data, usage=u)

        return await self._run_stream(request, rec, ctl, write, crlf=self.gemini_crlf)


@asynccontextmanager
async def start_fake_provider() -> AsyncIterator[FakeProvider]:
    """Run a FakeProvider on 127.0.0.1 (free port) for the duration of the block."""
    fake = await FakeProvider().start()
    try:
        yield fake
    finally:
        await fake.close()


async def _serve_forever(port: int) -> None:
    fake = await FakeProvider().start(port)
    print(f"fake provider (OpenAI, Azure, Anthropic, Gemini wire formats) on {fake.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.close()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the fake LLM provider (for demos and manual tests).")
    parser.add_argument("--port", type=int, default=9911)
    try:
        asyncio.run(_serve_forever(parser.parse_args().port))
    except KeyboardInterrupt:
        pass
