"""Upstream HTTP/1.1 client: a keep-alive connection pool and a lean response reader.

It replaces aiohttp's ClientSession on the hot path: the request is written as bytes in one call,
the response is parsed inside the protocol callback (upstream_connection), and each connection has
one timer handle. Its errors are in upstream_errors, the pure wire format in upstream_wire.
"""
from __future__ import annotations

import asyncio
import ssl
from types import TracebackType

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .upstream_connection import ACTIVE, IDLE, Connection, PoolKey
from .upstream_errors import (
    StaleConnection,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamTimeoutError,
)
from .upstream_wire import Headers, request_head

__all__ = ["HIGH_WATER", "UpstreamPool", "UpstreamResponse"]

HIGH_WATER = 256 * 1024  # unread body bytes past which the socket is paused
_INF = float("inf")


class UpstreamResponse:
    """One response: status and headers on arrival, then the body as it comes.

    The connection goes back to the pool by itself as soon as the whole body has arrived (the
    bytes stay buffered here), so release() only matters for a response not read to its end.
    """

    __slots__ = ("status", "reason", "headers", "content_length", "version", "_conn", "_chunks",
                 "_size", "_done", "_exc", "_waiter", "_all", "_body", "_read_timeout", "_total_at",
                 "_head_done", "_no_body")

    def __init__(self, conn: Connection, no_body: bool, read_timeout: float | None, total_at: float) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _EMPTY
        self.content_length: int | None = None
        self.version = (1, 1)
        self._conn: Connection | None = conn  # None once the body is complete or it was let go
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

    @property
    def drained(self) -> bool:
        """The whole body has arrived and readany() has handed all of it out."""
        return self._done and not self._chunks

    @property
    def ready(self) -> bool:
        """readany() would answer without waiting."""
        return bool(self._chunks) or self._done or self._exc is not None

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


class UpstreamPool:
    """Keep-alive connections to upstreams, keyed by (scheme, host, port), unlimited in number.

    One per process, created inside the running loop; `await close()` at shutdown. An idle
    connection is closed after `keepalive_timeout` seconds, or as soon as the upstream closes it.
    """

    def __init__(self, *, keepalive_timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.keepalive_timeout = keepalive_timeout
        self._ssl = ssl_context
        self._idle: dict[PoolKey, list[Connection]] = {}
        self._active: set[Connection] = set()
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
        data = request_head(method, url, headers, body)
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
            except StaleConnection:
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

    def _take_idle(self, key: PoolKey) -> Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the most recent: the least likely to have been closed meanwhile
            if conn.usable():
                conn.state = ACTIVE
                self._active.add(conn)
                return conn
            conn.state = ACTIVE  # already out of the list; close() must not look for it there
            conn.close()
        return None

    def _put_idle(self, conn: Connection) -> None:
        self._active.discard(conn)
        if self._closed:
            conn.state = ACTIVE
            conn.close()
            return
        conn.resume()
        conn.state = IDLE
        conn.reused = True
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)
        conn.arm(self.loop.time() + self.keepalive_timeout)

    def _forget(self, conn: Connection) -> None:
        if conn.state == ACTIVE:
            self._active.discard(conn)
        elif conn.state == IDLE:
            idle = self._idle.get(conn.key)
            if idle is not None and conn in idle:
                idle.remove(conn)

    async def _connect(self, key: PoolKey, connect_timeout: float | None, total_at: float) -> Connection:
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
                    lambda: Connection(self, key), host, port, ssl=ctx,
                    server_hostname=host if ctx is not None else None)
        except TimeoutError:
            raise UpstreamTimeoutError(f"connecting to {host}:{port} timed out") from None
        except OSError as e:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {e}") from e
        if self._closed or not conn.usable():
            conn.close()
            raise UpstreamConnectError(f"the connection to {host}:{port} closed at once")
        conn.state = ACTIVE
        self._active.add(conn)
        return conn
