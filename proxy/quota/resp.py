"""A lean pipelined RESP2 client for the Redis store (its hot script calls above all): commands
packed by hiredis, written together once per loop turn, replies parsed by `hiredis.Reader` and
matched in order to waiting futures.

redis-py spends 60–100 µs of Python per call (encoding, pool, timeouts, a task per pipeline);
this spends a few. Many calls share one connection in flight, so nothing waits for a free one.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import hiredis

from proxy.errors import StoreError

Arg = str | bytes | int | float
Command = tuple[Arg, ...]  # one command: its name and arguments


class NoScript(StoreError):
    """NOSCRIPT: the server lost its script cache (restart, failover); EVAL reloads it."""


class ConnectionLost(StoreError):
    """The connection closed with the call in flight (or before it went out): safe to retry once
    for idempotent commands."""


def pack(command: tuple[Arg, ...]) -> bytes:
    """One command as RESP bytes (a C loop in hiredis: 6x faster than redis-py's encoder)."""
    return hiredis.pack_command(command)  # type: ignore[arg-type]  # the stub types a 1-tuple


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect: TCP host and port, or a unix socket path; AUTH and SELECT."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0


def endpoint_from_url(url: str) -> Endpoint | None:
    """`redis://[[user]:pass@]host[:port][/db]` or `unix://[[user]:pass@]/path[?db=N]`; None for
    anything else (TLS, extra options), which stays with redis-py."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if set(query) - {"db"} or parts.scheme not in ("redis", "unix") or parts.fragment:
        return None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    try:
        db = int(query.get("db") or (parts.path.lstrip("/") if parts.scheme == "redis" else "") or 0)
        if parts.scheme == "unix":
            return Endpoint(path=unquote(parts.path), username=user, password=password, db=db) \
                if parts.path else None
        return Endpoint(host=parts.hostname or "127.0.0.1", port=parts.port or 6379,
                        username=user, password=password, db=db)
    except ValueError:  # a bad port or db: let redis-py report it its own way
        return None


class RespConnection(asyncio.Protocol):
    """One connection; `send` queues a packed command for this loop turn's write and returns the
    future of its reply.

    Replies arrive in order, so futures wait in a FIFO. A caller that gives up leaves its future
    in place (it is resolved and ignored), so later replies still meet their own callers. When no
    reply comes for `timeout` seconds while calls wait, or the connection closes, every waiting
    call fails with `StoreError` and the connection is done for.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._out: list[bytes] = []  # commands of this loop turn, written together when it ends
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._progress = 0.0  # loop time of the last reply, or when the queue last went non-empty
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        fut = self._loop.create_future()
        if self._transport is None:  # closed, or not yet made
            fut.set_exception(ConnectionLost("redis connection is closed"))
            return fut
        if not self._waiting:
            self._progress = self._loop.time()
            if self._watchdog is None:
                self._watchdog = self._loop.call_at(self._progress + self._timeout, self._check)
        self._waiting.append(fut)
        if not self._out:  # one write (one syscall) per loop turn, not one per command
            self._loop.call_soon(self._flush)
        self._out.append(payload)
        return fut

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and out:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))

    def close(self) -> None:
        """Not a `ConnectionLost`: calls cut off by a deliberate close are not retried."""
        self._fail(StoreError("redis connection closed by the client"))

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        try:
            reply = reader.gets()
            while reply is not False:
                if not waiting:
                    raise hiredis.ProtocolError("a reply nobody asked for")
                fut = waiting.popleft()
                if not fut.done():  # done: its caller gave up (a timeout); the reply is dropped
                    if type(reply) is hiredis.ReplyError:
                        fut.set_exception(_reply_error(reply))
                    else:
                        fut.set_result(reply)
                reply = reader.gets()
        except hiredis.HiredisError as exc:
            self._fail(StoreError(f"redis protocol error: {exc}"))
            return
        self._progress = self._loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None  # nothing left to abort
        self._fail(ConnectionLost(f"redis connection lost: {exc or 'closed by the server'}"))

    # ------------------------------------------------------------ failure
    def _check(self) -> None:
        """The read timeout, checked every `timeout` at most, not armed per call."""
        self._watchdog = None
        if self.closed or not self._waiting:
            return
        due = self._progress + self._timeout
        if self._loop.time() >= due:
            self._fail(StoreError(f"redis did not answer within {self._timeout}s"))
        else:
            self._watchdog = self._loop.call_at(due, self._check)

    def _fail(self, exc: StoreError) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiting, self._waiting = self._waiting, deque()
        self._out = []
        for fut in waiting:
            if not fut.done():
                fut.set_exception(exc)
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()  # no graceful close: whatever is still queued is moot


def _reply_error(reply: hiredis.ReplyError) -> StoreError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScript(message)
    return StoreError(f"redis error: {message}")


async def connect(endpoint: Endpoint, timeout: float) -> RespConnection:
    """Open, AUTH and SELECT within `timeout` (the handshake's replies under the connection's own
    read timeout); any failure is a `StoreError`."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            if endpoint.path is not None:
                _, conn = await loop.create_unix_connection(lambda: RespConnection(timeout),
                                                            endpoint.path)
            else:
                _, conn = await loop.create_connection(lambda: RespConnection(timeout),
                                                       endpoint.host, endpoint.port)
    except (OSError, TimeoutError) as exc:
        raise StoreError(f"cannot connect to redis: {exc or type(exc).__name__}") from exc
    hello: list[asyncio.Future[Any]] = []
    if endpoint.password is not None:
        auth = ("AUTH", endpoint.username, endpoint.password) if endpoint.username \
            else ("AUTH", endpoint.password)
        hello.append(conn.send(pack(auth)))
    if endpoint.db:
        hello.append(conn.send(pack(("SELECT", endpoint.db))))
    try:
        for fut in hello:
            await fut
    except BaseException:
        conn.close()
        raise
    return conn


class RespClient:
    """A connection that reopens itself: one connect attempt at a time, shared by every caller
    who needs it, and one retry for a call whose connection closed under it (only for commands
    that are safe to repeat, like the store's idempotent scripts)."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self._endpoint = endpoint
        self._timeout = timeout
        self._conn: RespConnection | None = None
        self._opening: asyncio.Task[RespConnection] | None = None
        self._closed = False

    def open_connection(self) -> RespConnection | None:
        """The connection, if it is open now (None: `call` would have to wait for one)."""
        conn = self._conn
        return conn if conn is not None and not conn.closed else None

    async def call(self, payload: bytes) -> Any:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self.connection()
        try:
            return await conn.send(payload)
        except ConnectionLost:  # Redis closed it (restart, idle kill): once more, on a new one
            conn = await self.connection()
            return await conn.send(payload)

    async def call_many(self, payloads: Sequence[bytes], *, retry: bool = True) -> list[Any]:
        """Several commands in one write, their replies in order; `retry`: the whole batch once
        more if its connection closed under it (only for commands that are safe to repeat)."""
        try:
            return await self._send_all(payloads)
        except ConnectionLost:
            if not retry:
                raise
            return await self._send_all(payloads)

    async def _send_all(self, payloads: Sequence[bytes]) -> list[Any]:
        """Every reply is waited for before the first error is raised: none is left unretrieved."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self.connection()
        replies = await asyncio.gather(*[conn.send(p) for p in payloads], return_exceptions=True)
        failed = next((r for r in replies if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        return replies

    async def connection(self) -> RespConnection:
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._closed:
            raise StoreError("redis client is closed")
        if self._opening is None:
            self._opening = asyncio.get_running_loop().create_task(self._open())
            self._opening.add_done_callback(_retrieved)
        # shield: a caller that gives up must not cancel the attempt the others wait on
        return await asyncio.shield(self._opening)

    async def _open(self) -> RespConnection:
        try:
            conn = await connect(self._endpoint, self._timeout)
        finally:
            self._opening = None
        if self._closed:  # closed while connecting: the waiters fail, nothing is left open
            conn.close()
            raise StoreError("redis client is closed")
        self._conn = conn
        return conn

    def close(self) -> None:
        """For good: calls in flight fail and later ones raise `StoreError` (an attempt to connect
        still under way is left to finish, then closed, so its waiters are not cancelled)."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _retrieved(task: asyncio.Task[RespConnection]) -> None:
    if not task.cancelled():
        task.exception()  # seen by whoever awaited it; no "never retrieved" warning otherwise

