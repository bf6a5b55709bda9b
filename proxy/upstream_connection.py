"""One upstream socket: an asyncio protocol that writes a request and parses the HTTP/1.1
response (head, then a length, chunked or close-delimited body) into the UpstreamResponse it
serves, with one timer handle for idle and read deadlines."""
from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, cast

from multidict import CIMultiDict, CIMultiDictProxy

from .upstream_errors import (
    StaleConnection,
    UpstreamDisconnected,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from .upstream_wire import chunk_size, whole_chunks

if TYPE_CHECKING:
    from .upstream import UpstreamPool, UpstreamResponse

__all__ = ["ACTIVE", "CLOSED", "CONNECTING", "IDLE", "MAX_HEAD_BYTES", "Connection", "PoolKey"]

MAX_HEAD_BYTES = 64 * 1024
_MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
_MAX_TRAILER_BYTES = 64 * 1024
_INF = float("inf")
# A chunk-size line without extensions or spaces. Compiled here, not imported: CPython 3.11 calls a
# method of an imported name through a bound-method object (no LOAD_METHOD), once per chunk line.
_PLAIN_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")

# Body framing of the response being read (RFC 9112 section 6.3).
_HEAD, _LENGTH, _CHUNKED, _CLOSE = range(4)
# Where the chunked decoder is.
_C_SIZE, _C_DATA, _C_CRLF, _C_TRAILER, _C_END = range(5)
# Where a connection is: in a pool list, lent to one exchange, or gone.
CONNECTING, IDLE, ACTIVE, CLOSED = range(4)

PoolKey = tuple[str, str, int]


class Connection(asyncio.Protocol):
    """One upstream socket: writes requests, parses responses into the current UpstreamResponse."""

    __slots__ = ("pool", "loop", "key", "transport", "state", "reused", "_resp", "_mode", "_buf",
                 "_remaining", "_cstate", "_trailer", "_keep_alive", "_got", "_paused", "_timer",
                 "_timer_at", "deadline", "_lost")

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.state = CONNECTING
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
                resp._fail(StaleConnection("the kept-alive connection was closed by the upstream"))
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
        if self.state == CLOSED:
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
        if self.state != CLOSED:
            self.pool._forget(self)
            self.state = CLOSED

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
        if self.state == IDLE:
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
        pos = whole_chunks(data, out) if self._cstate == _C_SIZE else 0
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
        size = int(line, 16) if _PLAIN_HEX.fullmatch(line) else chunk_size(line)
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
