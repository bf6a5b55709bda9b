"""The floor: a bare aiohttp pass-through forwarder with one ClientSession and no parsing.

Whatever a metering proxy costs is measured against this: the same framework, the same upstream
connection pool, bodies relayed as bytes (streams chunk by chunk) and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator, Mapping

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from multidict import CIMultiDict

# Hop-by-hop headers (RFC 9110 7.6.1) plus those aiohttp recomputes for the new message.
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)

SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def _copy_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in _DROP:
            out.add(name, value)
    return out


async def forward(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    body = await request.read()
    async with session.request(
        request.method,
        request.app[UPSTREAM] + request.path_qs,
        data=body,
        headers=_copy_headers(request.headers),
        allow_redirects=False,
    ) as upstream:
        headers = _copy_headers(upstream.headers)
        if upstream.content_length is not None:
            return web.Response(status=upstream.status, body=await upstream.read(), headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    # No total timeout: a long stream is not a hung one; the pool is unbounded like a proxy's.
    app[SESSION] = ClientSession(
        connector=TCPConnector(limit=0, keepalive_timeout=60),
        timeout=ClientTimeout(total=None, sock_connect=5, sock_read=60),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )
    yield
    await app[SESSION].close()


def build_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    runner = web.AppRunner(build_app(upstream), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
    await site.start()
    print(f"floor listening on http://{host}:{port} -> {upstream}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9998)
    p.add_argument("--upstream", default="http://127.0.0.1:9999", help="base URL requests go to")
    args = p.parse_args(argv)
    coro = serve(args.host, args.port, args.upstream)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    main()
