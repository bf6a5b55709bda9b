"""Relay: pass the upstream's answer back as it comes, with a tap that sees what metering needs.

Streams go through in whole events, chunk by chunk as they come (no buffering of the whole stream,
back-pressure from the client's socket); a client that hangs up closes the upstream connection so
generation stops.
"""
from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from .forwarding import HOP_BY_HOP
from .providers import Adapter, Call, StreamTap
from .providers.sse import SSEEvent
from .records import Relayed
from .upstream import UpstreamResponse
from .upstream_errors import UpstreamError

# Upstream response headers the proxy replaces or must not copy.
_DROP_RESPONSE = HOP_BY_HOP | frozenset({"content-length", "x-request-id"})
_MAX_JSON_STREAM_BYTES = 64 * 1024 * 1024
# While the upstream is silent (a reasoning model thinking), look this often for a client that hung
# up: otherwise it is only noticed at the next write, and the provider keeps generating meanwhile.
CLIENT_CHECK_SECONDS = 0.2


def response_headers(upstream: UpstreamResponse, extra: dict[str, str]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.headers.items():
        lname = name.lower()
        if lname in _DROP_RESPONSE or lname.startswith("x-ratelimit-"):
            continue
        headers.add(name, value)
    if "x-request-id" in upstream.headers:
        headers["x-upstream-request-id"] = upstream.headers["x-request-id"]
    headers.update(extra)
    return headers


def _plain(data: bytes, encoding: str | None) -> bytes:
    """The proxy asks for no compression; an upstream that compresses anyway is inflated to meter."""
    if encoding in ("gzip", "deflate"):
        try:
            return zlib.decompress(data, wbits=47)  # 47: gzip or zlib header, detected
        except zlib.error:
            return b""
    return data


def _is_json(upstream: UpstreamResponse) -> bool:
    return "json" in upstream.headers.get("content-type", "")


async def relay_body(
    upstream: UpstreamResponse, adapter: Adapter, call: Call, extra: dict[str, str]
) -> tuple[web.Response, Relayed]:
    """A non-streamed answer: read it whole (usage is in it), forward the bytes unchanged."""
    try:
        data = await upstream.read()
    except TimeoutError:
        raise UpstreamTimeout(f"The upstream provider {adapter.name!r} did not finish its answer in time.") from None
    except UpstreamError as e:
        raise UpstreamUnreachable(f"The upstream provider {adapter.name!r} broke off its answer ({type(e).__name__}).") from None
    done = time.perf_counter()
    out = Relayed(status=upstream.status, upstream_done=done)
    if data and _is_json(upstream):
        try:
            obj = orjson.loads(_plain(data, upstream.headers.get("content-encoding")))
        except orjson.JSONDecodeError:
            obj = None
        if obj is not None:
            out.usage = adapter.usage_from_body(call, obj)
            if out.usage is None and upstream.status < 400:
                out.output_final = False
                out.text = lambda: adapter.text_from_body(call, obj)
    return web.Response(body=data, status=upstream.status, headers=response_headers(upstream, extra)), out


async def relay_stream(
    request: web.Request,
    hang_ups: HangUps,
    upstream: UpstreamResponse,
    adapter: Adapter,
    call: Call,
    strip_usage: bool,
    extra: dict[str, str],
    started: float,
    overrun: Callable[[StreamTap], ProxyError | None] | None,
) -> tuple[web.StreamResponse, Relayed]:
    """Relay a stream in whole events. Never raises for upstream or client trouble after the 200.

    `overrun` is asked after each chunk whether the stream must end; None: it never must.
    """
    resp = _StreamResponse(status=upstream.status, headers=response_headers(upstream, extra))
    out = Relayed(status=upstream.status, streamed=True)
    pump = _Pump(resp, adapter.new_tap(call, strip_usage),
                 "text/event-stream" in upstream.headers.get("content-type", ""))
    complete = False
    end_error: ProxyError | None = None
    last = b""  # the stream's last bytes: they go out with its end, in one write
    watch = hang_ups.watch(request)
    try:
        await resp.prepare(request)
        complete, end_error, last = await pump.run(upstream, out, started, overrun)
    except ConnectionError:
        # The client hung up (writes to a closing transport raise ConnectionResetError).
        out.client_gone = True
    except asyncio.CancelledError:
        if not watch.fired:
            raise
        watch.absorb()  # our own cancel: the client left while the upstream was silent
        out.client_gone = True
    except TimeoutError:
        end_error = UpstreamTimeout(f"The upstream provider {adapter.name!r} went silent mid-stream.")
    except UpstreamError as e:
        end_error = UpstreamUnreachable(f"The upstream provider {adapter.name!r} cut the stream ({type(e).__name__}).")
    finally:
        watch.stop()
    out.upstream_done = time.perf_counter()
    if complete:
        upstream.release()
    else:
        upstream.close()  # closes the connection: the provider stops generating
        out.cut_short = True
    if end_error is not None and not out.client_gone:
        out.error = end_error.code
        out.client_gone = not await _send(resp, adapter.stream_error_event(call, end_error))
    if not out.client_gone:
        try:
            await resp.write_eof(last)
        except ConnectionError:
            out.client_gone = True
    pump.finish(out)
    return resp, out


async def _send(resp: web.StreamResponse, data: bytes) -> bool:
    try:
        await resp.write(data)
        return True
    except ConnectionError:
        return False


class _StreamResponse(web.StreamResponse):
    # The status line and headers wait for the first body bytes (aiohttp >= 3.12 buffers them):
    # a stream that has arrived whole goes out in one write. _Pump sends them alone before a wait.
    _send_headers_immediately = False


class _Pump:
    """Moves chunks from upstream to client through the tap."""

    def __init__(self, resp: web.StreamResponse, tap: StreamTap, sse: bool) -> None:
        self.resp = resp
        self.tap = tap
        self.sse = sse
        self.raw_json: list[bytes] = []  # Gemini's non-SSE stream is one JSON array: kept to read usage
        self.raw_size = 0

    async def run(self, upstream: UpstreamResponse, out: Relayed, started: float,
                  overrun: Callable[[StreamTap], ProxyError | None] | None
                  ) -> tuple[bool, ProxyError | None, bytes]:
        """(complete, why it was ended early, the last bytes: not yet written when complete)."""
        tap = self.tap
        write = self.resp.write
        flushed = False  # the status line and headers are out
        while True:
            if not flushed and not upstream.ready:
                await write(b"")  # a wait ahead: the headers go now
                flushed = True
            chunk = await upstream.readany()
            if not chunk:
                return True, None, tap.flush() if self.sse else b""
            if out.ttft_seconds is None:
                out.ttft_seconds = time.perf_counter() - started
            if self.sse:
                send = tap.feed(chunk)
            else:
                send = chunk
                if self.raw_size < _MAX_JSON_STREAM_BYTES:
                    self.raw_json.append(chunk)
                    self.raw_size += len(chunk)
            last = upstream.drained
            if last and self.sse:
                send += tap.flush()
            end_error = overrun(tap) if overrun is not None else None
            if last and end_error is None:
                return True, None, send
            if send:
                await write(send)
                flushed = True
            if end_error is not None:
                return False, end_error, b""

    def finish(self, out: Relayed) -> None:
        tap = self.tap
        if not self.sse and self.raw_json:
            # A stream that is one JSON array (Gemini without alt=sse): its whole elements go
            # through the tap now, as the events they would have been, even if it was cut.
            for item in _json_items(b"".join(self.raw_json)):
                data = orjson.dumps(item)
                tap.on_event(SSEEvent(b"data: " + data + b"\n\n", "", data))
        tap.finish()
        out.usage = tap.usage
        out.output_final = out.usage is not None and tap.output_final
        out.text = tap.unreported_text
        out.text_beyond_usage = tap.text_beyond_usage
        out.error = out.error or tap.error


def _json_items(data: bytes, max_tries: int = 64) -> list[Any]:
    """The elements of a JSON array stream; of a cut one, the elements that arrived whole."""
    end = len(data)
    candidate = data
    for _ in range(max_tries):
        try:
            obj = orjson.loads(candidate)
        except orjson.JSONDecodeError:
            end = data.rfind(b"}", 0, end)
            if end < 0:
                return []
            candidate = data[: end + 1] + b"]"
            continue
        return obj if isinstance(obj, list) else [obj]
    return []


class HangUps:
    """Notices clients that hung up while their upstream is silent (a model thinking), so each
    such upstream is closed at once: one timer every CLIENT_CHECK_SECONDS for all open streams
    (a timer per stream cost more than everything else its hang-up handling does)."""

    def __init__(self) -> None:
        self._open: set[_Watch] = set()
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, request: web.Request) -> _Watch:
        watch = _Watch(request, self._open)
        self._open.add(watch)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(CLIENT_CHECK_SECONDS, self._check)
        return watch

    def _check(self) -> None:
        self._handle = None
        for watch in [w for w in self._open if w.gone()]:
            watch.fire()
        if self._open:
            self._handle = asyncio.get_running_loop().call_later(CLIENT_CHECK_SECONDS, self._check)


class _Watch:
    """One stream's part: cancels its handler task when its client is found gone."""

    __slots__ = ("request", "task", "fired", "_open")

    def __init__(self, request: web.Request, open_: set[_Watch]) -> None:
        self.request = request
        self.task = request.task
        self.fired = False
        self._open = open_

    def gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def fire(self) -> None:
        self.fired = True
        self._open.discard(self)
        self.task.cancel()

    def absorb(self) -> None:
        self.task.uncancel()

    def stop(self) -> None:
        self._open.discard(self)
