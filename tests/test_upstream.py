"""The upstream HTTP/1.1 client over real loopback sockets: framing, keep-alive, timeouts, faults."""
from __future__ import annotations

import asyncio
import inspect
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.upstream import HIGH_WATER, UpstreamPool, UpstreamResponse
from proxy.upstream_errors import (
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]




class RawServer:
    """A loopback server whose handler speaks raw bytes; counts accepted connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.closed = 0  # connections whose handler has finished
        self.tasks: set[asyncio.Task[object]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._on, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str = "/v1/x") -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path}")

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request's head and body (Content-Length framed); None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def reply(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def chunked(*parts: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n" + trailer + b"\r\n"


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"


class Servers:
    def __init__(self) -> None:
        self.servers: list[RawServer] = []

    async def start(self, handler: Handler) -> RawServer:
        server = await RawServer(handler).start()
        self.servers.append(server)
        return server

    async def stop(self) -> None:
        for s in self.servers:
            await s.stop()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    servers = Servers()
    yield servers.start
    await servers.stop()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool()
    yield p
    await p.close()


def keep_alive(answer: Callable[[bytes, bytes], bytes]) -> Handler:
    """A handler answering every request on the connection with answer(head, body)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (req := await read_request(reader)) is not None:
            writer.write(answer(*req))
            await writer.drain()
    return handler


async def get(pool: UpstreamPool, url: URL, method: str = "GET", body: bytes | None = None,
              **timeouts: float) -> tuple[UpstreamResponse, bytes]:
    resp = await pool.request(method, url, [], body, **timeouts)
    async with resp:
        return resp, await resp.read()


# --- framing -----------------------------------------------------------------------------------

async def test_content_length_headers_and_request_bytes(serve: Callable[[Handler], Awaitable[RawServer]],
                                                        pool: UpstreamPool) -> None:
    seen: list[tuple[bytes, bytes]] = []

    def answer(head: bytes, body: bytes) -> bytes:
        seen.append((head, body))
        return reply(b'{"ok":true}', "201 Created Here", "Set-Cookie: a=1\r\nset-cookie: b=2\r\nX-Empty:\r\n")

    server = await serve(keep_alive(answer))
    headers = CIMultiDict([("Authorization", "Bearer k"), ("X-Dup", "1"), ("x-dup", "2")])
    resp = await pool.request("POST", server.url("/v1/chat?a=b%20c"), headers, b'{"q":1}',
                              connect_timeout=1, read_timeout=1)
    assert (resp.status, resp.reason, resp.content_length) == (201, "Created Here", 11)
    assert resp.headers.getall("SET-COOKIE") == ["a=1", "b=2"]
    assert resp.headers["x-empty"] == ""
    assert await resp.read() == b'{"ok":true}'
    assert await resp.read() == b'{"ok":true}'  # cached, as aiohttp's read() is
    resp.release()
    head, body = seen[0]
    assert head == (f"POST /v1/chat?a=b%20c HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                    "Authorization: Bearer k\r\nX-Dup: 1\r\nx-dup: 2\r\nContent-Length: 7\r\n\r\n").encode()
    assert body == b'{"q":1}'


async def test_request_without_body(serve: Callable[[Handler], Awaitable[RawServer]], pool: UpstreamPool) -> None:
    heads: list[bytes] = []

    def answer(head: bytes, body: bytes) -> bytes:
        heads.append(head)
        return reply(b"x")

    server = await serve(keep_alive(answer))
    await get(pool, server.url(), "GET")
    await get(pool, server.url(), "POST")
    assert b"content-length" not in heads[0].lower()
    assert b"\r\nContent-Length: 0\r\n" in heads[1]


async def test_header_injection_is_refused(pool: UpstreamPool) -> None:
    with pytest.raises(ValueError):
        await pool.request("GET", URL("http://127.0.0.1:9/"), [("X-A", "v\r\nHost: evil")], None)
    with pytest.raises(ValueError):
        await pool.request("GET", URL("http://127.0.0.1:9/"), {"X-A\n": "v"}, None)
    assert pool.active_count() == 0


async def test_chunked_every_split(serve: Callable[[Handler], Awaitable[RawServer]], pool: UpstreamPool) -> None:
    """The body arrives in two reads split at every offset: inside size lines, CRLFs, data, trailers."""
    wire = CHUNKED_HEAD + chunked(b"data: one\n\n", b"x", b"data: two\n\n", trailer=b"X-T: 1\r\n")
    reads: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        split = 0
        while await read_request(reader) is not None:
            split += 1
            writer.write(wire[:split])
            await writer.drain()
            await asyncio.sleep(0.003)  # the client reads the first part on its own
            writer.write(wire[split:])
            await writer.drain()

    server = await serve(handler)
    for _ in range(len(wire) - 1):
        resp = await pool.request("GET", server.url(), [], None, read_timeout=2)
        got = []
        while chunk := await resp.readany():
            got.append(chunk)
        reads.append(len(got))
        resp.release()
        assert b"".join(got) == b"data: one\n\nxdata: two\n\n"
        assert resp.content_length is None
    assert server.accepted == 1  # every split left the connection reusable
    assert max(reads) == 2


async def test_chunked_byte_by_byte(serve: Callable[[Handler], Awaitable[RawServer]], pool: UpstreamPool) -> None:
    body = chunked(b"a" * 20, b"hello", b"\r\n\r\n")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_HEAD)
        for i in range(len(body)):
            writer.write(body[i: i + 1])
            await writer.drain()
            await asyncio.sleep(0.0005)

    server = await serve(handler)
    _, data = await get(pool, server.url(), read_timeout=2)
    assert data == b"a" * 20 + b"hello\r\n\r\n"
    assert pool.idle_count() == 1


@pytest.mark.parametrize("body", [
    b"zz\r\nab\r\n0\r\n\r\n",  # not hex
    b"0x2\r\nab\r\n0\r\n\r\n",  # int(x, 16) would take it
    b"2\r\nabXY0\r\n\r\n",  # no CRLF after the data
    b"-2\r\nab\r\n0\r\n\r\n",
])
async def test_bad_chunk_framing(serve: Callable[[Handler], Awaitable[RawServer]], pool: UpstreamPool,
                                 body: bytes) -> None:
    server = await serve(keep_alive(lambda head, b: CHUNKED_HEAD + body))
    resp = await pool.request("GET", server.url(), [], None)
    with pytest.raises(UpstreamProtocolError):
        await resp.read()
    assert pool.active_count() == pool.idle_count() == 0


async def test_close_delimited(serve: Callable[[Handler], Awaitable[RawServer]], pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst ")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"second")
        await writer.drain()

    server = await serve(handler)
    resp, data = await get(pool, server.url(), read_timeout=2)
    assert data == b"first second"
    assert resp.content_length is None
    assert pool.idle_count() == 0 and pool.active_count() == 0


async def test_connection_close_header_is_honoured(serve: Callable[[Handler], Awaitable[RawServer]],
                                                   pool: UpstreamPool) -> None:
    server = await serve(keep_alive(lambda head, body: reply(b"bye", extra="Connection: close\r\n")))
    assert (await get(pool, server.url()))[1] == b"bye"
    assert (await get(pool, server.url()))[1] == b"bye"
    assert server.accepted == 2 and pool.idle_count() == 0


async def test_head_204_304_have_no_body(serve: Callable[[Handler], Awaitable[RawServer]],
                                         pool: UpstreamPool) -> None:
    def answer(head: bytes, body: bytes) -> bytes:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        if b"/204" in head:
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        return b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"

    server = await serve(keep_alive(answer))
    resp, data = await get(pool, server.url(), "HEAD")
    assert (resp.status, resp.content_length, data) == (200, 1000, b"")
    resp, data = await get(pool, server.url("/204"))
    assert (resp.status, data) == (204, b"")
    resp, data = await get(pool, server.url("/304"))
    assert (resp.status, data) == (304, b"")
    assert server.accepted == 1 and pool.idle_count() == 1


async def test_interim_1xx_is_skipped(serve: Callable[[Handler], Awaitable[RawServer]], pool: UpstreamPool) -> None:
    server = await serve(keep_alive(lambda head, body: b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                                    + reply(b"final")))
    resp, data = await get(pool, server.url())
    assert (resp.status, data) == (200, b"final")
    assert "link" not in resp.headers


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/2.0 200 OK\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
    b"HTTP/1.1 20x OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Name: v\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno-colon\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
    b"HTTP/1.1 200 OK\nX: a\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
])
async def test_malformed_head(serve: Callable[[Handler], Awaitable[RawServer]], pool: UpstreamPool,
                              head: bytes) -> None:
    server = await serve(keep_alive(lambda h, b: head))
    with pytest.raises(UpstreamProtocolError):
        await pool.request("GET", server.url(), [], None, read_timeout=2)
    assert pool.active_count() == pool.idle_count() == 0


async def test_head_without_end_is_bounded(serve: Callable[[Handler], Awaitable[RawServer]],
                                           pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        while True:  # headers forever
            writer.write(b"X-Pad: " + b"p" * 1000 + b"\r\n")
            await writer.drain()

    server = await serve(handler)
    with pytest.raises(UpstreamProtocolError, match="64 KiB"):
        await pool.request("GET", server.url(), [], None, read_timeout=2)


# --- keep-alive ------------------------------------------------------------------------------

async def test_keep_alive_reuses_one_connection(serve: Callable[[Handler], Awaitable[RawServer]],
                                                pool: UpstreamPool) -> None:
    server = await serve(keep_alive(lambda head, body: reply(body)))
    for i in range(5):
        assert (await get(pool, server.url(), "POST", b"%d" % i))[1] == b"%d" % i
    assert server.accepted == 1
    assert (pool.idle_count(), pool.active_count()) == (1, 0)


async def test_connection_returns_to_pool_when_body_arrives(serve: Callable[[Handler], Awaitable[RawServer]],
                                                            pool: UpstreamPool) -> None:
    server = await serve(keep_alive(lambda head, body: reply(b"retry later", "429 Too Many Requests")))
    resp = await pool.request("GET", server.url(), [], None)
    assert resp.complete and pool.idle_count() == 1  # before anyone read the body
    resp.release()  # as a retry loop does with an answer it will not relay
    await get(pool, server.url())
    assert server.accepted == 1


async def test_idle_connection_closed_by_server_then_next_request_succeeds(
        serve: Callable[[Handler], Awaitable[RawServer]], pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await read_request(reader)
        assert req is not None
        writer.write(reply(b"once"))
        await writer.drain()  # then close: the server's keep-alive timer ran out

    server = await serve(handler)
    await get(pool, server.url())
    await asyncio.sleep(0.05)
    assert pool.idle_count() == 0  # the upstream's FIN was noticed while idle
    assert (await get(pool, server.url()))[1] == b"once"
    assert server.accepted == 2


async def test_stale_connection_is_retried_once(serve: Callable[[Handler], Awaitable[RawServer]],
                                                pool: UpstreamPool) -> None:
    """The request goes out on a connection the server is closing: it is sent again on a new one."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(b"first"))
        await writer.drain()
        await read_request(reader)  # a request arrives just as the server gives up on the connection
        writer.transport.abort()

    server = await serve(handler)
    await get(pool, server.url())
    assert (await get(pool, server.url(), "POST", b"{}"))[1] == b"first"  # on the second connection
    assert server.accepted == 2


async def test_fresh_connection_closed_before_reply_is_not_retried(
        serve: Callable[[Handler], Awaitable[RawServer]], pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    server = await serve(handler)
    with pytest.raises(UpstreamDisconnected):
        await pool.request("POST", server.url(), [], b"{}")
    assert server.accepted == 1


async def test_keepalive_timeout_closes_idle_connections(serve: Callable[[Handler], Awaitable[RawServer]]) -> None:
    server = await serve(keep_alive(lambda head, body: reply(b"x")))
    p = UpstreamPool(keepalive_timeout=0.1)
    try:
        await get(p, server.url())
        assert p.idle_count() == 1
        await asyncio.sleep(0.3)
        assert p.idle_count() == 0
        assert server.closed == 1  # the server saw the connection go
    finally:
        await p.close()


# --- failures --------------------------------------------------------------------------------

async def test_connect_refused(pool: UpstreamPool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamConnectError):
        await pool.request("GET", URL(f"http://127.0.0.1:{port}/"), [], None, connect_timeout=1)
    assert pool.active_count() == 0


async def test_connect_timeout(pool: UpstreamPool) -> None:
    """A listener whose accept queue is full drops further SYNs: the connect hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fill = [socket.socket() for _ in range(3)]
        try:
            for s in fill:
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
            await asyncio.sleep(0.05)
            with pytest.raises(UpstreamTimeoutError, match="connecting"):
                await pool.request("GET", URL(f"http://127.0.0.1:{port}/"), [], None, connect_timeout=0.2)
        finally:
            for s in fill:
                s.close()
    assert pool.active_count() == 0


async def test_headers_idle_timeout(serve: Callable[[Handler], Awaitable[RawServer]], pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(10)

    server = await serve(handler)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(UpstreamTimeoutError) as info:
        await pool.request("GET", server.url(), [], None, read_timeout=0.1)
    assert 0.09 < loop.time() - t0 < 1.0
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, UpstreamError)
    assert pool.active_count() == 0


async def test_idle_read_timeout_mid_body(serve: Callable[[Handler], Awaitable[RawServer]],
                                          pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_HEAD)
        for _ in range(6):  # longer in total than the idle timeout, never idle that long
            writer.write(chunked(b"tick")[:-5])
            await writer.drain()
            await asyncio.sleep(0.1)
        await reader.read()  # then silent, until the client goes

    server = await serve(handler)
    resp = await pool.request("GET", server.url(), [], None, read_timeout=0.3)
    got = b""
    with pytest.raises(UpstreamTimeoutError, match="read_timeout"):
        while chunk := await resp.readany():
            got += chunk
    assert got == b"tick" * 6
    resp.release()
    assert pool.active_count() == 0
    await asyncio.sleep(0.05)
    assert server.closed == 1


async def test_total_timeout_bounds_read(serve: Callable[[Handler], Awaitable[RawServer]],
                                         pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):  # a byte every 20 ms: never idle, never done in time
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.02)

    server = await serve(handler)
    resp = await pool.request("GET", server.url(), [], None, read_timeout=2, total_timeout=0.2)
    with pytest.raises(UpstreamTimeoutError, match="total_timeout"):
        await resp.read()


async def test_reset_mid_stream(serve: Callable[[Handler], Awaitable[RawServer]], pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_HEAD + b"5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST

    server = await serve(handler)
    resp = await pool.request("GET", server.url(), [], None, read_timeout=2)
    assert await resp.readany() == b"hello"
    with pytest.raises(UpstreamDisconnected):
        await resp.readany()
    resp.close()
    assert pool.active_count() == pool.idle_count() == 0


async def test_eof_mid_content_length_body(serve: Callable[[Handler], Awaitable[RawServer]],
                                           pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
        await writer.drain()

    server = await serve(handler)
    resp = await pool.request("GET", server.url(), [], None, read_timeout=2)
    with pytest.raises(UpstreamDisconnected):
        await resp.read()


async def test_close_stops_the_upstream(serve: Callable[[Handler], Awaitable[RawServer]], pool: UpstreamPool) -> None:
    stopped = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_HEAD)
        try:
            while True:  # an endless generation
                writer.write(chunked(b"data: token\n\n")[:-5])
                await writer.drain()
                await asyncio.sleep(0.005)
        except ConnectionError:
            stopped.set()
            raise

    server = await serve(handler)
    resp = await pool.request("POST", server.url(), [], b"{}", read_timeout=2)
    assert (await resp.readany()).startswith(b"data: token")
    resp.close()
    assert pool.active_count() == 0
    await asyncio.wait_for(stopped.wait(), 2)
    with pytest.raises(UpstreamDisconnected):
        await resp.readany()
    assert server.accepted == 1


async def test_release_before_end_closes_the_connection(serve: Callable[[Handler], Awaitable[RawServer]],
                                                        pool: UpstreamPool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_HEAD + b"3\r\nabc\r\n")
        await writer.drain()
        await reader.read()  # until the client goes

    server = await serve(handler)
    async with await pool.request("GET", server.url(), [], None) as resp:
        assert await resp.readany() == b"abc"
    assert pool.idle_count() == pool.active_count() == 0
    await asyncio.sleep(0.05)
    assert server.closed == 1


async def test_flow_control_pauses_reading(serve: Callable[[Handler], Awaitable[RawServer]],
                                           pool: UpstreamPool) -> None:
    big = bytes(range(256)) * (128 * 1024)  # 32 MiB: more than loopback's socket buffers hold
    backlog: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_HEAD + chunked(big))
        await asyncio.sleep(0.3)
        backlog.append(writer.transport.get_write_buffer_size())
        await writer.drain()

    server = await serve(handler)
    resp = await pool.request("GET", server.url(), [], None, read_timeout=5)
    await asyncio.sleep(0.4)  # the client reads nothing meanwhile
    assert backlog and backlog[0] > 1024 * 1024  # the server could not hand it all over
    got = bytearray()
    largest = 0
    while chunk := await resp.readany():
        largest = max(largest, len(chunk))
        got += chunk
    assert got == big
    assert largest < HIGH_WATER + 1024 * 1024  # at most one socket read past the mark
    assert pool.idle_count() == 1


async def test_concurrent_requests(pool: UpstreamPool) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        await asyncio.sleep(0.01)
        if request.query.get("stream"):
            resp = web.StreamResponse()
            await resp.prepare(request)
            for b in body:
                await resp.write(bytes([b]))
            await resp.write_eof()
            return resp
        return web.Response(body=body[::-1], headers={"X-Len": str(len(body))})

    app = web.Application()
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def one(i: int) -> None:
        body = b"request-%03d" % i
        url = URL(f"http://127.0.0.1:{port}/echo" + ("?stream=1" if i % 2 else ""))
        async with await pool.request("POST", url, [("Content-Type", "text/plain")], body,
                                      connect_timeout=2, read_timeout=2) as resp:
            assert resp.status == 200
            if i % 2:
                got = b""
                while chunk := await resp.readany():
                    got += chunk
                assert got == body
            else:
                assert await resp.read() == body[::-1]
                assert resp.headers["x-len"] == str(len(body))

    try:
        await asyncio.gather(*(one(i) for i in range(50)))
        assert pool.active_count() == 0
        assert pool.idle_count() == 50
        await asyncio.gather(*(one(i) for i in range(50)))  # the second wave reuses them
        assert pool.idle_count() == 50
    finally:
        await pool.close()
        await runner.cleanup()


async def test_pool_close(serve: Callable[[Handler], Awaitable[RawServer]]) -> None:
    server = await serve(keep_alive(lambda head, body: reply(b"x")))
    p = UpstreamPool()
    await get(p, server.url())
    assert p.idle_count() == 1
    await p.close()
    assert p.idle_count() == p.active_count() == 0
    with pytest.raises(UpstreamConnectError):
        await p.request("GET", server.url(), [], None)


async def test_pool_close_wakes_a_waiting_reader(serve: Callable[[Handler], Awaitable[RawServer]]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED_HEAD + b"3\r\nabc\r\n")
        await writer.drain()
        await reader.read()

    server = await serve(handler)
    p = UpstreamPool()
    resp = await p.request("GET", server.url(), [], None)
    assert await resp.readany() == b"abc"
    waiting = asyncio.ensure_future(resp.readany())
    await asyncio.sleep(0.01)
    await p.close()
    with pytest.raises(UpstreamDisconnected):
        await asyncio.wait_for(waiting, 1)


async def test_https(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    accepted = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await keep_alive(lambda head, body: reply(b"secure " + head.split(b"\r\n")[1]))(reader, writer)
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(cert))
    p = UpstreamPool(ssl_context=client_ctx)
    try:
        for _ in range(2):
            _, data = await get(p, URL(f"https://localhost:{port}/v1"), connect_timeout=5, read_timeout=5)
            assert data == f"secure Host: localhost:{port}".encode()
        assert accepted == 1
        untrusting = UpstreamPool()
        with pytest.raises(UpstreamConnectError):  # an unknown certificate authority
            await untrusting.request("GET", URL(f"https://localhost:{port}/"), [], None, connect_timeout=5)
    finally:
        await untrusting.close()
        await p.close()
        server.close()
        await server.wait_closed()


# --- the same on uvloop, which the proxy serves on (its transports differ in details) ----------

UVLOOP_CASES = [
    test_content_length_headers_and_request_bytes, test_chunked_every_split, test_chunked_byte_by_byte,
    test_close_delimited, test_head_204_304_have_no_body, test_head_without_end_is_bounded,
    test_connection_returns_to_pool_when_body_arrives,
    test_idle_connection_closed_by_server_then_next_request_succeeds, test_stale_connection_is_retried_once,
    test_fresh_connection_closed_before_reply_is_not_retried, test_keepalive_timeout_closes_idle_connections,
    test_connect_refused, test_connect_timeout, test_headers_idle_timeout, test_idle_read_timeout_mid_body,
    test_total_timeout_bounds_read, test_reset_mid_stream, test_eof_mid_content_length_body,
    test_close_stops_the_upstream, test_release_before_end_closes_the_connection,
    test_flow_control_pauses_reading, test_concurrent_requests, test_pool_close,
    test_pool_close_wakes_a_waiting_reader, test_https,
]


@pytest.mark.parametrize("case", UVLOOP_CASES, ids=lambda f: f.__name__[5:])
def test_on_uvloop(case: Callable[..., Awaitable[None]], tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        servers = Servers()
        pool = UpstreamPool()
        offered = {"serve": servers.start, "pool": pool, "tmp_path": tmp_path}
        try:
            await case(**{name: offered[name] for name in inspect.signature(case).parameters})
        finally:
            await pool.close()
            await servers.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
