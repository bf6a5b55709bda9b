"""One contract suite for every quota store (memory, Redis, Redis Cluster): limits, atomic
all-or-nothing admission, bursts, leases, windows, idempotent settling, shadow limits, faults.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest
from redis.asyncio import Redis
from redisproc import ClusterProc, RedisProc, monitored, start_redis

from proxy.errors import StoreError
from proxy.quota.counters import WINDOW_TTL_SECONDS
from proxy.quota.memory import MemoryStore
from proxy.quota.redis_store import RedisStore, split_cluster_flag
from proxy.quota.store import (
    Admission,
    AggregateDelta,
    Decision,
    LayoutSlot,
    Limit,
    LimitName,
    QuotaStore,
    Reservation,
    Totals,
)

T0 = 1_900_000_000.25  # 2030-03-17T17:46:40Z, mid-day UTC
DAY = "2030-03-17"
MONTH = "2030-03"
TAG = "team-a"
T = TypeVar("T")





def lim(name: LimitName, value: int, scope: str = "user:al", enforce: bool = True) -> Limit:
    return Limit(scope=scope, name=name, value=value, enforce=enforce)


def adm(*limits: Limit, tokens: int = 0, cost: int = 0, now: float = T0, day: str = DAY,
        month: str = MONTH, rid: str | None = None, lease: float = 600.0) -> Admission:
    return Admission(request_id=rid or uuid.uuid4().hex, tag=TAG, limits=limits, tokens=tokens,
                     cost_micro_usd=cost, now=now, day=day, month=month, lease_seconds=lease)


async def used(store: QuotaStore, *limits: Limit, now: float = T0, day: str = DAY,
               month: str = MONTH) -> list[int]:
    return [s.used for s in await store.usage(limits, TAG, now, day, month)]


def reservation(decision: Decision) -> Reservation:
    assert decision.admitted and decision.reservation is not None
    return decision.reservation


@pytest.mark.parametrize(
    ("name", "value", "tokens", "cost", "per_request"),
    [
        (LimitName.RPM, 3, 500, 7, 1),
        (LimitName.TPM, 1000, 300, 7, 300),
        (LimitName.TOKENS_PER_DAY, 1000, 250, 7, 250),
        (LimitName.USD_PER_DAY, 100, 40, 30, 30),
        (LimitName.USD_PER_MONTH, 100, 40, 25, 25),
        (LimitName.MAX_CONCURRENT, 2, 40, 25, 1),
    ],
)
async def test_each_limit_admits_up_to_its_value_then_refuses(
    store: QuotaStore, name: LimitName, value: int, tokens: int, cost: int, per_request: int
) -> None:
    limit = lim(name, value)
    fits = value // per_request
    for i in range(fits):
        decision = await store.admit(adm(limit, tokens=tokens, cost=cost, now=T0 + i * 0.1))
        assert decision.admitted, (name, i)
        assert decision.denied is None
        assert decision.states[0].used == (i + 1) * per_request
    refused = await store.admit(adm(limit, tokens=tokens, cost=cost, now=T0 + 1))
    assert not refused.admitted
    assert refused.reservation is None
    assert refused.denied == limit
    assert refused.retry_after_seconds > 0
    assert refused.states[0].used == fits * per_request
    assert await used(store, limit, now=T0 + 1) == [fits * per_request]


async def test_refusal_leaves_every_other_counter_unchanged(store: QuotaStore) -> None:
    others = (
        lim(LimitName.RPM, 100), lim(LimitName.TPM, 10_000), lim(LimitName.TOKENS_PER_DAY, 10_000),
        lim(LimitName.USD_PER_DAY, 10_000), lim(LimitName.USD_PER_MONTH, 10_000),
        lim(LimitName.MAX_CONCURRENT, 10),
    )
    tight = lim(LimitName.USD_PER_DAY, 150, scope="team:a")
    assert (await store.admit(adm(*others, tight, tokens=100, cost=100))).admitted
    before = await used(store, *others, tight)
    assert before == [1, 100, 100, 100, 100, 1, 100]
    refused = await store.admit(adm(*others, tight, tokens=100, cost=100))
    assert not refused.admitted and refused.denied == tight
    assert await used(store, *others, tight) == before
    # The refusing limit is reported wherever it sits in the order.
    refused = await store.admit(adm(tight, *others, tokens=100, cost=100))
    assert refused.denied == tight
    assert await used(store, *others, tight) == before


async def test_burst_of_50_against_rpm_10_admits_exactly_10(store: QuotaStore) -> None:
    limit = lim(LimitName.RPM, 10)
    decisions = await asyncio.gather(*(store.admit(adm(limit, now=T0 + i * 0.001))
                                       for i in range(50)))
    assert sum(d.admitted for d in decisions) == 10
    assert all(d.denied == limit for d in decisions if not d.admitted)
    assert await used(store, limit) == [10]


async def test_burst_against_usd_budget_admits_exactly_k_and_settles_within_it(
    store: QuotaStore,
) -> None:
    budget = lim(LimitName.USD_PER_DAY, 1_000_000)
    reserve = 70_000  # 14 fit, the 15th would make 1_050_000
    decisions = await asyncio.gather(*(store.admit(adm(budget, cost=reserve, tokens=10))
                                       for _ in range(40)))
    admitted = [reservation(d) for d in decisions if d.admitted]
    assert len(admitted) == 1_000_000 // reserve
    assert await used(store, budget) == [len(admitted) * reserve]
    actuals = [reserve - 1000 * i for i in range(len(admitted))]
    settled = await asyncio.gather(*(store.settle(r, 10, a, T0 + 5)
                                     for r, a in zip(admitted, actuals, strict=True)))
    assert all(settled)
    total = (await used(store, budget, now=T0 + 5))[0]
    assert total == sum(actuals) <= budget.value


async def test_max_concurrent_slot_returns_after_settle(store: QuotaStore) -> None:
    slots = lim(LimitName.MAX_CONCURRENT, 2)
    first = reservation(await store.admit(adm(slots)))
    assert (await store.admit(adm(slots))).admitted
    third = await store.admit(adm(slots))
    assert not third.admitted and third.denied == slots
    assert third.retry_after_seconds == pytest.approx(1.0)
    assert await store.settle(first, 0, 0, T0 + 1)
    assert await used(store, slots, now=T0 + 1) == [1]
    assert (await store.admit(adm(slots, now=T0 + 1))).admitted


async def test_expired_lease_frees_its_slot(store: QuotaStore) -> None:
    slots = lim(LimitName.MAX_CONCURRENT, 1)
    assert (await store.admit(adm(slots, lease=30))).admitted
    assert not (await store.admit(adm(slots, now=T0 + 29, lease=30))).admitted
    assert await used(store, slots, now=T0 + 31) == [0]
    assert (await store.admit(adm(slots, now=T0 + 31, lease=30))).admitted


async def test_sliding_window_frees_up_after_60_seconds(store: QuotaStore) -> None:
    rpm, tpm = lim(LimitName.RPM, 2), lim(LimitName.TPM, 100)
    assert (await store.admit(adm(rpm, tpm, tokens=60))).admitted
    assert (await store.admit(adm(rpm, now=T0 + 30))).admitted
    refused = await store.admit(adm(rpm, now=T0 + 40))
    assert not refused.admitted and refused.denied == rpm
    # The first use leaves the window 60 s after it; the second 30 s later.
    assert refused.retry_after_seconds == pytest.approx(20, abs=1)
    refused = await store.admit(adm(tpm, tokens=60, now=T0 + 40))
    assert refused.denied == tpm and refused.retry_after_seconds == pytest.approx(20, abs=1)
    assert not (await store.admit(adm(rpm, now=T0 + 59))).admitted
    assert await used(store, rpm, tpm, now=T0 + 60) == [1, 0]
    assert (await store.admit(adm(rpm, tpm, tokens=100, now=T0 + 60))).admitted
    assert not (await store.admit(adm(rpm, now=T0 + 61))).admitted
    assert await used(store, rpm, tpm, now=T0 + 91) == [1, 100]


async def test_retry_after_waits_for_enough_usage_to_leave(store: QuotaStore) -> None:
    tpm = lim(LimitName.TPM, 100)
    for i in range(4):
        assert (await store.admit(adm(tpm, tokens=25, now=T0 + 10 * i))).admitted
    # Needs 50 free: the uses at +0 and +10 must both leave, at +60 and +70.
    refused = await store.admit(adm(tpm, tokens=50, now=T0 + 35))
    assert refused.retry_after_seconds == pytest.approx(35, abs=1)
    too_big = await store.admit(adm(tpm, tokens=101, now=T0 + 35))
    assert not too_big.admitted and too_big.denied == tpm
    assert await used(store, tpm, now=T0 + 35) == [100]


async def test_settle_is_idempotent(store: QuotaStore) -> None:
    limits = (lim(LimitName.TPM, 1000), lim(LimitName.USD_PER_MONTH, 1000),
              lim(LimitName.MAX_CONCURRENT, 5), lim(LimitName.RPM, 5))
    res = reservation(await store.admit(adm(*limits, tokens=300, cost=200)))
    assert await store.settle(res, 120, 80, T0 + 2)
    after = await used(store, *limits, now=T0 + 2)
    assert after == [120, 80, 0, 1]  # requests are not refunded: the request happened
    assert not await store.settle(res, 120, 80, T0 + 3)
    assert not await store.settle(res, 0, 0, T0 + 3)
    assert await used(store, *limits, now=T0 + 3) == after


async def test_counters_never_go_negative(store: QuotaStore) -> None:
    limits = (lim(LimitName.TPM, 10_000), lim(LimitName.TOKENS_PER_DAY, 10_000),
              lim(LimitName.USD_PER_DAY, 10_000))
    over = reservation(await store.admit(adm(*limits, tokens=100, cost=100)))
    assert await store.settle(over, 250, 300, T0 + 1)
    assert await used(store, *limits, now=T0 + 1) == [250, 250, 300]
    under = reservation(await store.admit(adm(*limits, tokens=100, cost=100, now=T0 + 1)))
    assert await store.settle(under, 0, 0, T0 + 2)
    assert await used(store, *limits, now=T0 + 2) == [250, 250, 300]
    # A reservation settled after the day's counter is gone refunds nothing and clamps at 0.
    tiny = reservation(await store.admit(adm(*limits, tokens=5, cost=5, day="2030-03-18",
                                             now=T0 + 3)))
    assert await store.settle(tiny, 0, 0, T0 + 4)
    forged = Reservation(uuid.uuid4().hex, TAG, limits, 10_000, 10_000, T0 + 3, "2030-03-18",
                         MONTH)
    assert not await store.settle(forged, 0, 0, T0 + 5)
    assert await used(store, *limits, now=T0 + 5, day="2030-03-18") == [250, 0, 0]


async def test_settle_corrects_the_reserved_bucket_and_period(store: QuotaStore) -> None:
    tpm, usd = lim(LimitName.TPM, 10_000), lim(LimitName.USD_PER_DAY, 10_000)
    res = reservation(await store.admit(adm(tpm, usd, tokens=100, cost=100)))
    assert await store.settle(res, 40, 30, T0 + 30)
    # The actual 40 tokens sit in the admission's second, so they leave the window with it.
    assert await used(store, tpm, now=T0 + 59) == [40]
    assert await used(store, tpm, now=T0 + 60) == [0]
    late = reservation(await store.admit(adm(usd, cost=100, now=T0 + 60)))
    # Settled the next day: yesterday's spend is corrected, today's is untouched.
    assert await store.settle(late, 0, 50, T0 + 86_400)
    assert await used(store, usd) == [80]
    assert await used(store, usd, now=T0 + 86_400, day="2030-03-18") == [0]


async def test_shadow_limit_never_refuses(store: QuotaStore) -> None:
    shadow = lim(LimitName.RPM, 1, enforce=False)
    enforced = lim(LimitName.TPM, 1000)
    first = await store.admit(adm(shadow, enforced, tokens=10))
    assert first.admitted and first.shadow_denied == ()
    second = await store.admit(adm(shadow, enforced, tokens=10))
    assert second.admitted and second.denied is None
    assert second.shadow_denied == (shadow,)
    assert await used(store, shadow, enforced) == [2, 20]
    # An enforced refusal still reports the shadow one and counts nothing.
    refused = await store.admit(adm(shadow, enforced, tokens=2000))
    assert not refused.admitted and refused.denied == enforced
    assert refused.shadow_denied == (shadow,)
    assert await used(store, shadow, enforced) == [2, 20]


async def test_remaining_counts_down_and_reset_is_positive(store: QuotaStore) -> None:
    limits = (lim(LimitName.RPM, 3), lim(LimitName.TPM, 1000), lim(LimitName.USD_PER_DAY, 500),
              lim(LimitName.USD_PER_MONTH, 5000), lim(LimitName.MAX_CONCURRENT, 3))
    seen = []
    for i in range(3):
        decision = await store.admit(adm(*limits, tokens=100, cost=50, now=T0 + i))
        assert decision.admitted
        assert [s.limit for s in decision.states] == list(limits)
        seen.append([s.remaining for s in decision.states])
        rpm, tpm, day, month, _ = decision.states
        assert 0 < rpm.reset_seconds <= 60 and 0 < tpm.reset_seconds <= 60
        # Day and month end at UTC midnight (the store's default zone).
        assert day.reset_seconds == pytest.approx(1_900_022_400 - (T0 + i))
        assert month.reset_seconds == pytest.approx(1_901_232_000 - (T0 + i))
    assert seen == [[2, 900, 450, 4950, 2], [1, 800, 400, 4900, 1], [0, 700, 350, 4850, 0]]
    last = decision.states
    # The oldest use (at T0, in bucket floor(T0)) leaves the window at floor(T0) + 60.
    assert last[0].reset_seconds == pytest.approx(60 - 2.25, abs=0.01)
    assert last[4].reset_seconds > 0  # no slot free


async def test_new_day_brings_a_fresh_budget(store: QuotaStore) -> None:
    limits = (lim(LimitName.USD_PER_DAY, 100), lim(LimitName.TOKENS_PER_DAY, 100),
              lim(LimitName.USD_PER_MONTH, 250))
    assert (await store.admit(adm(*limits, tokens=100, cost=100))).admitted
    refused = await store.admit(adm(*limits, tokens=1, cost=1, now=T0 + 10))
    assert refused.denied == limits[0]
    assert refused.retry_after_seconds == pytest.approx(1_900_022_400 - (T0 + 10))
    tomorrow = await store.admit(adm(*limits, tokens=100, cost=100, now=T0 + 86_400,
                                     day="2030-03-18"))
    assert tomorrow.admitted
    assert [s.used for s in tomorrow.states] == [100, 100, 200]
    refused = await store.admit(adm(*limits, tokens=0, cost=100, now=T0 + 2 * 86_400,
                                    day="2030-03-19"))
    assert refused.denied == limits[2]


async def test_a_subjects_held_layout_follows_the_day_and_settles_where_it_reserved(store: QuotaStore) -> None:
    """The gate hands a subject's admissions one LayoutSlot so the store finds the subject's layout
    without a lookup, and the reservation carries the layout to its settle. The held layout must
    not carry an admission into another day's counters; a settle after the next day's admission
    took the slot still corrects the day it reserved in; and the usage aggregates a layout holds
    go to each event's own user and day."""
    slot = LayoutSlot()
    limits = (lim(LimitName.TOKENS_PER_DAY, 1000),)
    tomorrow, later = "2030-03-18", T0 + 86_400

    def with_slot(admission: Admission) -> Admission:
        return replace(admission, limits=limits, slot=slot)  # the gate's one tuple per subject

    def delta(day: str, user: str, tokens: int) -> AggregateDelta:
        return AggregateDelta(uuid.uuid4().hex, TAG, day, user, None, "gpt-x",
                              Totals(requests=1, input_tokens=tokens))

    first = reservation(await store.admit(with_slot(adm(*limits, tokens=300))))
    again = reservation(await store.admit(with_slot(adm(*limits, tokens=50))))
    second = reservation(await store.admit(with_slot(adm(*limits, tokens=200, now=later, day=tomorrow))))
    assert slot.layout is not None and slot.layout.day == tomorrow
    assert await used(store, *limits) == [350]
    assert await used(store, *limits, now=later, day=tomorrow) == [200]
    assert await store.settle_and_record(first, delta(DAY, "al", 100), later + 1)
    assert await store.settle_and_record(again, delta(DAY, "bo", 20), later + 2)  # the same layout, another user
    assert await store.settle_and_record(second, delta(tomorrow, "al", 150), later + 3)
    assert await used(store, *limits, now=T0 + 1) == [120]
    assert await used(store, *limits, now=later + 3, day=tomorrow) == [150]
    rows = {(r.day, r.user): r.totals.input_tokens for r in await store.aggregates((DAY, tomorrow))}
    assert rows == {(DAY, "al"): 100, (DAY, "bo"): 20, (tomorrow, "al"): 150}


async def test_same_counter_named_twice_is_counted_once(store: QuotaStore) -> None:
    loose, strict = lim(LimitName.TPM, 1000), lim(LimitName.TPM, 150)
    decision = await store.admit(adm(loose, strict, tokens=100))
    assert decision.admitted
    assert [s.used for s in decision.states] == [100, 100]
    assert (await store.admit(adm(loose, strict, tokens=100))).denied == strict


async def test_retried_admission_is_counted_once(store: QuotaStore) -> None:
    limits = (lim(LimitName.RPM, 5), lim(LimitName.USD_PER_DAY, 100),
              lim(LimitName.MAX_CONCURRENT, 1))
    admission = adm(*limits, cost=60, rid="retried")
    first = await store.admit(admission)
    again = await store.admit(admission)  # e.g. the first reply was lost to a timeout
    assert first.admitted and again.admitted and again.reservation == first.reservation
    assert [s.used for s in again.states] == [1, 60, 1]
    assert await used(store, *limits) == [1, 60, 1]
    assert await store.settle(reservation(again), 0, 10, T0 + 1)
    assert await used(store, *limits, now=T0 + 1) == [1, 10, 0]


async def test_memory_store_drops_expired_counters() -> None:
    store = MemoryStore()
    for i in range(200):
        await store.admit(adm(lim(LimitName.RPM, 5, scope=f"user:{i}"),
                              lim(LimitName.USD_PER_DAY, 5, scope=f"user:{i}"), cost=1,
                              now=T0 + i))
    # Windows outlive their last use by at most their TTL plus one sweep interval.
    windows = [k for k in store._cells if k.endswith(":rpm")]
    assert len(windows) <= WINDOW_TTL_SECONDS + 60 and len(store._cells) - len(windows) == 200
    # Each admission sweeps one slice of the keys there were when the sweep began: 600 keys, 3 slices.
    later = [await store.admit(adm(rid=f"later-{i}", now=T0 + 4 * 86_400)) for i in range(3)]
    assert store._cells == {}
    ids = [reservation(d).request_id for d in later]
    assert len(store._records) == 3 and all(any(i in k for i in ids) for k in store._records)


async def test_memory_store_counters_saturate_instead_of_overflowing() -> None:
    # Only a shadow limit lets this much in (the gate reserves at most MAX_LIMIT + 1), but the
    # store's 64-bit counters must stay consistent at their edge: a window's total is its buckets'
    # sum, and taking back what went in leaves what was there.
    store = MemoryStore()
    most = 2**64 - 1
    tpm, day = lim(LimitName.TPM, 10, enforce=False), lim(LimitName.TOKENS_PER_DAY, 10, enforce=False)
    first = reservation(await store.admit(adm(tpm, day, tokens=most - 5)))
    reservation(await store.admit(adm(tpm, day, tokens=most - 5, now=T0 + 1)))
    assert await used(store, tpm, day, now=T0 + 1) == [most, most]
    window = next(c for k, c in store._cells.items() if k.endswith(":tpm"))
    assert window.total == sum(window.buckets.values()) == most
    assert await store.settle(first, 7, 0, T0 + 2)
    assert await used(store, tpm, day, now=T0 + 2) == [12, 12]  # 5 + 7: the saturated second kept its 5
    assert window.total == sum(window.buckets.values())


# --- Redis only -------------------------------------------------------------------------------


async def _client_commands(url: str, action: Awaitable[T]) -> tuple[T, list[str]]:
    """`action`'s result and the commands clients sent while it ran (script-internal ones, which
    INFO commandstats would also count, are left out)."""
    result, ran = await monitored(url, action)
    return result, [r.name for r in ran if not r.from_script]


async def test_admit_and_settle_are_one_round_trip_each(redis_server: RedisProc) -> None:
    store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    await store.start()
    limits = (lim(LimitName.RPM, 10), lim(LimitName.TPM, 10_000), lim(LimitName.USD_PER_DAY, 9999),
              lim(LimitName.USD_PER_MONTH, 9999), lim(LimitName.MAX_CONCURRENT, 3))
    try:
        await store.admit(adm(*limits, tokens=5, cost=5))  # warm the connection pool
        for _ in range(3):
            decision, sent = await _client_commands(
                redis_server.url, store.admit(adm(*limits, tokens=5, cost=5)))
            assert sent == ["evalsha"]
            settled, sent = await _client_commands(
                redis_server.url, store.settle(reservation(decision), 1, 1, T0 + 1))
            assert settled and sent == ["evalsha"]
    finally:
        await store.close()


async def test_a_hash_is_listed_in_its_day_index_once_a_day(redis_server: RedisProc) -> None:
    """The day index gets one SADD per aggregate hash and day from this process: not on every
    settle (a round trip more), and again for a day it has since forgotten."""
    store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    await store.start()
    observer = Redis.from_url(redis_server.url, decode_responses=True)

    async def sent(day: str, user: str = "al") -> list[str]:
        delta = AggregateDelta(uuid.uuid4().hex, user, day, user, None, "gpt-x", Totals(requests=1))
        recorded, commands = await _client_commands(redis_server.url, store.settle_and_record(None, delta, T0))
        assert recorded
        return commands

    try:
        assert "sadd" in await sent("2030-03-17")
        assert await sent("2030-03-17") == ["evalsha"]
        assert "sadd" in await sent("2030-03-17", "bo")  # another hash, the same day
        assert "sadd" in await sent("2030-03-18")
        assert await sent("2030-03-17") == ["evalsha"]  # the day before the newest is kept
        assert "sadd" in await sent("2030-03-19")
        assert await sent("2030-03-18") == ["evalsha"]
        assert "sadd" in await sent("2030-03-17")  # older ones are forgotten: listed again
        assert "sadd" in await sent("2030-03-17")  # (and not remembered over the two newest)
        index = await observer.smembers(f"{store._prefix}agg-index:2030-03-17")
        assert len(index) == 2  # listing again writes nothing new
    finally:
        await observer.aclose()
        await store.close()


async def test_cluster_keys_share_one_slot_and_scripts_load_on_every_node(
    redis_cluster: ClusterProc,
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_cluster.url, prefix=prefix)
    await store.start()
    # Tags hashing to slots owned by different nodes all work, braces in a tag included.
    for tag in ("team-a", "team-b", "u{1}", "zzz", "alpha", "bravo", "charlie"):
        limits = (lim(LimitName.RPM, 1), lim(LimitName.USD_PER_DAY, 100, scope="team:x"),
                  lim(LimitName.MAX_CONCURRENT, 1))
        admission = Admission(uuid.uuid4().hex, tag, limits, 10, 10, T0, DAY, MONTH)
        res = reservation(await store.admit(admission))
        assert not (await store.admit(Admission(uuid.uuid4().hex, tag, limits, 10, 10, T0, DAY,
                                                MONTH))).admitted
        assert await store.settle(res, 1, 1, T0 + 1)
    await store.close()
    admit_sha = RedisStore(redis_cluster.url)._admit.sha
    for node in redis_cluster.nodes:
        client = Redis.from_url(node.url)
        try:
            assert await client.script_exists(admit_sha) == [True]
        finally:
            await client.aclose()


async def test_dead_redis_fails_fast_and_recovers_after_restart(tmp_path: Path) -> None:
    server = start_redis(tmp_path, external=False)
    store = RedisStore(server.url, prefix="fault:")
    limit = lim(LimitName.RPM, 100)
    try:
        await store.start()
        res = reservation(await store.admit(adm(limit)))
        server.kill()
        for call in (store.admit(adm(limit)), store.settle(res, 0, 0, T0),
                     store.usage((limit,), TAG, T0, DAY, MONTH)):
            started = time.monotonic()
            with pytest.raises(StoreError):
                await call
            assert time.monotonic() - started < 2
        started = time.monotonic()
        assert await store.ping() is False
        assert time.monotonic() - started < 2
        server.restart()  # empty: no data, no cached scripts
        assert await store.ping() is True
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreError):
                # Its own counter: the server may still run it once it wakes up.
                await store.admit(adm(lim(LimitName.RPM, 100, scope="user:hung")))
            assert time.monotonic() - started < 2
        finally:
            server.resume()
        assert await store.ping() is True
        decision = await store.admit(adm(limit, now=T0 + 1))
        assert decision.admitted and decision.states[0].used == 1
    finally:
        await store.close()
        server.stop()


async def test_start_fails_with_store_error_when_redis_is_down_then_connects_later(
    tmp_path: Path,
) -> None:
    server = start_redis(tmp_path, external=False)
    url = server.url
    server.kill()
    store = RedisStore(url)  # cluster mode unknown: detection needs the server
    try:
        started = time.monotonic()
        with pytest.raises(StoreError):
            await store.start()
        assert time.monotonic() - started < 2
        server.spawn()
        assert (await store.admit(adm(lim(LimitName.RPM, 1)))).admitted
    finally:
        await store.close()
        server.stop()


def test_cluster_flag_is_taken_off_the_url() -> None:
    assert split_cluster_flag("redis://h:1/0?cluster=true") == ("redis://h:1/0", True)
    assert split_cluster_flag("rediss://h:1/0?cluster=no&ssl_cert_reqs=none") == (
        "rediss://h:1/0?ssl_cert_reqs=none", False)
    assert split_cluster_flag("redis://h:1") == ("redis://h:1", None)
    with pytest.raises(ValueError):
        split_cluster_flag("redis://h:1?cluster=maybe")
    with pytest.raises(ValueError):
        RedisStore("redis://h:1", prefix="{x}:")


async def test_every_redis_key_expires(redis_server: RedisProc) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_server.url, prefix=prefix)
    observer = Redis.from_url(redis_server.url, decode_responses=True)
    limits = (lim(LimitName.RPM, 10), lim(LimitName.TPM, 10_000), lim(LimitName.USD_PER_DAY, 999),
              lim(LimitName.TOKENS_PER_DAY, 9999), lim(LimitName.USD_PER_MONTH, 999),
              lim(LimitName.MAX_CONCURRENT, 3))
    try:
        first = reservation(await store.admit(adm(*limits, tokens=5, cost=5)))
        await store.admit(adm(*limits, tokens=5, cost=5))
        await store.settle(first, 50, 50, T0 + 1)  # settling above the reservation writes too
        keys = [k async for k in observer.scan_iter(match=f"{prefix}*")]
        assert len(keys) == 7  # six counters and one unsettled reservation
        assert all(k.startswith(prefix + "{team-a}:") for k in keys)
        ttls = [await observer.ttl(k) for k in keys]
        assert all(t > 0 for t in ttls), ttls
    finally:
        await observer.aclose()
        await store.close()


def test_totals_values_follow_measures() -> None:
    from proxy.quota.store import MEASURES, Totals
    t = Totals(*range(1, len(MEASURES) + 1))
    assert t.values() == tuple(getattr(t, m) for m in MEASURES)
