"""`--workers N`: N processes on one port sharing the redis store; metrics merged across them."""
from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from conftest import ALICE_KEY, base_config, merge
from fakeprovider import FakeProvider
from procs import ProxyProcess
from prometheus_client.parser import text_string_to_metric_families
from redisproc import start_redis

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi workers"}]}


async def test_two_workers_share_limits_and_merge_metrics(fake: FakeProvider, tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    config = merge(base_config(fake.url, tmp_path), {"store": redis.url, "plans": {"free": {"rpm": 30}}})
    proc = await ProxyProcess(config, tmp_path / "config.yaml", workers=2).start()
    try:
        statuses: list[int] = []
        pids: set[str] = set()
        # Fresh connections each time, so SO_REUSEPORT spreads them over both workers.
        for _ in range(40):
            async with aiohttp.ClientSession() as s:
                async with s.post(f"{proc.url}/openai/v1/chat/completions", json=CHAT,
                                  headers={"Authorization": f"Bearer {ALICE_KEY}"}) as r:
                    statuses.append(r.status)
        assert statuses.count(200) == 30 and statuses.count(429) == 10  # one limit across both workers
        await asyncio.sleep(1.0)  # settle/record run just after each response; workers fold metrics in every 0.25 s
        for _ in range(10):
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{proc.url}/metrics") as r:
                    text = await r.text()
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            total = sum(s.value for s in fams["meterproxy_requests"].samples
                        if s.name == "meterproxy_requests_total")
            assert total == 40  # whichever worker answers, it reports both workers' counts
        pids = {line for line in proc.logs().splitlines() if "listening on" in line}
        assert len(pids) == 2, proc.logs()
    finally:
        await proc.stop()
        redis.stop()
    assert proc.proc is not None and proc.proc.returncode == 0
