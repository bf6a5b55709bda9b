"""The usage ledger: JSONL appends, rotation and restarts; the Redis stream sink; failing sinks keep
and retry their events; only a full queue loses events, and those are counted."""
from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from conftest import ALICE_KEY, BOB_KEY, StartProxy
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redisproc import RedisProc, start_redis

from proxy.ledger import Ledger, event_of
from proxy.metrics import Metrics
from proxy.quota.redis_store import RedisStore
from proxy.records import CountSource, TokenCounts, UsageRecord

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "ledger me"}]}


def rec(i: int = 0, user: str = "al") -> UsageRecord:
    return UsageRecord(f"ev-{i:05d}-{uuid.uuid4().hex[:6]}", f"req-{i}", 1_900_000_000.0 + i, user, "t1", "free",
                       "k1", "openai", "gpt-4o", "chat", TokenCounts(10 + i, 0, 0, 5, 0), CountSource.PROVIDER,
                       CountSource.PROVIDER, 100 + i, True, 200, 0.25, None, False, False)


def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def dropped(m: Metrics) -> float:
    return m.registry.get_sample_value("meterproxy_ledger_dropped_events_total") or 0.0


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def wait_for(predicate: object, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


# ---------------------------------------------------------------- JSONL


async def test_jsonl_appends_across_restarts_never_truncates(tmp_path: Path) -> None:
    path = tmp_path / "data" / "usage.jsonl"
    first = [rec(i) for i in range(3)]
    ledger = Ledger(str(path), metrics(), fsync_interval=0.01)
    await ledger.start()
    for r in first:
        ledger.write(r)
    await ledger.close()
    second = [rec(i) for i in range(3, 5)]
    ledger = Ledger(str(path), metrics(), fsync_interval=0.01)
    await ledger.start()
    for r in second:
        ledger.write(r)
    await ledger.close()
    assert [e["event_id"] for e in lines(path)] == [r.event_id for r in first + second]
    assert lines(path)[0] == json.loads(json.dumps(event_of(first[0])))


async def test_jsonl_rotates_by_size_and_keeps_every_event_once(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    ledger = Ledger(str(path), metrics(), fsync_interval=0, rotate_bytes=2048)
    await ledger.start()
    written = [rec(i) for i in range(40)]
    for i in range(0, 40, 5):  # 8 batches of ~2.5 KiB: each one passes the size and rotates
        for r in written[i:i + 5]:
            ledger.write(r)
        await wait_for(lambda: ledger.pending == 0)
    await ledger.close()
    rotated = sorted(tmp_path.glob("usage.jsonl.*"))
    assert len(rotated) == 8
    assert all(p.stat().st_size >= 2048 for p in rotated)
    events = [e for p in [*rotated, path] if p.exists() for e in lines(p)]
    assert sorted(e["event_id"] for e in events) == sorted(r.event_id for r in written)


async def test_fsync_within_the_interval_even_without_more_writes(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "usage.jsonl"), metrics(), fsync_interval=0.5)
    await ledger.start()
    ledger.write(rec(0))  # the first write fsyncs (none before): make the second one wait for it
    await wait_for(lambda: ledger.pending == 0)
    ledger.write(rec(1))
    await wait_for(lambda: ledger.pending == 0)
    sink = ledger._sinks[0]
    assert sink._dirty  # type: ignore[attr-defined]  # written, inside the interval: not yet synced
    await wait_for(lambda: not sink._dirty, timeout=3.0)  # type: ignore[attr-defined]
    await ledger.close()


async def test_failing_file_keeps_events_and_retries(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the ledger's folder should be")
    path = blocker / "usage.jsonl"
    m = metrics()
    ledger = Ledger(str(path), m, fsync_interval=0.01)
    await ledger.start()
    for i in range(5):
        ledger.write(rec(i))
    await asyncio.sleep(0.3)  # a few failed tries
    assert ledger.pending == 5 and not path.exists()
    blocker.unlink()  # the disk is fixed
    await wait_for(lambda: ledger.pending == 0)
    await ledger.close()
    assert len(lines(path)) == 5 and dropped(m) == 0


async def test_only_a_full_queue_loses_events_and_counts_them(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("x")
    m = metrics()
    ledger = Ledger(str(blocker / "usage.jsonl"), m, fsync_interval=0.01, queue_size=3)
    await ledger.start()
    for i in range(5):
        ledger.write(rec(i))
    assert dropped(m) == 2 and ledger.pending == 3
    blocker.unlink()
    await ledger.close()
    assert [e["request_id"] for e in lines(blocker / "usage.jsonl")] == ["req-0", "req-1", "req-2"]


async def test_proxy_ledger_survives_restart(start_proxy: StartProxy, tmp_path: Path) -> None:
    """Two proxy lifetimes on one ledger file: the second appends to the first's events."""
    ids: list[str] = []
    for key in (ALICE_KEY, BOB_KEY):
        proxy = await start_proxy()
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(f"{proxy.url}/openai/v1/chat/completions", json=CHAT,
                                  headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 200
                    ids.append(r.headers["x-request-id"])
        await proxy.settled()
        await proxy.runner.cleanup()  # shutdown drains and closes the ledger
    events = lines(tmp_path / "usage.jsonl")
    assert [e["event_id"] for e in events] == ids and len(set(ids)) == 4
    assert [e["user"] for e in events] == ["alice", "alice", "bob", "bob"]


# ---------------------------------------------------------------- Redis stream


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisProc]:
    server = start_redis(tmp_path, external=False)
    yield server
    server.stop()


async def stream_ids(url: str, key: str) -> list[str]:
    client = Redis.from_url(url)
    try:
        entries = await client.xrange(key)
    finally:
        await client.aclose()
    return [json.loads(fields[b"event"])["event_id"] for _, fields in entries]


async def test_stream_sink_writes_events_beside_the_file(redis: RedisProc, tmp_path: Path) -> None:
    store = RedisStore(redis.url, prefix="lg:")
    await store.start()
    ledger = Ledger(str(tmp_path / "usage.jsonl"), metrics(), fsync_interval=0.01, stream=store)
    await ledger.start()
    written = [rec(i) for i in range(7)]
    for r in written:
        ledger.write(r)
    await ledger.close()
    await store.close()
    want = [r.event_id for r in written]
    assert await stream_ids(redis.url, "lg:ledger") == want
    assert [e["event_id"] for e in lines(tmp_path / "usage.jsonl")] == want


async def test_stream_is_capped_near_maxlen(redis: RedisProc) -> None:
    store = RedisStore(redis.url, prefix="cap:")
    await store.start()
    ledger = Ledger(None, metrics(), stream=store, stream_maxlen=100)
    await ledger.start()
    for i in range(1000):
        ledger.write(rec(i))
    await ledger.close()
    await store.close()
    ids = await stream_ids(redis.url, "cap:ledger")
    assert 100 <= len(ids) < 1000  # MAXLEN ~ trims whole nodes, so a little over 100 may stay
    assert ids[-1].startswith("ev-00999")  # the newest are kept


async def test_stream_outage_keeps_events_and_retries(redis: RedisProc, tmp_path: Path) -> None:
    store = RedisStore(redis.url, prefix="out:", timeout_seconds=0.2)
    await store.start()
    m = metrics()
    ledger = Ledger(str(tmp_path / "usage.jsonl"), m, fsync_interval=0.01, stream=store)
    await ledger.start()
    redis.kill()
    written = [rec(i) for i in range(6)]
    for r in written:
        ledger.write(r)
    # The file sink goes on; the stream sink keeps its 6 events until Redis is back.
    await wait_for(lambda: (tmp_path / "usage.jsonl").exists() and len(lines(tmp_path / "usage.jsonl")) == 6)
    await asyncio.sleep(0.5)
    assert ledger.pending == 6
    redis.spawn()  # back, empty (no persistence in tests): everything must arrive now
    await wait_for(lambda: ledger.pending == 0, timeout=20)
    await ledger.close()
    await store.close()
    assert await stream_ids(redis.url, "out:ledger") == [r.event_id for r in written]
    assert dropped(m) == 0
