"""Forward: send a request upstream on the app's one UpstreamPool, with the real key and timeouts.

Only configured upstreams are ever reached: the URL is the provider's base_url plus the routed
path; redirects are not followed; client auth headers and hop-by-hop headers never go upstream.
"""
from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .errors import UpstreamTimeout, UpstreamUnreachable
from .providers import Adapter, Call
from .providers.base import CLIENT_KEY_HEADERS
from .upstream import UpstreamPool, UpstreamResponse
from .upstream_errors import UpstreamError, UpstreamTimeoutError

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "trailers", "transfer-encoding", "upgrade", "proxy-connection"}
)
_URL_CACHE_MAX = 1024  # distinct paths per provider whose upstream URL is kept
# Request headers the proxy sets itself (or must not pass on).
_DROP_REQUEST = HOP_BY_HOP | frozenset(CLIENT_KEY_HEADERS) | frozenset(
    {"host", "content-length", "accept-encoding", "x-meterproxy-user", "forwarded", "x-forwarded-for",
     "x-forwarded-host", "x-forwarded-proto", "expect"}
)


def upstream_headers(request: web.Request, adapter: Adapter) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        lname = name.lower()
        if lname not in _DROP_REQUEST:
            headers.add(name, value)
    connection = request.headers.get("connection", "")
    for token in connection.split(","):  # headers named in Connection are hop-by-hop too
        headers.popall(token.strip(), None)
    adapter.set_auth(headers)
    return headers


def upstream_url(adapter: Adapter, path: str, request: web.Request) -> URL:
    # Built from the configured base URL only: the client's raw path is appended, never parsed as
    # a URL, so no request line or Host header can point the proxy anywhere else.
    plain = not request.query_string
    if plain:  # the usual call (no query): one URL per path, built once
        url = adapter.url_cache.get(path)
        if url is not None:
            return url
    base = adapter.base
    # The adapter may add to the query (Azure's api-version) or drop from it (Gemini's key).
    url = base.with_path(base.raw_path.rstrip("/") + (path or "/"), encoded=True).with_query(
        adapter.upstream_query(request.query))
    if not plain:
        return url
    if len(adapter.url_cache) >= _URL_CACHE_MAX:
        adapter.url_cache.clear()
    adapter.url_cache[path] = url
    return url


async def send(
    pool: UpstreamPool,
    adapter: Adapter,
    call: Call,
    path: str,
    request: web.Request,
    body: bytes | None,
) -> UpstreamResponse:
    """Open the upstream exchange; raises our 502/504 errors, never the client's."""
    timeout = adapter.stream_timeout if call.stream else adapter.body_timeout
    url = upstream_url(adapter, path, request)
    try:
        return await pool.request(
            request.method,
            url,
            upstream_headers(request, adapter),
            body,
            connect_timeout=timeout.sock_connect,
            read_timeout=timeout.sock_read,
            total_timeout=timeout.total,
        )
    except UpstreamTimeoutError:
        raise UpstreamTimeout(f"The upstream provider {adapter.name!r} did not answer in time.") from None
    except UpstreamError as e:
        raise UpstreamUnreachable(
            f"The upstream provider {adapter.name!r} could not be reached ({type(e).__name__})."
        ) from None
