"""Upstream HTTP/1.1 client: a keep-alive connection pool and a lean response reader.

It replaces aiohttp's ClientSession on the hot path: the request is written as bytes in one call,
the response is parsed inside the protocol callback, and each connection has one timer handle.
"""
from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import cast

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__all__ = ["HIGH_WATER", "MAX_HEAD_BYTES", "Headers", "UpstreamConnectError", "UpstreamDisconnected",
           "UpstreamError", "UpstreamPool", "UpstreamProtocolError", "UpstreamResponse", "UpstreamTimeoutError"]

MAX_HEAD_BYTES = 64 * 1024
_MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
_MAX_TRAILER_BYTES = 64 * 1024
HIGH_WATER = 256 * 1024  # unread body bytes past which the socket is paused
_HEX = b"0123456789abcdefABCDEF"
_INF = float("inf")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# Body framing of the response being read (RFC 9112 section 6.3).
_HEAD, _LENGTH, _CHUNKED, _CLOSE = range(4)
# Where the chunked decoder is.
_C_SIZE, _C_DATA, _C_CRLF, _C_TRAILER, _C_END = range(5)
# Where a connection is: in a pool list, lent to one exchange, or gone.
_CONNECTING, _IDLE, _ACTIVE, _CLOSED = range(4)

_Key = tuple[str, str, int]
Headers = Mapping[str, str] | Iterable[tuple[str, str]]


class UpstreamError(Exception):
    """Base of every error this client raises. Catch UpstreamTimeoutError first where a timeout
    must be told apart (504 rather than 502): it is an UpstreamError and a TimeoutError."""


class UpstreamConnectError(UpstreamError):
    """request(): the TCP connect or TLS handshake failed (refused, unreachable, DNS, certificate),
    or the pool is closed."""


class UpstreamTimeoutError(UpstreamError, TimeoutError):
    """request(): connect_timeout ran out, or read_timeout/total_timeout while waiting for the head;
    read()/readany(): read_timeout (silence between reads) or total_timeout."""


class UpstreamProtocolError(UpstreamError):
    """The bytes are not valid HTTP/1.x. request(): status line, header line, Content-Length, a head
    over 64 KiB, an unasked 101; read()/readany(): chunked framing."""


class UpstreamDisconnected(UpstreamError):
    """The upstream closed or reset the connection. request(): before the head (a reused
    connection that fails before any byte is retried once, on a new one, first); read()/readany():
    before the body's end. Also raised by reads after release()/close() of an unfinished body."""


class _Stale(UpstreamDisconnected):
    """A reused keep-alive connection died before any response byte: the request is sent again."""


class UpstreamResponse:
    """One response: status and headers on arrival, then the body as it comes.

    The connection goes back to the pool by itself as soon as the whole body has arrived (the
    bytes stay buffered here), so release() only matters for a response not read to its end.
    """

    __slots__ = ("status", "reason", "headers", "content_length", "version", "_conn", "_chunks",
                 "_size", "_done", "_exc", "_waiter", "_all", "_body", "_read_timeout", "_total_at",
                 "_head_done", "_no_body")

    def __init__(self, conn: _Connection, no_body: bool, read_timeout: float | None, total_at: float) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _EMPTY
        self.content_length: int | None = None
        self.version = (1, 1)
        self._conn: _Connection | None = conn  # None once the body is complete or it was let go
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._exc: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._all = False  # read() wants the whole body: never pause the socket then
        self._body: bytes | None = None
        self._read_timeout = read_timeout
        self._total_at = total_at
        self._head_done = False
        self._no_body = no_body  # a HEAD request: whatever the headers say, no body follows

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason!r} done={self._done}>"

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()

    async def readany(self) -> bytes:
        """The body bytes buffered so far (waiting for some if none), b"" at the end."""
        while True:
            if self._chunks:
                return self._take()
            if self._done:
                return b""
            if self._exc is not None:
                raise self._exc
            await self._wait()

    async def read(self) -> bytes:
        """The whole body (what readany() has not already returned). Read twice, the same bytes."""
        if self._body is not None:
            return self._body
        self._all = True
        conn = self._conn
        if conn is not None:
            conn.resume()
        while not self._done:
            if self._exc is not None:
                raise self._exc
            await self._wait()
        self._body = self._take() if self._chunks else b""
        return self._body

    def release(self) -> None:
        """Done with this response. A connection still carrying its unread body is closed."""
        self._let_go()

    def close(self) -> None:
        """Close the connection if the body is still coming: the upstream stops generating."""
        self._let_go()

    @property
    def complete(self) -> bool:
        """The whole body has arrived."""
        return self._done

    # --- called by the connection ------------------------------------------------------------

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None  # the timer sees nobody waiting until the next _wait()
            if not w.done():
                w.set_result(None)

    def _push(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > HIGH_WATER and not self._all and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _end(self) -> None:
        self._done = True
        self._conn = None
        self._wake()

    def _fail(self, exc: UpstreamError) -> None:
        if self._done or self._exc is not None:
            return
        self._exc = exc
        self._conn = None
        self._wake()

    # --- internals ---------------------------------------------------------------------------

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        conn = self._conn
        if conn is not None:
            conn.resume()
        return data

    def _let_go(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._fail(UpstreamDisconnected("the response was released before its end"))
        self._chunks.clear()
        self._size = 0
        conn.close()

    async def _wait(self) -> None:
        conn = self._conn
        if conn is None:  # cannot happen while neither done nor failed; guards a logic slip
            raise UpstreamDisconnected("the response has no connection")
        deadline = self._total_at
        rt = self._read_timeout
        if rt is not None:
            idle_at = conn.loop.time() + rt
            if idle_at < deadline:
                deadline = idle_at
        conn.arm(deadline)
        fut = self._waiter = conn.loop.create_future()
        try:
            await fut
        finally:
            self._waiter = None

    async def _wait_head(self) -> None:
        while not self._head_done:
            if self._exc is not None:
                raise self._exc
            await self._wait()


_EMPTY: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class _Connection(asyncio.Protocol):
    """One upstream socket: writes requests, parses responses into the current UpstreamResponse."""

    __slots__ = ("pool", "loop", "key", "transport", "state", "reused", "_resp", "_mode", "_buf",
                 "_remaining", "_cstate", "_trailer", "_keep_alive", "_got", "_paused", "_timer",
                 "_timer_at", "deadline", "_lost")

    def __init__(self, pool: UpstreamPool, key: _Key) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.state = _CONNECTING
        self.reused = False
        self._resp: UpstreamResponse | None = None
        self._mode = _HEAD
        self._buf = b""  # an unfinished head, chunk-size line or CRLF carried to the next read
        self._remaining = 0
        self._cstate = _C_SIZE
        self._trailer = 0
        self._keep_alive = True
        self._got = False  # a byte of the current response has arrived
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF
        self.deadline = _INF
        self._lost: asyncio.Future[None] | None = None

    # --- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        resp = self._resp
        if resp is None:  # bytes nobody asked for (idle, or after a complete response)
            self.close()
            return
        self._got = True
        try:
            if self._mode == _HEAD:
                rest = self._feed_head(resp, data)
                if not rest:
                    return
                data = rest
            if self._mode == _CHUNKED:
                self._feed_chunked(resp, data)
            elif self._mode == _LENGTH:
                self._feed_length(resp, data)
            else:
                resp._push(data)
        except UpstreamProtocolError as e:
            resp._fail(e)
            self.close()

    def eof_received(self) -> bool:
        resp = self._resp
        if resp is not None and self._mode == _CLOSE:
            self._finish(resp)  # the end of a close-delimited body
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        resp = self._resp
        if resp is not None:
            self._resp = None
            if self._mode == _CLOSE and exc is None:
                resp._end()
            elif self.reused and not self._got:
                resp._fail(_Stale("the kept-alive connection was closed by the upstream"))
            else:
                why = f": {exc}" if exc is not None else ""
                resp._fail(UpstreamDisconnected(f"the upstream closed the connection mid-response{why}"))
        self._drop()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    # --- used by the pool and the response ---------------------------------------------------

    def usable(self) -> bool:
        t = self.transport
        return t is not None and not t.is_closing()

    def send(self, resp: UpstreamResponse, data: bytes, body: bytes | None) -> None:
        self._resp = resp
        self._mode = _HEAD
        self._buf = b""
        self._got = False
        self._keep_alive = True
        t = self.transport
        assert t is not None
        if body is None:
            t.write(data)
        elif len(body) < 65536:
            t.write(data + body)  # one send for the usual small JSON body
        else:
            t.writelines((data, body))

    def arm(self, deadline: float) -> None:
        """Make the timer fire by `deadline`. A later timer is kept and rechecked when it fires,
        so a connection in steady use almost never reschedules."""
        self.deadline = deadline
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def pause(self) -> None:
        t = self.transport
        if not self._paused and t is not None and not t.is_closing():
            self._paused = True
            t.pause_reading()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            t = self.transport
            if t is not None and not t.is_closing():
                t.resume_reading()

    def close(self) -> None:
        resp = self._resp
        if resp is not None:  # a reader waiting on this connection must not wait forever
            self._resp = None
            resp._fail(UpstreamDisconnected("the connection was closed mid-response"))
        if self.state == _CLOSED:
            return
        self._drop()
        t = self.transport
        if t is not None:
            t.close()

    async def wait_closed(self) -> None:
        if self.transport is None:
            return
        if self._lost is None:
            self._lost = self.loop.create_future()
        await self._lost

    # --- internals ---------------------------------------------------------------------------

    def _drop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = _INF
        if self.state != _CLOSED:
            self.pool._forget(self)
            self.state = _CLOSED

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = _INF
        deadline = self.deadline
        if deadline == _INF:
            return
        now = self.loop.time()
        if now < deadline:
            self.arm(deadline)
            return
        if self.state == _IDLE:
            self.close()  # kept alive long enough
            return
        resp = self._resp
        if resp is not None and resp._waiter is not None:
            which = "total_timeout" if now >= resp._total_at else "read_timeout"
            resp._fail(UpstreamTimeoutError(f"the upstream did not answer within its {which}"))
            self.close()

    def _finish(self, resp: UpstreamResponse) -> None:
        """The whole response has arrived: hand the connection back, or close it."""
        self._resp = None
        resp._end()
        if self._keep_alive and not self._buf and self.transport is not None:
            self.pool._put_idle(self)
        else:
            self.close()

    def _feed_head(self, resp: UpstreamResponse, data: bytes) -> bytes:
        """Parse the status line and headers; returns the bytes after them (b"" while incomplete)."""
        while True:
            buf = self._buf + data if self._buf else data
            start = len(self._buf) - 3 if len(self._buf) > 3 else 0
            end = buf.find(b"\r\n\r\n", start)
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise UpstreamProtocolError("the response head is over 64 KiB")
                self._buf = buf
                return b""
            if end > MAX_HEAD_BYTES:
                raise UpstreamProtocolError("the response head is over 64 KiB")
            self._buf = b""
            data = buf[end + 4:]
            status = self._parse_head(resp, buf[:end])
            if status >= 200:
                break
            if not data:  # an interim (1xx) response: the real one follows
                return b""
        if self._mode == _HEAD or (self._mode == _LENGTH and self._remaining == 0):  # no body
            if data:  # bytes past the response: the stream is out of step
                self._keep_alive = False
            self._finish(resp)
            return b""
        return data

    def _parse_head(self, resp: UpstreamResponse, head: bytes) -> int:
        text = head.decode("utf-8", "surrogateescape")
        newlines = text.count("\n")
        if text.count("\r\n") != newlines or text.count("\r") != newlines or "\x00" in text:
            raise UpstreamProtocolError("a bare CR, LF or NUL in the response head")
        lines = text.split("\r\n")
        line = lines[0]
        if (len(line) < 12 or not line.startswith("HTTP/1.") or line[7] not in "01" or line[8] != " "
                or not line[9:12].isdigit() or not line[9:12].isascii()
                or (len(line) > 12 and line[12] != " ")):
            raise UpstreamProtocolError(f"malformed status line {line[:80]!r}")
        status = int(line[9:12])
        if status < 100:
            raise UpstreamProtocolError(f"malformed status line {line[:80]!r}")
        if status < 200:
            if status == 101:
                raise UpstreamProtocolError("the upstream switched protocols unasked")
            return status  # interim: its headers do not matter
        pairs: list[tuple[str, str]] = []
        for raw in lines[1:]:
            name, sep, value = raw.partition(":")
            if not sep or not name or " " in name or "\t" in name:
                raise UpstreamProtocolError(f"malformed header line {raw[:80]!r}")
            pairs.append((name, value.strip(" \t")))
        headers = CIMultiDict(pairs)
        resp.status = status
        resp.reason = line[13:]
        resp.headers = CIMultiDictProxy(headers)
        minor = 1 if line[7] == "1" else 0
        resp.version = (1, minor)
        self._frame(resp, headers, status, minor)
        resp._head_done = True
        resp._wake()
        return status

    def _frame(self, resp: UpstreamResponse, headers: CIMultiDict[str], status: int, minor: int) -> None:
        """Body framing and keep-alive from the headers (RFC 9112 sections 6.3 and 9.3)."""
        connection = headers.getall("connection", None)
        tokens = ",".join(connection).lower() if connection else ""
        if minor == 1:
            self._keep_alive = "close" not in tokens
        else:
            self._keep_alive = "keep-alive" in tokens and "close" not in tokens
        lengths = headers.getall("content-length", None)
        length: int | None = None
        if lengths is not None:
            values = {v.strip() for one in lengths for v in one.split(",")}
            if len(values) != 1:
                raise UpstreamProtocolError("conflicting Content-Length values")
            (value,) = values
            if not value.isdigit() or not value.isascii() or len(value) > 18:
                raise UpstreamProtocolError(f"invalid Content-Length {value[:40]!r}")
            length = int(value)
            resp.content_length = length
        codings = headers.getall("transfer-encoding", None)
        if resp._no_body or status in (204, 304):
            self._mode = _HEAD
        elif codings is not None:
            if length is not None:
                self._keep_alive = False  # both framings given: never reuse such a connection
            if ",".join(codings).rsplit(",", 1)[-1].strip().lower() == "chunked":
                self._mode = _CHUNKED
                self._cstate = _C_SIZE
                self._trailer = 0
            else:
                self._mode = _CLOSE
                self._keep_alive = False
        elif length is not None:
            self._mode = _LENGTH
            self._remaining = length
        else:
            self._mode = _CLOSE
            self._keep_alive = False

    def _feed_length(self, resp: UpstreamResponse, data: bytes) -> None:
        n = len(data)
        if n < self._remaining:
            self._remaining -= n
            resp._push(data)
            return
        if n > self._remaining:  # bytes past the body: the stream is out of step
            data = data[: self._remaining]
            self._keep_alive = False
        self._remaining = 0
        resp._push(data)
        self._finish(resp)

    def _feed_chunked(self, resp: UpstreamResponse, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
            self._buf = b""
        out: list[bytes] = []
        pos = _whole_chunks(data, out) if self._cstate == _C_SIZE else 0
        n = len(data)
        while pos < n and self._cstate != _C_END:
            state = self._cstate
            if state == _C_DATA:
                take = min(self._remaining, n - pos)
                out.append(data[pos: pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._cstate = _C_CRLF
            elif state == _C_CRLF:
                if data[pos: pos + 2] != b"\r\n":
                    if n - pos > 1 or data[pos:] != b"\r":
                        raise UpstreamProtocolError("chunk data not followed by CRLF")
                    self._buf = data[pos:]  # the CR came alone
                    break
                pos += 2
                self._cstate = _C_SIZE
            else:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > _MAX_CHUNK_LINE:
                        raise UpstreamProtocolError("chunk-size or trailer line too long")
                    self._buf = data[pos:]
                    break
                pos = self._line(data, pos, eol, out)
        if out:
            resp._push(out[0] if len(out) == 1 else b"".join(out))
        if self._cstate == _C_END:
            if pos < n:  # bytes past the response: the stream is out of step
                self._keep_alive = False
            self._finish(resp)

    def _line(self, data: bytes, pos: int, eol: int, out: list[bytes]) -> int:
        """A chunk-size or trailer line ending at `eol`; returns where reading goes on."""
        line = data[pos:eol]
        if self._cstate != _C_SIZE:
            self._trailer_line(line)
            return eol + 2
        size = int(line, 16) if _PLAIN_HEX.fullmatch(line) else _chunk_size(line)
        end = eol + 2 + size
        if size and data[end: end + 2] == b"\r\n":  # the usual case: the whole chunk is here, one step
            out.append(data[eol + 2: end])
            return end + 2
        self._remaining = size
        self._cstate = _C_DATA if size else _C_TRAILER
        return eol + 2

    def _trailer_line(self, line: bytes) -> None:
        if line:  # a trailer field: read past, bounded
            self._trailer += len(line) + 2
            if self._trailer > _MAX_TRAILER_BYTES:
                raise UpstreamProtocolError("trailers over 64 KiB")
        else:  # the empty line after the last chunk and its trailers
            self._cstate = _C_END


_PLAIN_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")  # a chunk-size line without extensions or spaces
_WHOLE_CHUNK_HEAD = re.compile(rb"([0-9a-fA-F]{1,16})\r\n")  # the same, with its CRLF


def _whole_chunks(data: bytes, out: list[bytes]) -> int:
    """The usual read: whole chunks, each a plain size line, its data and CRLF, one match each.
    Appends their data to `out`; returns where the rest (the last chunk, a chunk not all here, a
    size line with extensions) starts, for the step-by-step decoding."""
    pos = 0
    match = _WHOLE_CHUNK_HEAD.match
    while (m := match(data, pos)) is not None:
        start = m.end()
        end = start + int(m[1], 16)
        if end == start or data[end: end + 2] != b"\r\n":
            break
        out.append(data[start:end])
        pos = end + 2
    return pos


def _chunk_size(line: bytes) -> int:
    semi = line.find(b";")
    digits = (line[:semi] if semi >= 0 else line).rstrip(b" \t")
    # int(x, 16) alone would take "0x", "_", "+" and spaces: only plain hex digits are valid
    if not digits or len(digits) > 16 or digits.lstrip(_HEX):
        raise UpstreamProtocolError(f"invalid chunk size {line[:40]!r}")
    return int(digits, 16)


def _request_head(method: str, url: URL, headers: Headers, body: bytes | None) -> bytes:
    host = url.host_port_subcomponent
    if host is None:
        raise ValueError(f"not an absolute URL: {url}")
    parts = [f"{method} {url.raw_path_qs} HTTP/1.1\r\nHost: {host}\r\n"]
    items = headers.items() if isinstance(headers, Mapping) else headers
    parts += [f"{name}: {value}\r\n" for name, value in items]
    if body is not None:
        parts.append(f"Content-Length: {len(body)}\r\n")
    elif method in _BODY_METHODS:
        parts.append("Content-Length: 0\r\n")
    parts.append("\r\n")
    text = "".join(parts)
    # One count over the whole head instead of a check per value: a CR or LF in a method, target,
    # name or value would add lines (header injection).
    lines = len(parts) + 1
    if text.count("\n") != lines or text.count("\r") != lines:
        raise ValueError("a CR or LF in the request line or a header")
    return text.encode("utf-8", "surrogateescape")


class UpstreamPool:
    """Keep-alive connections to upstreams, keyed by (scheme, host, port), unlimited in number.

    One per process, created inside the running loop; `await close()` at shutdown. An idle
    connection is closed after `keepalive_timeout` seconds, or as soon as the upstream closes it.
    """

    def __init__(self, *, keepalive_timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.keepalive_timeout = keepalive_timeout
        self._ssl = ssl_context
        self._idle: dict[_Key, list[_Connection]] = {}
        self._active: set[_Connection] = set()
        self._closed = False

    def idle_count(self) -> int:
        return sum(len(conns) for conns in self._idle.values())

    def active_count(self) -> int:
        """Connections lent to an exchange: the request is out or the body is still coming."""
        return len(self._active)

    async def request(
        self,
        method: str,
        url: URL,
        headers: Headers,
        body: bytes | None,
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; returns once the status line and headers have arrived.

        Headers go out as given, after Host and before Content-Length, which this sets: the caller
        must not pass Host, Content-Length, Transfer-Encoding or Connection. Redirects are answers
        like any other. Raises UpstreamConnectError, UpstreamTimeoutError, UpstreamProtocolError,
        UpstreamDisconnected; ValueError for a relative URL or a CR/LF in a header.
        """
        if self._closed:
            raise UpstreamConnectError("the upstream pool is closed")
        data = _request_head(method, url, headers, body)
        total_at = self.loop.time() + total_timeout if total_timeout is not None else _INF
        key = (url.scheme, url.raw_host or "", url.port or 0)
        no_body = method == "HEAD"
        conn = self._take_idle(key)
        while True:
            if conn is None:
                conn = await self._connect(key, connect_timeout, total_at)
            resp = UpstreamResponse(conn, no_body, read_timeout, total_at)
            conn.send(resp, data, body)
            try:
                await resp._wait_head()
            except _Stale:
                conn = None  # once: a new connection is never stale
                continue
            except BaseException:
                resp.close()  # cancelled or failed mid-exchange: this connection is spent
                raise
            return resp

    async def close(self) -> None:
        """Close every connection, idle or in use, and wait (briefly) until they are gone."""
        self._closed = True
        conns = [c for cs in self._idle.values() for c in cs] + list(self._active)
        for conn in conns:
            conn.close()
        waits = [asyncio.ensure_future(c.wait_closed()) for c in conns if c.transport is not None]
        if waits:
            await asyncio.wait(waits, timeout=2.0)
            for w in waits:
                w.cancel()

    # --- used by connections -----------------------------------------------------------------

    def _take_idle(self, key: _Key) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the most recent: the least likely to have been closed meanwhile
            if conn.usable():
                conn.state = _ACTIVE
                self._active.add(conn)
                return conn
            conn.state = _ACTIVE  # already out of the list; close() must not look for it there
            conn.close()
        return None

    def _put_idle(self, conn: _Connection) -> None:
        self._active.discard(conn)
        if self._closed:
            conn.state = _ACTIVE
            conn.close()
            return
        conn.resume()
        conn.state = _IDLE
        conn.reused = True
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)
        conn.arm(self.loop.time() + self.keepalive_timeout)

    def _forget(self, conn: _Connection) -> None:
        if conn.state == _ACTIVE:
            self._active.discard(conn)
        elif conn.state == _IDLE:
            idle = self._idle.get(conn.key)
            if idle is not None and conn in idle:
                idle.remove(conn)

    async def _connect(self, key: _Key, connect_timeout: float | None, total_at: float) -> _Connection:
        scheme, host, port = key
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()  # loads the CA store once, on first use
            ctx: ssl.SSLContext | None = self._ssl
        elif scheme == "http":
            ctx = None
        else:
            raise UpstreamConnectError(f"unsupported scheme {scheme!r}")
        timeout = connect_timeout
        if total_at != _INF:
            left = total_at - self.loop.time()
            timeout = left if timeout is None else min(timeout, left)
        try:
            async with asyncio.timeout(timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self, key), host, port, ssl=ctx,
                    server_hostname=host if ctx is not None else None)
        except TimeoutError:
            raise UpstreamTimeoutError(f"connecting to {host}:{port} timed out") from None
        except OSError as e:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {e}") from e
        if self._closed or not conn.usable():
            conn.close()
            raise UpstreamConnectError(f"the connection to {host}:{port} closed at once")
        conn.state = _ACTIVE
        self._active.add(conn)
        return conn
