"""HTTP/1.1 wire format, as pure functions over bytes: the request head we send and the
chunk framing of a chunked response body (RFC 9112 sections 3, 5 and 7.1)."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from yarl import URL

from .upstream_errors import UpstreamProtocolError

__all__ = ["Headers", "chunk_size", "request_head", "whole_chunks"]

Headers = Mapping[str, str] | Iterable[tuple[str, str]]

_HEX = b"0123456789abcdefABCDEF"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# a chunk-size line without extensions or spaces, with its CRLF
_WHOLE_CHUNK_HEAD = re.compile(rb"([0-9a-fA-F]{1,16})\r\n")


def request_head(method: str, url: URL, headers: Headers, body: bytes | None) -> bytes:
    """The request line and headers, Host first and Content-Length last, as bytes to send.
    ValueError for a relative URL or a CR/LF that would add a line."""
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


def whole_chunks(data: bytes, out: list[bytes]) -> int:
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


def chunk_size(line: bytes) -> int:
    """The size on a chunk-size line that may carry extensions or trailing blanks."""
    semi = line.find(b";")
    digits = (line[:semi] if semi >= 0 else line).rstrip(b" \t")
    # int(x, 16) alone would take "0x", "_", "+" and spaces: only plain hex digits are valid
    if not digits or len(digits) > 16 or digits.lstrip(_HEX):
        raise UpstreamProtocolError(f"invalid chunk size {line[:40]!r}")
    return int(digits, 16)
