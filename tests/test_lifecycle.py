"""Process lifecycle with real processes: SIGTERM drains streams, SIGHUP reloads the config."""
from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
from conftest import ALICE_KEY, base_config, merge
from fakeprovider import FakeProvider, reply_text
from procs import ProxyProcess

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "stream please"}], "stream": True}


async def stream_text(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> tuple[int, str]:
    text = ""
    async with session.post(f"{url}/openai/v1/chat/completions", json=BODY,
                            headers={"Authorization": f"Bearer {ALICE_KEY}", **headers}) as r:
        async for line in r.content:
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
        return r.status, text


def ledger_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_sigterm_drains_20_streams(fake: FakeProvider, tmp_path: Path) -> None:
    config = base_config(fake.url, tmp_path)
    proc = await ProxyProcess(config, tmp_path / "config.yaml").start()
    try:
        slow = {"x-fake-chunks": "20", "x-fake-chunk-delay": "0.05"}
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(stream_text(s, proc.url, slow)) for _ in range(20)]
            await fake.wait_until(lambda: fake.open_streams == 20, timeout=10)
            proc.signal(signal.SIGTERM)
            results = await asyncio.gather(*tasks)
            # The drain has begun: no new connections are taken.
            refused = False
            try:
                async with s.get(f"{proc.url}/readyz") as r:
                    refused = r.status == 503
            except aiohttp.ClientError:
                refused = True
            assert refused
        assert await proc.wait_exit(30) == 0, proc.logs()
    finally:
        await proc.stop()
    assert results == [(200, reply_text(20))] * 20
    events = ledger_events(tmp_path / "usage.jsonl")
    assert len(events) == 20, proc.logs()
    assert all(e["status"] == 200 and not e["cut_short"] and e["output_tokens"] == 20 for e in events)


async def test_sighup_reload_keeps_stream_and_rejects_broken_file(fake: FakeProvider, tmp_path: Path) -> None:
    config = merge(base_config(fake.url, tmp_path), {"plans": {"free": {"rpm": 1000}}})
    proc = await ProxyProcess(config, tmp_path / "config.yaml").start()
    try:
        async with aiohttp.ClientSession() as s:
            slow = {"x-fake-chunks": "20", "x-fake-chunk-delay": "0.05"}
            stream = asyncio.create_task(stream_text(s, proc.url, slow))
            await fake.wait_until(lambda: fake.open_streams == 1, timeout=10)
            # A valid change: a new rpm limit for the plan.
            proc.write_config(merge(config, {"plans": {"free": {"rpm": 500}}}))
            proc.signal(signal.SIGHUP)
            for _ in range(100):
                async with s.post(f"{proc.url}/openai/v1/chat/completions", json={**BODY, "stream": False},
                                  headers={"Authorization": f"Bearer {ALICE_KEY}"}) as r:
                    assert r.status == 200
                    if r.headers["x-ratelimit-limit-requests"] == "500":
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("reload did not take effect:\n" + proc.logs())
            assert await stream == (200, reply_text(20))  # the in-flight stream was not dropped
            # A broken file: refused with its error, the running config keeps serving.
            proc.write_config(text="providers: {openai: {type: nope}}\n")
            proc.signal(signal.SIGHUP)
            for _ in range(100):
                if "reload refused" in proc.logs():
                    break
                await asyncio.sleep(0.05)
            assert "providers.openai.type" in proc.logs()
            async with s.post(f"{proc.url}/openai/v1/chat/completions", json={**BODY, "stream": False},
                              headers={"Authorization": f"Bearer {ALICE_KEY}"}) as r:
                assert r.status == 200 and r.headers["x-ratelimit-limit-requests"] == "500"
    finally:
        await proc.stop()
