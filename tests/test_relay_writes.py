"""How a relayed stream reaches the client's socket: its headers at once when the upstream is slow
to start, and a stream that arrived whole in a single write (not headers, body and end apart)."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
from conftest import ALICE_KEY, StartProxy, base_config, merge
from fakeprovider import FakeProvider
from procs import ProxyProcess
from rawupstream import STREAM_HEAD, RawUpstream, chunk, read_request, sse_chat

STREAM = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True,
          "stream_options": {"include_usage": True}}
USAGE = (b'data: {"id":"chatcmpl-raw","object":"chat.completion.chunk","created":0,"model":"gpt-4o-mini",'
         b'"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":3,"total_tokens":11}}\n\n')
EVENTS = [sse_chat(0), sse_chat(1), sse_chat(2), USAGE, b"data: [DONE]\n\n"]
WHOLE = STREAM_HEAD + b"".join(chunk(e) for e in EVENTS) + b"0\r\n\r\n"


def raw_provider(upstream: RawUpstream) -> dict[str, object]:
    return {"providers": {"raw": {"type": "openai", "base_url": upstream.url, "api_key": "sk-raw"}}}


async def test_headers_go_out_before_a_slow_first_event(start_proxy: StartProxy) -> None:
    async def slow_start(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(STREAM_HEAD)  # the upstream answered 200 ...
        await asyncio.sleep(0.8)  # ... and thinks before its first token
        writer.write(b"".join(chunk(e) for e in EVENTS) + b"0\r\n\r\n")
        await reader.read()

    async with RawUpstream(slow_start).running() as upstream:
        proxy = await start_proxy(raw_provider(upstream))
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            async with s.post(f"{proxy.url}/raw/v1/chat/completions", json=STREAM,
                              headers={"Authorization": f"Bearer {ALICE_KEY}"}) as r:
                headers_after = time.monotonic() - t0
                body = await r.read()
            done_after = time.monotonic() - t0
    assert r.status == 200 and r.headers["content-type"] == "text/event-stream"
    assert headers_after < 0.5 <= 0.8 <= done_after  # the headers did not wait for the first event
    assert body == b"".join(EVENTS)


async def test_a_stream_that_arrived_whole_leaves_in_one_write(fake: FakeProvider, tmp_path: Path) -> None:
    """Each response's first read holds all of it: headers, events and the chunked end together.
    Written apart, a reader on another process sees the headers alone first (the proxy is then still
    working on the body), which this catches in most of the 30 tries, not by chance in all."""
    async def whole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(WHOLE)

    async with RawUpstream(whole).running() as upstream:
        config = merge(base_config(fake.url, tmp_path), raw_provider(upstream))
        proc = await ProxyProcess(config, tmp_path / "config.yaml").start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proc.port)
            body = json.dumps(STREAM).encode()
            request = (f"POST /raw/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
            first_reads: list[bytes] = []
            for _ in range(30):
                writer.write(request)
                got = await asyncio.wait_for(reader.read(1 << 20), 5)
                first_reads.append(got)
                while not got.endswith(b"\r\n0\r\n\r\n"):
                    more = await asyncio.wait_for(reader.read(1 << 20), 5)
                    assert more, "the proxy closed the connection mid-response"
                    got += more
                assert got.startswith(b"HTTP/1.1 200") and all(e in got for e in EVENTS)
            writer.close()
        finally:
            await proc.stop()
    split = [r[:60] for r in first_reads if not r.endswith(b"\r\n0\r\n\r\n")]
    assert not split, f"{len(split)} of 30 responses came in pieces, first read: {split[0]!r}"
