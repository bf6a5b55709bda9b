"""Faults, each with real sockets or a real proxy process: upstream 5xx, resets, stalls and garbage
streams; 100 clients hanging up at once; slow-loris clients; oversized headers. Every one bounded,
metered, and leaking no connection.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from conftest import ALICE_KEY, Proxy, StartProxy, base_config, merge
from fakeprovider import FakeProvider, reply_text
from procs import ProxyProcess
from rawupstream import STREAM_HEAD, RawUpstream, chunk, read_request, reset, sse_chat

CHAT = [{"role": "user", "content": "fault injection"}]
AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}
STREAM = {"model": "gpt-4o-mini", "messages": CHAT, "stream": True}


def ledger_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def wait_ledger(path: Path, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The ledger of a proxy process once it holds `n` events (it flushes every 50 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        events = ledger_events(path)
        if len(events) >= n or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.02)


def sse_events(body: bytes) -> list[bytes]:
    return [e for e in body.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]


# ---------------------------------------------------------------- upstream faults, against a proxy process


async def test_upstream_faults_against_a_proxy_process(fake: FakeProvider, tmp_path: Path) -> None:
    """One real `meterproxy serve` process, four broken upstreams: each failure bounded and metered."""
    async def reset_on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reset(writer)

    async def reset_mid_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        midreset.requests.append(await read_request(reader))
        writer.write(STREAM_HEAD + b"".join(chunk(sse_chat(i)) for i in range(3)))
        await writer.drain()
        await asyncio.sleep(0.05)
        reset(writer)

    garbage_stream = [
        b": a comment\n\n", sse_chat(0),
        b"data: {\"choices\": [{\"delta\": {\"content\": \"broken\n\n",  # JSON cut in half
        b"data: \xff\xfe\xfd invalid utf-8 \xc3\x28\n\n",
        b"data: " + b"x" * 300_000 + b"\n\n",  # one huge line
        b"event: nope\ndata: [1, 2\ndata: 3]\n",  # no blank line after it
        sse_chat(1), b"data: [DONE]\n\n"]

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD + b"".join(chunk(c) for c in garbage_stream) + b"0\r\n\r\n")
        await writer.drain()
        await reader.read()  # keep-alive: hold the connection until the proxy closes it

    resetter, midreset, garbler = RawUpstream(reset_on_accept), RawUpstream(reset_mid_stream), RawUpstream(garbage)
    async with resetter.running(), midreset.running(), garbler.running():
        retries = {"attempts": 2, "backoff": 0.01}
        providers = {
            "openai": {"retries": retries, "timeouts": {"idle": 0.4}},
            "reset": {"type": "openai", "base_url": resetter.url, "api_key": "sk-r", "retries": retries},
            "midreset": {"type": "openai", "base_url": midreset.url, "api_key": "sk-m", "retries": retries},
            "garbage": {"type": "openai", "base_url": garbler.url, "api_key": "sk-g"},
        }
        config = merge(base_config(fake.url, tmp_path), {"providers": providers})
        proc = await ProxyProcess(config, tmp_path / "config.yaml").start()
        ledger = tmp_path / "usage.jsonl"
        try:
            async with aiohttp.ClientSession() as s:
                async def post(path: str, body: dict[str, Any], **headers: str) -> tuple[int, bytes]:
                    async with s.post(proc.url + path, json=body, headers={**AUTH, **headers}) as r:
                        return r.status, await r.read()

                # 5xx: retried a bounded number of times, then the provider's own answer passes through.
                fake.reset()
                status, body = await post("/openai/v1/chat/completions", {"model": "gpt-4o-mini", "messages": CHAT},
                                          **{"x-fake-status": "503"})
                assert status == 503 and json.loads(body)["error"]["message"] == "fake error 503"
                assert len(fake.requests) == 3
                [ev] = await wait_ledger(ledger, 1)
                assert (ev["status"], ev["retries"], ev["provider"]) == (503, 2, "openai")

                # Connection reset on accept: 502 after the same bounded retries.
                status, body = await post("/reset/v1/chat/completions", {"model": "gpt-4o-mini", "messages": CHAT})
                assert status == 502 and json.loads(body)["error"]["code"] == "upstream_unreachable"
                assert resetter.connections == 3
                ev = (await wait_ledger(ledger, 2))[-1]
                assert (ev["status"], ev["retries"], ev["provider"], ev["error"]) == (
                    502, 2, "reset", "upstream_unreachable")

                # Reset mid-stream: what came through is relayed, then a final error event; metered, cut short.
                status, body = await post("/midreset/v1/chat/completions", STREAM)
                assert status == 200
                events = sse_events(body)
                assert events[:3] == [sse_chat(i).strip() for i in range(3)]
                assert events[-1] == b"data: [DONE]" and b"upstream_unreachable" in events[-2]
                assert len(midreset.requests) == 1  # after the first byte: never retried
                ev = (await wait_ledger(ledger, 3))[-1]
                assert (ev["status"], ev["cut_short"], ev["streamed"], ev["error"]) == (
                    200, True, True, "upstream_unreachable")
                assert ev["output_tokens"] >= 3

                # Stalled mid-stream: the idle timeout ends it cleanly and the upstream is hung up on.
                fake.reset()
                t0 = time.monotonic()
                status, body = await post("/openai/v1/chat/completions", STREAM,
                                          **{"x-fake-chunks": "6", "x-fake-chunk-delay": "30"})
                assert status == 200 and time.monotonic() - t0 < 5
                events = sse_events(body)
                assert events[-1] == b"data: [DONE]" and b"upstream_timeout" in events[-2]
                await fake.wait_until(lambda: len(fake.disconnects) == 1, timeout=3)
                assert not fake.last.completed
                ev = (await wait_ledger(ledger, 4))[-1]
                assert (ev["status"], ev["cut_short"], ev["error"]) == (200, True, "upstream_timeout")

                # Malformed SSE: relayed as it came, the proxy survives, the request is metered.
                status, body = await post("/garbage/v1/chat/completions", STREAM)
                assert status == 200
                assert b"\xff\xfe\xfd invalid utf-8" in body and b"x" * 300_000 in body and body.endswith(
                    b"data: [DONE]\n\n")
                ev = (await wait_ledger(ledger, 5))[-1]
                assert (ev["provider"], ev["status"], ev["streamed"]) == ("garbage", 200, True)
                assert ev["output_tokens"] >= 2

                # Still serving, and the metrics say what happened.
                status, body = await post("/openai/v1/chat/completions", {"model": "gpt-4o-mini", "messages": CHAT})
                assert status == 200
                async with s.get(proc.url + "/metrics") as r:
                    text = await r.text()
            assert 'meterproxy_upstream_errors_total{kind="status_503",provider="openai"} 3.0' in text
            assert 'meterproxy_upstream_errors_total{kind="unreachable",provider="reset"} 3.0' in text
            assert 'meterproxy_upstream_errors_total{kind="stream_cut",provider="midreset"} 1.0' in text
            assert 'meterproxy_upstream_errors_total{kind="stream_idle",provider="openai"} 1.0' in text
            assert len(await wait_ledger(ledger, 6)) == 6
        finally:
            await proc.stop()
    assert "Traceback" not in proc.logs()


# ---------------------------------------------------------------- 100 clients hang up at once


def idle_upstream_connections(proxy: Proxy) -> int:
    return proxy.svc.pool.idle_count()


async def test_100_clients_hang_up_mid_stream(start_proxy: StartProxy, fake: FakeProvider) -> None:
    proxy = await start_proxy()
    pool = proxy.svc.pool
    async with aiohttp.ClientSession() as s:  # warm-up: one idle pooled upstream connection
        async with s.post(proxy.url + "/openai/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": CHAT},
                          headers=AUTH) as r:
            assert r.status == 200
    idle_before = idle_upstream_connections(proxy)
    assert idle_before == 1 and pool.active_count() == 0
    fake.reset()

    port = int(proxy.url.rsplit(":", 1)[1])
    body = json.dumps(STREAM).encode()
    head = (f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nx-fake-chunks: 400\r\n"
            f"x-fake-chunk-delay: 0.05\r\n\r\n").encode()

    async def open_stream() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + body)
        await writer.drain()
        seen = b""
        while b"tok1" not in seen:  # the stream is flowing: content chunks have arrived
            seen += await reader.read(65536)
        return writer

    writers = await asyncio.gather(*(open_stream() for _ in range(100)))
    assert fake.open_streams == 100 and pool.active_count() == 100
    for w in writers:
        reset(w)  # every client vanishes at once
    await fake.wait_until(lambda: fake.open_streams == 0 and len(fake.disconnects) == 100, timeout=10)
    await proxy.settled()
    events = ledger_events(proxy.svc.ledger.path)  # type: ignore[arg-type]
    assert len(events) == 101
    cut = events[1:]
    assert all(e["cut_short"] and e["streamed"] and e["status"] == 200 for e in cut)
    # Each is billed for what the provider generated for it before the hang-up.
    sent = {r.chunks_sent for r in fake.requests}
    assert all(e["output_tokens"] >= 2 for e in cut) and min(sent) >= 2 and not any(r.completed for r in fake.requests)
    # No leaked connection on either side: nothing acquired, the pool no larger than before.
    assert pool.active_count() == 0
    assert idle_upstream_connections(proxy) <= idle_before
    await _wait(lambda: not proxy.runner.server.connections)  # type: ignore[union-attr]
    assert proxy.metric("meterproxy_inflight_requests", {"provider": "openai"}) == 0
    async with aiohttp.ClientSession() as s:  # and the proxy still serves
        async with s.post(proxy.url + "/openai/v1/chat/completions", json=STREAM, headers=AUTH) as r:
            assert r.status == 200 and reply_text(12).split()[-1].encode() in await r.read()


async def _wait(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------- slow-loris and oversized headers


async def exchange(port: int, data: bytes, *, then: bytes = b"", every: float = 0.0,
                   timeout: float = 10.0) -> tuple[bytes, float]:
    """Send `data`, then dribble `then` one byte per `every` seconds; return what came back and when
    the server closed the connection (seconds after the first byte was sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    writer.write(data)

    async def dribble() -> None:
        for b in then:
            await asyncio.sleep(every)
            writer.write(bytes([b]))
            await writer.drain()

    feeder = asyncio.create_task(dribble())
    out = b""
    try:
        async with asyncio.timeout(timeout):
            while not _complete(out) and (chunk_ := await reader.read(65536)):
                out += chunk_
    except ConnectionError:
        pass
    finally:
        feeder.cancel()
        writer.transport.abort()
    return out, time.monotonic() - t0


def _complete(response: bytes) -> bool:
    """A whole response with a Content-Length body has arrived (the connection may stay open)."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.") else 0


async def test_slow_body_gets_408_and_is_metered(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"client_body_timeout": 0.5})
    port = int(proxy.url.rsplit(":", 1)[1])
    body = json.dumps({"model": "gpt-4o-mini", "messages": CHAT}).encode()
    head = (f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    out, took = await exchange(port, head + body[:5], then=body[5:], every=0.1)
    assert status_of(out) == 408 and b"request_timeout" in out
    assert 0.4 < took < 3
    await proxy.settled()
    [ev] = ledger_events(proxy.svc.ledger.path)  # type: ignore[arg-type]
    assert (ev["status"], ev["user"], ev["error"]) == (408, "alice", "request_timeout")


async def test_slow_headers_are_cut_off_after_client_idle_timeout(fake: FakeProvider, tmp_path: Path) -> None:
    """aiohttp's keep-alive timer (set by run_app) starts at connect and is not pushed back by bytes
    that never complete a request: partial or dribbled headers are dropped on time."""
    config = merge(base_config(fake.url, tmp_path), {"client_idle_timeout": 1.0})
    proc = await ProxyProcess(config, tmp_path / "config.yaml").start()
    try:
        partial = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        stalled, dribbled = await asyncio.gather(
            exchange(proc.port, partial),
            exchange(proc.port, b"P", then=partial[1:] * 20, every=0.05))
        for out, took in (stalled, dribbled):
            assert out == b"" and 0.8 < took < 3, (out, took)
        # A connection that never sends anything is dropped too.
        out, took = await exchange(proc.port, b"")
        assert out == b"" and 0.8 < took < 3
        # A normal client is unaffected.
        async with aiohttp.ClientSession() as s:
            async with s.get(proc.url + "/healthz") as r:
                assert r.status == 200
    finally:
        await proc.stop()
    assert fake.requests == []


async def test_oversized_headers_get_a_4xx_not_a_500(proxy: Proxy, fake: FakeProvider) -> None:
    port = int(proxy.url.rsplit(":", 1)[1])
    line = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    auth = f"Authorization: Bearer {ALICE_KEY}\r\n".encode()
    cases = {
        "one huge header": line + auth + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        "huge request line": b"GET /openai/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "huge header name": line + auth + b"X-" + b"n" * 100_000 + b": 1\r\n\r\n",
        "many headers": line + auth + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(20_000)) + b"\r\n",
    }
    for name, data in cases.items():
        out, _ = await exchange(port, data)
        assert 400 <= status_of(out) < 500, (name, out[:200])
        assert b"Traceback" not in out
    assert fake.requests == []
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/healthz") as r:
            assert r.status == 200
