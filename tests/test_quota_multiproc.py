"""Two proxy processes (`python -m proxy serve`) sharing one redis-server enforce one set of limits
between them: a request-rate limit and a USD budget, both under concurrent bursts.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from conftest import ALICE_KEY, BOB_KEY, base_config, merge
from fakeprovider import PROMPT_OVERHEAD, FakeProvider
from procs import ProxyProcess
from redisproc import RedisProc, start_redis

from proxy.quota.redis_store import RedisStore
from proxy.quota.store import Limit, LimitName
from proxy.records import ApiKind
from proxy.tokens import Tokenizer

MODEL = "gpt-4o-mini"
CHAT = [{"role": "user", "content": "Say hello to the proxy"}]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProc]:
    server = start_redis(tmp_path)
    with redis.Redis.from_url(server.url) as r:  # a shared REDIS_URL server may hold an earlier run's keys
        for key in list(r.scan_iter(match="mp:*", count=1000)):
            r.delete(key)
    yield server
    server.stop()


@pytest.fixture
async def two_proxies(fake: FakeProvider, redis_server: RedisProc, tmp_path: Path,
                      tokenizer: Tokenizer) -> AsyncIterator[tuple[ProxyProcess, ProxyProcess, str, int]]:
    """Two processes on one Redis: alice has rpm 10; bob a USD budget that fits exactly 7 requests."""
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 12}
    reserved = tokenizer.estimate_prompt(ApiKind.CHAT, MODEL, body) + 12 * 2  # micro-USD at 1 and 2 per token
    procs: list[ProxyProcess] = []
    for i in range(2):
        cfg: dict[str, Any] = merge(base_config(fake.url, tmp_path), {
            "store": redis_server.url,
            "prices": {MODEL: {"input": 1, "output": 2}},
            "plans": {"free": {"rpm": 10}, "budget": {"usd_per_day": str(Decimal(7 * reserved) / 1_000_000)}},
            "users": {"bob": {"plan": "budget"}},
            "ledger": {"path": str(tmp_path / f"usage-{i}.jsonl")},
        })
        procs.append(ProxyProcess(cfg, tmp_path / f"proxy-{i}.yaml"))
    try:
        await asyncio.gather(*(p.start() for p in procs))
        yield procs[0], procs[1], redis_server.url, 7 * reserved
    finally:
        await asyncio.gather(*(p.stop() for p in procs))


async def _post(s: aiohttp.ClientSession, url: str, key: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 12}
    async with s.post(url + "/openai/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {key}", **(headers or {})}) as r:
        await r.read()
        return r.status, url


async def test_two_processes_enforce_one_limit(two_proxies: tuple[ProxyProcess, ProxyProcess, str, int]) -> None:
    a, b, redis_url, budget = two_proxies
    async with aiohttp.ClientSession() as s:
        # Alternating one by one: each process sees the other's requests counted.
        seq = [await _post(s, (a, b)[i % 2].url, ALICE_KEY) for i in range(14)]
        assert [code for code, _ in seq] == [200] * 10 + [429] * 4
        assert {url for code, url in seq if code == 200} == {a.url, b.url}
        # And a concurrent burst split across both, for another subject: exactly the limit.
        burst = await asyncio.gather(*(_post(s, (a, b)[i % 2].url, BOB_KEY, {"x-fake-delay": "0.3"})
                                       for i in range(30)))
    ok = [url for code, url in burst if code == 200]
    assert len(ok) == 7 and len(burst) - len(ok) == 23  # the budget fits exactly 7 reservations
    # The shared counters, read straight from Redis once both processes have settled.
    store = RedisStore(redis_url)
    await store.start()
    try:
        now = time.time()
        day, month = time.strftime("%Y-%m-%d", time.gmtime(now)), time.strftime("%Y-%m", time.gmtime(now))
        rpm = Limit("user:alice", LimitName.RPM, 10)
        money = Limit("user:bob", LimitName.USD_PER_DAY, budget)
        want = 7 * (5 + PROMPT_OVERHEAD + 12 * 2)  # what the fake billed, at 1 and 2 micro-USD a token
        for _ in range(100):
            (spent,) = await store.usage((money,), "u:bob", now, day, month)
            if spent.used == want:
                break
            await asyncio.sleep(0.05)
        assert spent.used == want <= budget
        (requests,) = await store.usage((rpm,), "t:research", time.time(), day, month)
        assert requests.used == 10
    finally:
        await store.close()
