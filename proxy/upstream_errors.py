"""The upstream HTTP/1.1 client's exceptions: one tree under UpstreamError, raised by the pool, its
connections and the responses they fill. Adapters above catch these and raise the proxy's own."""
from __future__ import annotations

__all__ = ["UpstreamConnectError", "UpstreamDisconnected", "UpstreamError", "UpstreamProtocolError",
           "UpstreamTimeoutError"]


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


class StaleConnection(UpstreamDisconnected):
    """A reused keep-alive connection died before any response byte: the request is sent again.
    Internal to the client (request() catches it), so not in __all__."""
