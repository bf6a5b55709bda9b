"""Closed-loop load for the benchmark: wrk for plain requests, a small asyncio client for streams.

wrk is driven by a generated Lua script (POST body, rotating keys or end users) whose done() hook
prints one JSON line of counts and latency percentiles. The stream client speaks raw HTTP/1.1 on
keep-alive connections so that it stays cheap next to the upstream on the shared core.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import TRUSTED_KEY, key_name


@dataclass(frozen=True)
class Identity:
    """How the load presents itself: rotating over `keys` virtual keys, or over `users` end users
    named through the trusted backend key (x-meterproxy-user)."""

    keys: int = 1
    users: int = 0

    def headers(self, i: int) -> list[tuple[str, str]]:
        if self.users > 0:
            return [("Authorization", f"Bearer {TRUSTED_KEY}"), ("x-meterproxy-user", f"user-{i % self.users}")]
        return [("Authorization", f"Bearer {key_name(i % self.keys + 1)}")]

    @property
    def rotating(self) -> bool:
        return self.users > 1 or self.keys > 1


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def _lua_string(data: bytes) -> str:
    # Decimal escapes keep any byte safe inside a Lua string literal.
    return '"' + "".join(f"\\{b}" for b in data) + '"'


def wrk_script(path: Path, body: bytes, ident: Identity) -> Path:
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {_lua_string(body)}",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    if not ident.rotating:
        for name, value in ident.headers(0):
            lines.append(f'wrk.headers["{name}"] = "{value}"')
    else:
        # request() makes wrk build each request: one header set per key or user, round robin,
        # each thread starting at a random offset so threads do not march in step.
        n = ident.users if ident.users > 0 else ident.keys
        if ident.users > 0:
            set_headers = (
                f'wrk.headers["Authorization"] = "Bearer {TRUSTED_KEY}"\n'
                '  wrk.headers["x-meterproxy-user"] = "user-" .. i'
            )
        else:
            set_headers = 'wrk.headers["Authorization"] = "Bearer sk-bench-" .. (i + 1)'
        lines += [
            f"local n = {n}",
            "local i = 0",
            "function init(args) math.randomseed(os.time() + math.floor(os.clock() * 1e6)); i = math.random(0, n - 1) end",
            "function request()",
            "  i = (i + 1) % n",
            f"  {set_headers}",
            "  return wrk.format()",
            "end",
        ]
    lines += [
        "function done(summary, latency, requests)",
        "  local e = summary.errors",
        '  io.write(string.format(\'WRKJSON {"requests":%.0f,"duration_us":%.0f,"p50_us":%.0f,'
        '"p90_us":%.0f,"p99_us":%.0f,"mean_us":%.1f,"max_us":%.0f,"connect":%.0f,"read":%.0f,'
        '"write":%.0f,"status":%.0f,"timeout":%.0f}\\n\', summary.requests, summary.duration,',
        "    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,",
        "    latency.max, e.connect, e.read, e.write, e.status, e.timeout))",
        "end",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(url: str, script: Path, conns: int, duration_s: int, cores: str | None,
            threads: int = 1) -> WrkResult:
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk not found: apt-get install -y wrk")
    argv = [exe, f"-t{min(threads, conns)}", f"-c{conns}", f"-d{max(1, duration_s)}s",
            "--timeout", "10s", "-s", str(script), url]
    if cores:
        argv = ["taskset", "-c", cores, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            d = json.loads(line[len("WRKJSON ") :])
            return WrkResult(
                requests=int(d["requests"]),
                duration_s=d["duration_us"] / 1e6,
                p50_ms=d["p50_us"] / 1000,
                p90_ms=d["p90_us"] / 1000,
                p99_ms=d["p99_us"] / 1000,
                mean_ms=d["mean_us"] / 1000,
                max_ms=d["max_us"] / 1000,
                errors={k: int(d[k]) for k in ("connect", "read", "write", "status", "timeout")},
            )
    raise RuntimeError(f"wrk gave no result (rc {out.returncode}):\n{out.stdout}\n{out.stderr}")


# --- streams ------------------------------------------------------------------------------

_OPENAI_USAGE = re.compile(rb'"usage"\s*:\s*\{[^}]*"completion_tokens"\s*:\s*[1-9]')
_ANTHROPIC_USAGE = re.compile(rb'"message_delta".*"output_tokens"\s*:\s*[1-9]', re.S)


def usage_pattern(api: str) -> re.Pattern[bytes]:
    return _OPENAI_USAGE if api == "openai" else _ANTHROPIC_USAGE


@dataclass(frozen=True)
class StreamResult:
    streams: int
    duration_s: float
    errors: int
    missing_usage: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    total_p50_ms: float
    first_error: str

    @property
    def rate(self) -> float:
        return self.streams / self.duration_s if self.duration_s > 0 else 0.0


def _dechunk(body: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return bytes(out)
        size = int(body[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            return bytes(out)
        out += body[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    first_byte: float  # perf_counter() of the first body bytes
    keep_alive: bool


class _StreamConn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[_Reply] | None = None
        self._body_at = -1  # index where the body starts, once the head is parsed
        self._status = 0
        self._length: int | None = None
        self._close = False
        self._first = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def send(self, request: bytes) -> asyncio.Future[_Reply]:
        assert self.transport is not None
        self._buf.clear()
        self._body_at, self._status, self._length, self._close, self._first = -1, 0, None, False, 0.0
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._body_at < 0:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(bytes(self._buf[:end]))
            self._body_at = end + 4
        if not self._first and len(self._buf) > self._body_at:
            self._first = time.perf_counter()
        if self._complete() and self._waiter is not None and not self._waiter.done():
            body = bytes(self._buf[self._body_at :])
            if self._length is None:
                body = _dechunk(body)
            self._waiter.set_result(_Reply(self._status, body, self._first, not self._close))

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self._status = int(lines[0].split(b" ", 2)[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self._length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                self._close = True

    def _complete(self) -> bool:
        if self._length is not None:
            return len(self._buf) - self._body_at >= self._length
        # SSE events end in a blank line, so only the last-chunk marker can end the buffer so.
        return self._buf.endswith(b"0\r\n\r\n") and (
            len(self._buf) - self._body_at == 5 or self._buf.endswith(b"\r\n0\r\n\r\n")
        )


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class _StreamLoop:
    """Closed loop: each connection runs one stream after another until the deadline."""

    def __init__(self, port: int, path: str, body: bytes, ident: Identity, api: str,
                 duration_s: float, host: str) -> None:
        self.host, self.port, self.body, self.ident = host, port, body, ident
        self.pattern = usage_pattern(api)
        self.head_prefix = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n"
        ).encode()
        self.static = None if ident.rotating else self.request(0)
        self.ttfts: list[float] = []
        self.totals: list[float] = []
        self.errors = 0
        self.missing = 0
        self.first_error = ""
        self.counter = 0
        self.start = time.perf_counter()
        self.deadline = self.start + duration_s
        self.last_end = self.start

    def request(self, i: int) -> bytes:
        return self.head_prefix + _header_bytes(self.ident, i) + b"\r\n" + self.body

    def fail(self, msg: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or msg

    def record(self, reply: _Reply, t0: float, t1: float) -> None:
        self.last_end = max(self.last_end, t1)
        if reply.status != 200:
            self.fail(f"HTTP {reply.status}: {reply.body[:200]!r}")
            return
        self.ttfts.append(reply.first_byte - t0)
        self.totals.append(t1 - t0)
        if not self.pattern.search(reply.body):
            self.missing += 1
            self.first_error = self.first_error or f"no usage in stream: {reply.body[-300:]!r}"

    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        conn: _StreamConn | None = None
        while time.perf_counter() < self.deadline:
            if conn is None or conn.transport is None:
                try:
                    _, conn = await loop.create_connection(_StreamConn, self.host, self.port)
                except OSError as exc:
                    self.fail(f"connect: {exc!r}")
                    await asyncio.sleep(0.05)
                    continue
            self.counter += 1
            request = self.static or self.request(self.counter)
            t0 = time.perf_counter()
            try:
                reply = await conn.send(request)
            except ConnectionError as exc:
                self.fail(repr(exc))
                conn = None
                continue
            self.record(reply, t0, time.perf_counter())
            if not reply.keep_alive and conn.transport is not None:
                conn.transport.close()
                conn = None
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    def result(self) -> StreamResult:
        return StreamResult(
            streams=len(self.totals),
            duration_s=self.last_end - self.start,
            errors=self.errors,
            missing_usage=self.missing,
            ttft_p50_ms=_percentile(self.ttfts, 0.5) * 1000,
            ttft_p99_ms=_percentile(self.ttfts, 0.99) * 1000,
            total_p50_ms=statistics.median(self.totals) * 1000 if self.totals else float("nan"),
            first_error=self.first_error,
        )


async def run_streams(port: int, path: str, body: bytes, ident: Identity, api: str, conns: int,
                      duration_s: float, host: str = "127.0.0.1") -> StreamResult:
    """`conns` keep-alive connections streaming back to back for duration_s; usage checked in each."""
    run = _StreamLoop(port, path, body, ident, api, duration_s, host)
    tasks = [asyncio.ensure_future(run.worker()) for _ in range(conns)]
    done, pending = await asyncio.wait(tasks, timeout=duration_s + 30)
    for task in pending:
        task.cancel()
        run.fail("stream did not finish within 30 s of the deadline")
    for task in done:
        if task.exception() is not None:
            run.fail(repr(task.exception()))
    return run.result()


def _header_bytes(ident: Identity, i: int) -> bytes:
    return "".join(f"{k}: {v}\r\n" for k, v in ident.headers(i)).encode()
