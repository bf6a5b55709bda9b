"""Quotas through the proxy: bursts against the memory store, a real redis-server and a 3-node
Redis Cluster; queueing by priority; fail-open and closed on a killed Redis; headers; limit
resolution; clamp, reservation sizing, in-stream enforcement and shadow mode.
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
from conftest import ALICE_KEY, BACKEND_KEY, BOB_KEY, Proxy, StartProxy
from fakeprovider import PROMPT_OVERHEAD, FakeProvider
from multidict import CIMultiDictProxy
from redisproc import ClusterProc, RedisProc, free_port, start_socket_redis

from proxy.auth import key_id_of, sha256_hex
from proxy.config import Config
from proxy.quota.gate import Gate
from proxy.quota.limits import LimitBook, format_usd, go_duration
from proxy.quota.slots import ProviderSlot
from proxy.quota.store import Limit, LimitName
from proxy.records import ApiKind, Subject
from proxy.tokens import Tokenizer

MODEL = "gpt-4o-mini"
CHAT = [{"role": "user", "content": "Say hello to the proxy"}]
FAKE_PROMPT = 5 + PROMPT_OVERHEAD  # what the fake bills for CHAT: its words plus overhead
# 1 and 2 micro-dollars per input and output token: every cost below is exact integer arithmetic.
PRICES: dict[str, Any] = {"prices": {MODEL: {"input": 1, "output": 2}}}
CAROL_KEY = "sk-test-carol-virtual-0004"
DAVE_KEY = "sk-test-dave-virtual-0005"
KEYS = [
    {"key": ALICE_KEY, "user": "alice"},
    {"key": BOB_KEY, "user": "bob"},
    {"key": BACKEND_KEY, "user": "backend", "trusted_user_header": True},
    {"key": CAROL_KEY, "user": "carol"},
    {"key": DAVE_KEY, "user": "dave"},
]
RESET = re.compile(r"^(\d+ms|\d+s|\d+m\d+s|\d+h\d+m\d+s)$")


# ---------------------------------------------------------------- stores


def _clean(url: str, cluster: bool = False) -> None:
    """Delete the proxy's keys (prefix `mp:`), leaving anything else on a shared server alone."""
    client = redis.RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)
    with client as r:
        for key in list(r.scan_iter(match="mp:*", count=1000)):
            r.delete(key)


@pytest.fixture(params=["memory", "redis", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The `store:` of the proxy under test, emptied first (the servers are shared by the module)."""
    if request.param == "memory":
        return "memory"
    if request.param == "redis":
        server: RedisProc = request.getfixturevalue("redis_server")
        _clean(server.url)
        return server.url
    cluster: ClusterProc = request.getfixturevalue("redis_cluster")
    _clean(cluster.url, cluster=True)
    return cluster.url  # a plain redis:// URL: cluster mode is detected


# ---------------------------------------------------------------- client helpers


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    data: Any
    seconds: float = 0.0

    @property
    def error(self) -> dict[str, Any]:
        assert isinstance(self.data, dict), self.data
        err = self.data["error"]
        assert isinstance(err, dict)
        return err


def chat_body(max_tokens: int | None = None, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": CHAT}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
    return body


async def post(s: aiohttp.ClientSession, url: str, key: str = ALICE_KEY, body: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None, path: str = "/openai/v1/chat/completions") -> Reply:
    t0 = time.perf_counter()
    async with s.post(url + path, json=body or chat_body(),
                      headers={"Authorization": f"Bearer {key}", **(headers or {})}) as r:
        raw = await r.read()
        try:
            data: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = raw.decode()
        return Reply(r.status, r.headers, data, time.perf_counter() - t0)


async def burst(url: str, n: int, key: str = ALICE_KEY, body: dict[str, Any] | None = None,
                headers: dict[str, str] | None = None) -> list[Reply]:
    async with aiohttp.ClientSession() as s:
        return list(await asyncio.gather(*(post(s, url, key, body, headers) for _ in range(n))))


def statuses(replies: list[Reply]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in replies:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def subject(user: str, key: str, team: str | None = None, plan: str = "free") -> Subject:
    return Subject(user, team, plan, key_id_of(sha256_hex(key)))


async def used(p: Proxy, sub: Subject) -> dict[tuple[str, LimitName], int]:
    """What the proxy's store holds for a subject's counters right now."""
    gate = p.svc.gate
    now = time.time()
    day, month = gate.periods(now)
    limits = gate.limits_for(sub)
    states = await gate.store.usage(limits, gate.book.tag_for(sub), now, day, month)
    return {(st.limit.scope, st.limit.name): st.used for st in states}


def ledger(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "usage.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def total_tokens(ev: dict[str, Any]) -> int:
    return int(ev["input_tokens"] + ev["cached_input_tokens"] + ev["cache_write_tokens"] + ev["output_tokens"])


def usd(micro: int) -> str:
    return str(Decimal(micro) / 1_000_000)


# ---------------------------------------------------------------- bursts, on every store


async def test_rpm_burst_admits_exactly_the_limit(store_url: str, start_proxy: StartProxy, fake: FakeProvider) -> None:
    p = await start_proxy({"store": store_url, "plans": {"free": {"rpm": 10}}})
    replies = await burst(p.url, 50)
    assert statuses(replies) == {200: 10, 429: 40}
    assert len(fake.requests) == 10
    refused = next(r for r in replies if r.status == 429)
    assert refused.error["code"] == "rate_limit_exceeded" and refused.error["type"] == "requests"
    assert "rpm limit of 10 for user:alice" in refused.error["message"]
    assert 55 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert p.metric("meterproxy_limit_rejections_total", {"user": "alice", "team": "research", "limit": "rpm"}) == 40


async def test_unix_socket_store(start_proxy: StartProxy, tmp_path: Path) -> None:
    """`store: unix:///path?db=N`: a Redis on the same host, reached over its socket, enforces."""
    server, sock = start_socket_redis(tmp_path)
    try:
        p = await start_proxy({"store": f"unix://{sock}?db=3", "plans": {"free": {"rpm": 3}}})
        assert statuses(await burst(p.url, 10)) == {200: 3, 429: 7}
        with redis.Redis(unix_socket_path=str(sock), db=3) as r:
            assert list(r.scan_iter(match="mp:*"))  # the counters live in that database
        await p.runner.cleanup()  # before its server goes
    finally:
        server.stop()


async def test_budget_burst_admits_exactly_k_and_never_overspends(
        store_url: str, start_proxy: StartProxy, fake: FakeProvider, tokenizer: Tokenizer, tmp_path: Path) -> None:
    body = chat_body(max_tokens=12)
    prompt = tokenizer.estimate_prompt(ApiKind.CHAT, MODEL, body)
    assert prompt >= FAKE_PROMPT  # the estimate covers what the fake bills, so settling refunds
    reserved = prompt * 1 + 12 * 2
    k = 7
    budget = k * reserved
    p = await start_proxy({"store": store_url, **PRICES, "plans": {"free": {"usd_per_day": usd(budget)}}})
    # The upstream is slow, so every admission happens before any settle refunds anything.
    replies = await burst(p.url, 50, body=body, headers={"x-fake-delay": "0.3"})
    assert statuses(replies) == {200: k, 429: 50 - k}
    refused = next(r for r in replies if r.status == 429)
    assert refused.error["code"] == "insufficient_quota" and refused.error["type"] == "insufficient_quota"
    assert f"usd_per_day limit of ${format_usd(budget)} for user:alice" in refused.error["message"]
    await p.settled()
    events = [e for e in ledger(tmp_path) if e["status"] == 200]
    spent = sum(e["cost_micro_usd"] for e in events)
    assert spent == k * (FAKE_PROMPT + 12 * 2)
    stored = await used(p, subject("alice", ALICE_KEY, "research"))
    assert stored[("user:alice", LimitName.USD_PER_DAY)] == spent <= budget
    # A later request that no longer fits even clamped is refused; refunds made room for some.
    room = budget - spent
    again = await burst(p.url, 10, body=body, headers={"x-fake-delay": "0.2"})
    assert statuses(again).get(200, 0) == room // reserved


async def test_max_concurrent_burst_and_slots_come_back(store_url: str, start_proxy: StartProxy) -> None:
    p = await start_proxy({"store": store_url, "plans": {"free": {"max_concurrent": 2}}})
    slow = {"x-fake-delay": "1.0"}
    replies = await burst(p.url, 10, headers=slow)
    assert statuses(replies) == {200: 2, 429: 8}
    # Refused at once, not after the slow ones finished (relative, so a slow CI machine, which
    # delays both, does not fail it; a refusal that waited for a slot would come after them).
    # The admitted ones take a second, so a loaded machine has half of it to refuse in.
    admitted = min(r.seconds for r in replies if r.status == 200)
    for r in replies:
        if r.status == 429:
            assert r.seconds < admitted - 0.5
            assert "max_concurrent limit of 2 for user:alice" in r.error["message"]
    await p.settled()
    assert statuses(await burst(p.url, 5, headers=slow)) == {200: 2, 429: 3}
    await p.settled()
    assert statuses(await burst(p.url, 2)) == {200: 2}


# ---------------------------------------------------------------- provider slots and queueing


async def test_provider_slots_queue_by_priority_then_fifo(start_proxy: StartProxy, fake: FakeProvider) -> None:
    queue = {"on_limit": "queue", "max_queue_seconds": 5}
    p = await start_proxy({
        "providers": {"openai": {"max_concurrent": 1}},
        "plans": {"free": {**queue, "priority": 1}, "pro": {**queue, "priority": 5}},
        "users": {"carol": {"plan": "pro"}, "dave": {"plan": "pro"}},
        "keys": KEYS,
    })
    async with aiohttp.ClientSession() as s:
        holder = asyncio.create_task(post(s, p.url, headers={"x-fake-delay": "0.3", "x-order": "holder"}))
        await fake.wait_until(lambda: len(fake.requests) == 1)
        waiting = []
        for key, name in ((ALICE_KEY, "low1"), (BOB_KEY, "low2"), (CAROL_KEY, "high1"), (DAVE_KEY, "high2")):
            waiting.append(asyncio.create_task(post(s, p.url, key, headers={"x-order": name})))
            await asyncio.sleep(0.03)  # arrival order is the FIFO order within a priority
        replies = await asyncio.gather(holder, *waiting)
    assert [r.status for r in replies] == [200] * 5
    assert [r.headers["x-order"] for r in fake.requests] == ["holder", "high1", "high2", "low1", "low2"]
    assert fake.max_open_streams <= 1


async def test_provider_slot_queue_times_out_with_429(start_proxy: StartProxy, fake: FakeProvider) -> None:
    p = await start_proxy({"providers": {"openai": {"max_concurrent": 1}},
                           "plans": {"free": {"on_limit": "queue", "max_queue_seconds": 0.3}}})
    async with aiohttp.ClientSession() as s:
        holder = asyncio.create_task(post(s, p.url, headers={"x-fake-delay": "1.0"}))
        await fake.wait_until(lambda: len(fake.requests) == 1)
        late = await post(s, p.url, BOB_KEY)
        assert late.status == 429 and 0.25 <= late.seconds < 0.9
        assert "max_concurrent limit of 1 for provider openai" in late.error["message"]
        assert late.headers["retry-after"] == "1"
        assert (await holder).status == 200
        # The slot came back: the next one goes straight through.
        assert (await post(s, p.url, BOB_KEY)).status == 200
    assert p.metric("meterproxy_limit_rejections_total",
                    {"user": "bob", "team": "none", "limit": "provider_max_concurrent"}) == 1


async def test_reject_mode_does_not_wait_for_a_provider_slot(start_proxy: StartProxy, fake: FakeProvider) -> None:
    p = await start_proxy({"providers": {"openai": {"max_concurrent": 2}}})
    replies = await burst(p.url, 6, headers={"x-fake-delay": "0.4"})
    assert statuses(replies) == {200: 2, 429: 4}
    assert all(r.seconds < 0.3 for r in replies if r.status == 429)


async def test_queue_mode_waits_for_the_subjects_own_lease(start_proxy: StartProxy, fake: FakeProvider) -> None:
    p = await start_proxy({"plans": {"free": {"max_concurrent": 1, "on_limit": "queue", "max_queue_seconds": 3}}})
    replies = await burst(p.url, 3, headers={"x-fake-delay": "0.2"})
    assert statuses(replies) == {200: 3}
    starts = sorted(r.received_at for r in fake.requests)
    # One at a time: each began only after the one before had finished upstream.
    assert all(b - a >= 0.18 for a, b in zip(starts, starts[1:], strict=False))


async def test_queue_mode_refuses_at_once_when_the_wait_is_longer_than_the_queue(
        start_proxy: StartProxy) -> None:
    p = await start_proxy({"plans": {"free": {"rpm": 1, "on_limit": "queue", "max_queue_seconds": 2}}})
    async with aiohttp.ClientSession() as s:
        assert (await post(s, p.url)).status == 200
        second = await post(s, p.url)
    assert second.status == 429 and second.seconds < 0.5  # the window frees in ~60 s: waiting 2 s is pointless


def test_slot_waiter_cancelled_does_not_leak() -> None:
    async def run() -> None:
        slot = ProviderSlot(1)
        assert await slot.acquire(1, 0)
        waiter = asyncio.create_task(slot.acquire(1, 5))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        slot.release()
        assert slot.used == 0
        assert await slot.acquire(1, 0)

    asyncio.run(run())


# ---------------------------------------------------------------- headers, error shapes


async def test_headers_count_down_and_reset(start_proxy: StartProxy, tokenizer: Tokenizer) -> None:
    budget = 10_000
    p = await start_proxy({**PRICES, "plans": {"free": {"rpm": 3, "tpm": 1000, "usd_per_day": usd(budget)}}})
    body = chat_body(max_tokens=20)
    prompt = tokenizer.estimate_prompt(ApiKind.CHAT, MODEL, body)
    reserve = prompt + 20
    actual = FAKE_PROMPT + 12  # the fake answers 12 tokens
    async with aiohttp.ClientSession() as s:
        replies = []
        for _ in range(4):
            replies.append(await post(s, p.url, body=body))
            await p.settled()
    for i, r in enumerate(replies[:3]):
        assert r.status == 200
        h = r.headers
        assert h["x-ratelimit-limit-requests"] == "3"
        assert h["x-ratelimit-remaining-requests"] == str(2 - i)
        assert h["x-ratelimit-limit-tokens"] == "1000"
        # Earlier requests count what they used; this one what it reserved.
        assert h["x-ratelimit-remaining-tokens"] == str(1000 - i * actual - reserve)
        assert RESET.match(h["x-ratelimit-reset-requests"]) and RESET.match(h["x-ratelimit-reset-tokens"])
        assert re.fullmatch(r"5[7-9]s|1m0s", h["x-ratelimit-reset-requests"])
        assert h["x-budget-remaining-usd"] == format_usd(budget - i * (FAKE_PROMPT + 24) - (prompt + 40))
    last = replies[3]
    assert last.status == 429
    assert last.headers["x-ratelimit-remaining-requests"] == "0"
    assert 57 <= int(last.headers["retry-after"]) <= 60


def test_reset_format_is_openais() -> None:
    assert [go_duration(s) for s in (0.012, 1, 59.2, 60, 360, 3723)] == ["12ms", "1s", "1m0s", "1m0s", "6m0s", "1h2m3s"]
    assert [format_usd(m) for m in (0, 4_500_000, 10_000_000, 1)] == ["0", "4.5", "10", "0.000001"]


async def test_anthropic_shape_429(start_proxy: StartProxy) -> None:
    p = await start_proxy({"plans": {"free": {"rpm": 1}}})
    body = {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": CHAT}
    hdrs = {"x-api-key": ALICE_KEY, "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as s:
        statuses_ = []
        for _ in range(2):
            async with s.post(p.url + "/anthropic/v1/messages", json=body, headers=hdrs) as r:
                statuses_.append(r.status)
                data = await r.json()
                retry = r.headers.get("retry-after")
    assert statuses_ == [200, 429]
    assert data["type"] == "error" and data["error"]["type"] == "rate_limit_error"
    assert "rpm limit of 1" in data["error"]["message"] and retry is not None and int(retry) >= 1


# ---------------------------------------------------------------- who is limited as what


def _book(extra: dict[str, Any]) -> LimitBook:
    base: dict[str, Any] = {"providers": {"openai": {"type": "openai", "base_url": "http://127.0.0.1:1"}},
                            "default_plan": "free", "plans": {"free": {"rpm": 20, "tpm": 5000}}}
    base.update(extra)
    return LimitBook(Config.model_validate(base))


def _by(limits: tuple[Limit, ...]) -> dict[tuple[str, str, bool], int]:
    return {(lim.scope, lim.name.value, lim.enforce): lim.value for lim in limits}


def test_tightest_wins_and_team_and_key_limits_apply_on_top() -> None:
    book = _book({
        "plans": {"free": {"rpm": 20, "tpm": 5000}, "pro": {"rpm": 600}},
        "users": {"al": {"plan": "free", "team": "t", "rpm": 5, "tpm": 9000, "usd_per_day": 2}},
        "teams": {"t": {"usd_per_month": 100, "rpm": 50}},
        "keys": [{"key": "k-al", "user": "al", "rpm": 3}],
    })
    sub = Subject("al", "t", "free", key_id_of(sha256_hex("k-al")))
    assert _by(book.limits_for(sub)) == {
        ("user:al", "rpm", True): 5, ("user:al", "tpm", True): 5000, ("user:al", "usd_per_day", True): 2_000_000,
        ("team:t", "usd_per_month", True): 100_000_000, ("team:t", "rpm", True): 50,
        (f"key:{sub.key_id}", "rpm", True): 3,
    }
    assert book.tag_for(sub) == "t:t"
    # Not listed: the default plan; no team: tagged by user.
    stranger = Subject("zed", None, "free", "k0")
    assert _by(book.limits_for(stranger)) == {("user:zed", "rpm", True): 20, ("user:zed", "tpm", True): 5000}
    assert book.tag_for(stranger) == "u:zed"
    # A plan removed by a reload falls back to the default plan.
    assert book.plan_of(Subject("x", None, "gone", "k")).rpm == 20


def test_shadow_limit_kept_beside_the_enforced_one() -> None:
    book = _book({"users": {"al": {"rpm": 5, "tpm": 99999, "enforce": False}}})
    got = _by(book.limits_for(Subject("al", None, "free", "k")))
    # Trialling rpm 5 in shadow keeps the enforced rpm 20; a looser shadow tpm adds nothing.
    assert got == {("user:al", "rpm", True): 20, ("user:al", "tpm", True): 5000, ("user:al", "rpm", False): 5}


async def test_team_limit_is_shared_by_its_members(start_proxy: StartProxy) -> None:
    p = await start_proxy({"teams": {"research": {"rpm": 3}}, "users": {"carol": {"team": "research"}},
                           "keys": KEYS})
    alice = await burst(p.url, 3, ALICE_KEY)
    carol = await burst(p.url, 3, CAROL_KEY)
    assert statuses(alice + carol) == {200: 3, 429: 3}
    refused = next(r for r in alice + carol if r.status == 429)
    assert "rpm limit of 3 for team:research" in refused.error["message"]


async def test_trusted_key_end_users_are_their_own_subjects(start_proxy: StartProxy, fake: FakeProvider) -> None:
    p = await start_proxy({"plans": {"free": {"rpm": 2}}})
    for end_user in ("u1", "u2"):
        replies = await burst(p.url, 3, BACKEND_KEY, headers={"x-meterproxy-user": end_user})
        assert statuses(replies) == {200: 2, 429: 1}
        refused = next(r for r in replies if r.status == 429)
        assert f"for user:{end_user}" in refused.error["message"]
    assert all("x-meterproxy-user" not in r.headers for r in fake.requests)  # never sent upstream
    # An untrusted key cannot pick its subject: the header is ignored and bob is limited as bob.
    replies = [*await burst(p.url, 2, BOB_KEY, headers={"x-meterproxy-user": "x1"}),
               *await burst(p.url, 1, BOB_KEY, headers={"x-meterproxy-user": "x2"})]
    assert statuses(replies) == {200: 2, 429: 1}
    assert p.metric("meterproxy_limit_rejections_total", {"user": "bob", "team": "none", "limit": "rpm"}) == 1


# ---------------------------------------------------------------- beyond the peers


async def test_clamp_lowers_max_tokens_to_what_the_budget_affords(
        start_proxy: StartProxy, fake: FakeProvider, tokenizer: Tokenizer) -> None:
    body = chat_body(max_tokens=1000)
    prompt = tokenizer.estimate_prompt(ApiKind.CHAT, MODEL, body)
    budget = prompt + 2 * 100  # room for the prompt and 100 output tokens
    p = await start_proxy({**PRICES, "plans": {"free": {"usd_per_day": usd(budget)}}})
    async with aiohttp.ClientSession() as s:
        r = await post(s, p.url, body=body)
    assert r.status == 200
    assert fake.last.json()["max_tokens"] == 100
    assert r.headers["x-budget-remaining-usd"] == "0"


async def test_clamp_off_refuses_instead(start_proxy: StartProxy, fake: FakeProvider, tokenizer: Tokenizer) -> None:
    body = chat_body(max_tokens=1000)
    budget = tokenizer.estimate_prompt(ApiKind.CHAT, MODEL, body) + 2 * 100
    p = await start_proxy({**PRICES, "plans": {"free": {"usd_per_day": usd(budget), "on_limit_clamp": False}}})
    async with aiohttp.ClientSession() as s:
        r = await post(s, p.url, body=body)
    assert r.status == 429 and r.error["code"] == "insufficient_quota" and not fake.requests


async def _learn(p: Proxy, n: int, chunks: int) -> None:
    """n uncapped requests, one after another, each writing `chunks` tokens: the user's recent outputs."""
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            assert (await post(s, p.url, headers={"x-fake-chunks": str(chunks)})).status == 200
            await p.settled()


async def test_reservation_sized_from_recent_outputs_and_deficit_charged(
        start_proxy: StartProxy, tokenizer: Tokenizer) -> None:
    p = await start_proxy({"plans": {"free": {"tpm": 100_000}}})
    body = chat_body()  # no max_tokens: without history the default (4096) is reserved
    prompt = tokenizer.estimate_prompt(ApiKind.CHAT, MODEL, body)
    async with aiohttp.ClientSession() as s:
        first = await post(s, p.url, body=body, headers={"x-fake-chunks": "10"})
    await p.settled()
    assert first.headers["x-ratelimit-remaining-tokens"] == str(100_000 - prompt - 4096)
    await _learn(p, 8, 10)
    async with aiohttp.ClientSession() as s:
        sized = await post(s, p.url, body=body, headers={"x-fake-chunks": "40"})
    sofar = 9 * (FAKE_PROMPT + 10)
    assert sized.headers["x-ratelimit-remaining-tokens"] == str(100_000 - sofar - prompt - 10)
    await p.settled()
    # It wrote 40, not the 10 reserved: settle charged the difference.
    stored = await used(p, subject("alice", ALICE_KEY, "research"))
    assert stored[("user:alice", LimitName.TPM)] == sofar + FAKE_PROMPT + 40


async def _stream(p: Proxy, headers: dict[str, str]) -> tuple[int, list[dict[str, Any]]]:
    async with aiohttp.ClientSession() as s, s.post(
            p.url + "/openai/v1/chat/completions", json=chat_body(stream=True),
            headers={"Authorization": f"Bearer {ALICE_KEY}", **headers}) as r:
        raw = await r.read()
    events = [orjson.loads(line[6:]) for line in raw.decode().split("\n")
              if line.startswith("data: ") and line != "data: [DONE]"]
    return r.status, events


async def test_stream_running_past_its_budget_is_ended_with_an_error_event(
        start_proxy: StartProxy, tokenizer: Tokenizer) -> None:
    day = 600
    p = await start_proxy({"plans": {"free": {"tokens_per_day": day}}})
    await _learn(p, 8, 10)  # p95 10: an uncapped request now reserves 10 output tokens
    status, events = await _stream(p, {"x-fake-chunks": "1500", "x-fake-chunk-delay": "0.0005"})
    await p.settled()
    assert status == 200
    err = events[-1]["error"]
    assert err["code"] == "rate_limit_exceeded" and f"tokens_per_day limit of {day}" in err["message"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e.get("choices"))
    written = tokenizer.count_text(MODEL, text)
    # The output the budget had room for, counted the way the proxy counts a stream in flight.
    room = day - 8 * (FAKE_PROMPT + 10) - tokenizer.estimate_prompt(ApiKind.CHAT, MODEL, chat_body(stream=True))
    # Topped up as far as the budget went, ended once past it by the slack (10%) and a little lag.
    assert room < written <= room * 1.1 + 30
    assert p.metric("meterproxy_limit_rejections_total",
                    {"user": "alice", "team": "research", "limit": "stream_overrun"}) == 1


async def test_stream_within_limits_is_topped_up_not_ended(start_proxy: StartProxy) -> None:
    p = await start_proxy({"plans": {"free": {"tokens_per_day": 1_000_000}}})
    await _learn(p, 8, 10)
    status, events = await _stream(p, {"x-fake-chunks": "800"})
    assert status == 200 and not any("error" in e for e in events)
    assert sum(1 for e in events if e.get("choices") and e["choices"][0]["delta"].get("content")) == 800
    await p.settled()
    stored = (await used(p, subject("alice", ALICE_KEY, "research")))[("user:alice", LimitName.TOKENS_PER_DAY)]
    assert stored == 9 * FAKE_PROMPT + 8 * 10 + 800  # top-ups given back: only what was used stays


async def test_shadow_mode_admits_everything_and_counts(start_proxy: StartProxy) -> None:
    p = await start_proxy({"plans": {"free": {"rpm": 2, "tokens_per_day": 100, "enforce": False}}})
    replies = await burst(p.url, 5)
    assert statuses(replies) == {200: 5}
    labels = {"user": "alice", "team": "research"}
    assert p.metric("meterproxy_shadow_rejections_total", {**labels, "limit": "rpm"}) == 3
    assert p.metric("meterproxy_limit_rejections_total", {**labels, "limit": "rpm"}) == 0
    # A shadow budget does not end streams either; it counts the overrun once.
    await _learn(p, 8, 10)
    status, events = await _stream(p, {"x-fake-chunks": "300"})
    assert status == 200 and not any("error" in e for e in events)
    await p.settled()  # the shadow top-up that counts the overrun may still be in flight
    assert p.metric("meterproxy_shadow_rejections_total", {**labels, "limit": "stream_overrun"}) == 1


async def test_a_reservation_beyond_every_limit_is_refused_or_counted_never_an_error(
        store_url: str, start_proxy: StartProxy) -> None:
    # max_tokens near 2**63: an enforced tpm refuses it (429, not 500 or 503), and a shadow one
    # counts it, again and again, without overflowing its counter in either store.
    p = await start_proxy({"store": store_url, "plans": {"free": {"tpm": 1000}, "pro": {"tpm": 1000, "enforce": False}},
                           "users": {"alice": {"plan": "free"}, "bob": {"plan": "pro"}}})
    huge = chat_body(max_tokens=2**63 - 1)
    refused = await burst(p.url, 1, body=huge)
    assert refused[0].status == 429 and "tpm" in refused[0].error["message"]
    replies = await burst(p.url, 3, key=BOB_KEY, body=huge)  # bob is on the pro plan
    assert statuses(replies) == {200: 3}
    await p.settled()
    assert p.metric("meterproxy_shadow_rejections_total", {"user": "bob", "team": "none", "limit": "tpm"}) == 3
    # The store took every admission and settle itself (a Redis error would have been served open, locally).
    assert p.metric("meterproxy_store_fallback_admissions_total") == 0
    assert all(p.metric("meterproxy_store_errors_total", {"op": op}) == 0 for op in ("admit", "settle"))


# ---------------------------------------------------------------- store failure


def _persistent_redis(tmp_path: Path) -> RedisProc:
    # appendfsync always: what a script wrote survives SIGKILL, as on a durable production Redis.
    server = RedisProc(port=free_port(), workdir=tmp_path / "aof",
                       extra_args=("--appendonly", "yes", "--appendfsync", "always"))
    server.spawn()
    return server


async def test_redis_killed_mid_load_open_mode_serves_all_and_totals_end_exact(
        start_proxy: StartProxy, tmp_path: Path) -> None:
    server = _persistent_redis(tmp_path)
    try:
        p = await start_proxy({"store": server.url, "store_timeout": 0.2, **PRICES,
                               "plans": {"free": {"rpm": 10_000, "tokens_per_day": 10_000_000,
                                                  "usd_per_day": 1000, "max_concurrent": 50}}})
        replies: list[Reply] = []
        async with aiohttp.ClientSession() as s:
            async def load(n: int) -> None:
                for _ in range(n):
                    replies.append(await post(s, p.url, headers={"x-fake-delay": "0.02"}))

            workers = [asyncio.create_task(load(30)) for _ in range(4)]
            await asyncio.sleep(0.25)
            server.kill()
            await asyncio.sleep(0.5)
            server.spawn()  # same port and data directory: the AOF brings the counters back
            await asyncio.gather(*workers)
        assert statuses(replies) == {200: 120}
        assert p.metric("meterproxy_store_fallback_admissions_total") > 0
        await p.settled()
        gate = p.svc.gate
        for _ in range(100):  # the replay loop pushes what was kept locally
            if not gate.pending_replays and not gate.store_down:
                break
            await asyncio.sleep(0.1)
        assert gate.pending_replays == 0
        events = [e for e in ledger(tmp_path) if e["user"] == "alice"]
        assert len(events) == 120
        stored = await used(p, subject("alice", ALICE_KEY, "research"))
        assert stored[("user:alice", LimitName.TOKENS_PER_DAY)] == sum(total_tokens(e) for e in events)
        assert stored[("user:alice", LimitName.USD_PER_DAY)] == sum(e["cost_micro_usd"] for e in events)
        assert stored[("user:alice", LimitName.RPM)] == 120
        assert stored[("user:alice", LimitName.MAX_CONCURRENT)] == 0  # no lease leaked
        # The usage aggregates (admin API, CLI) got every request exactly once too.
        rows = await gate.store.aggregates((gate.periods(time.time())[0],), user="alice")
        assert sum(r.totals.requests for r in rows) == 120
        assert sum(r.totals.tokens for r in rows) == sum(total_tokens(e) for e in events)
        assert sum(r.totals.cost_micro_usd for r in rows) == sum(e["cost_micro_usd"] for e in events)
    finally:
        server.stop()


async def test_redis_killed_closed_mode_503_then_recovers(start_proxy: StartProxy, tmp_path: Path) -> None:
    server = _persistent_redis(tmp_path)
    try:
        p = await start_proxy({"store": server.url, "store_timeout": 0.2, "on_store_failure": "closed",
                               "plans": {"free": {"rpm": 1000}}})
        sent: list[Reply] = []
        async with aiohttp.ClientSession() as s:
            async def send() -> Reply:
                sent.append(await post(s, p.url))
                return sent[-1]

            assert (await send()).status == 200
            server.kill()
            down = [await send() for _ in range(5)]
            assert [r.status for r in down] == [503] * 5
            assert all(r.seconds < 1.0 for r in down)
            assert down[0].error["code"] == "store_unavailable" and down[0].headers["retry-after"] == "1"
            assert p.metric("meterproxy_store_fallback_admissions_total") == 0
            server.spawn()
            deadline = time.monotonic() + 8
            while (r := await send()).status != 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert r.status == 200
            assert [(await send()).status for _ in range(3)] == [200] * 3
        assert p.metric("meterproxy_store_errors_total", {"op": "admit"}) >= 1
        await p.settled()
        gate = p.svc.gate
        for _ in range(50):
            if not gate.pending_replays:
                break
            await asyncio.sleep(0.1)
        # The refusals were metered too, through the replay queue once Redis was back.
        rows = await gate.store.aggregates((gate.periods(time.time())[0],), user="alice")
        assert sum(r.totals.requests for r in rows) == len(sent)
    finally:
        server.stop()


async def test_commands_sent_at_once_land_once_when_redis_lost_its_scripts_or_the_hash(
        redis_server: RedisProc, start_proxy: StartProxy, tmp_path: Path) -> None:
    """The Redis admit and settle go out as one command each, with no coroutine layers or task.
    When Redis has lost its scripts (NOSCRIPT) both reload them and still count once; when the
    hash a settle adds to was gone, the day index lists it again. None lost, none doubled."""
    _clean(redis_server.url)
    p = await start_proxy({"store": redis_server.url, **PRICES,
                           "plans": {"free": {"rpm": 1000, "tokens_per_day": 10_000_000}}})
    gate = p.svc.gate
    day = gate.periods(time.time())[0]
    alice = subject("alice", ALICE_KEY, "research")
    r = redis.Redis.from_url(redis_server.url)
    async with aiohttp.ClientSession() as s:
        assert (await post(s, p.url)).status == 200  # the day index now lists alice's hash
        await p.settled()
        r.script_flush()  # a Redis restarted without its script cache
        assert (await post(s, p.url)).status == 200
        await p.settled()
        events = [e for e in ledger(tmp_path) if e["user"] == "alice"]
        assert len(events) == 2
        stored = await used(p, alice)
        assert stored[("user:alice", LimitName.TOKENS_PER_DAY)] == sum(total_tokens(e) for e in events)
        assert stored[("user:alice", LimitName.RPM)] == 2
        assert sum(x.totals.requests for x in await gate.store.aggregates((day,), user="alice")) == 2
        for key in r.scan_iter(match="mp:*agg*"):  # the hash and the index both lost
            r.delete(key)
        assert await gate.store.aggregates((day,), user="alice") == ()
        assert (await post(s, p.url)).status == 200
        await p.settled()
    r.close()
    events = [e for e in ledger(tmp_path) if e["user"] == "alice"]
    rows = await gate.store.aggregates((day,), user="alice")
    assert sum(x.totals.requests for x in rows) == 1  # the third request, listed again
    assert sum(x.totals.tokens for x in rows) == total_tokens(events[-1])
    assert (await used(p, alice))[("user:alice", LimitName.TOKENS_PER_DAY)] == sum(total_tokens(e) for e in events)


async def test_gate_is_rebuilt_on_reload_without_losing_state(start_proxy: StartProxy) -> None:
    p = await start_proxy({"plans": {"free": {"rpm": 100}}})
    old = p.svc.gate
    new = Gate(old.config, old.store, old.prices, old.metrics, old.tz)
    new.adopt(old)
    assert new.pending_replays == old.pending_replays and new._state is old._state
