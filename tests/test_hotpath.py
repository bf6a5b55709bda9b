"""The hot path's shortcuts do what the general code does: the embedded store's fast admission,
the output history's kept-sorted percentile, the in-flight gauge folded at scrape, settle as a
callback (and as a task when it has to wait)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import subprocess
import sys
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ALICE_KEY, BACKEND_KEY, base_config
from prometheus_client import CollectorRegistry
from redisproc import Ran, RedisProc, monitored

from proxy.auth import KeyRing
from proxy.config import parse_config
from proxy.metrics import Metrics
from proxy.quota.counters import AGG_TTL_SECONDS, aggregate_key
from proxy.quota.history import (
    _HISTORY_IDLE_SECONDS,
    _HISTORY_MIN_SAMPLES,
    _HISTORY_SIZE,
    _HISTORY_SUBJECTS,
    _PERCENTILE,
)
from proxy.quota.history import History as _History
from proxy.quota.memory import MemoryStore
from proxy.quota.redis_store import RedisStore
from proxy.quota.resp import pack
from proxy.quota.store import Admission, AggregateDelta, Decision, Limit, LimitName, Totals
from proxy.quota.sweep import SWEEP_SLICE as _SWEEP_SLICE
from proxy.services import Tracker

T0 = 1_900_000_000.25
TAG = "team-a"


def _general_only() -> MemoryStore:
    store = MemoryStore()
    store._admit_fast = lambda admission: None  # type: ignore[method-assign]
    return store


def _state(store: MemoryStore) -> tuple[object, ...]:
    cells = {k: (dict(c.buckets), c.total, c.expiry, c.leases) for k, c in store._cells.items()}
    return cells, dict(store._records), store._aggs


_LIMIT_SETS = [
    (Limit("user:al", LimitName.RPM, 5), Limit("user:al", LimitName.TPM, 3000)),
    (Limit("user:al", LimitName.TOKENS_PER_DAY, 20_000), Limit("user:al", LimitName.USD_PER_DAY, 90_000),
     Limit("team:a", LimitName.USD_PER_MONTH, 400_000), Limit("user:al", LimitName.RPM, 8, False)),
    (Limit("user:al", LimitName.RPM, 6), Limit("user:al", LimitName.RPM, 4, False),
     Limit("user:al", LimitName.MAX_CONCURRENT, 3)),
    (Limit("user:al", LimitName.TPM, 2000), Limit("user:al", LimitName.TPM, 2000)),  # one counter, twice
]


def _random_admissions(rng: random.Random, n: int, new_day_after: float) -> Iterator[Admission]:
    """Admissions at random steps of time (some past a whole window, one into a new day), now and
    then retrying the previous request id."""
    now = T0
    for i in range(n):
        now += rng.choice((0.0, 0.3, 1.0, 7.0, 61.0)) if rng.random() < 0.3 else 0.05
        day = "2030-03-17" if now < T0 + new_day_after else "2030-03-18"
        rid = f"r{i}" if rng.random() > 0.05 or i == 0 else f"r{i - 1}"
        yield Admission(rid, TAG, rng.choice(_LIMIT_SETS), rng.choice((0, 10, 400, 1500)),
                        rng.choice((0, 1000, 30_000)), now, day, "2030-03")


def _random_usage(rng: random.Random, event_id: str, day: str) -> AggregateDelta:
    return AggregateDelta(event_id, TAG, day, "al", "a", "m",
                          Totals(1, rng.choice((0, 5, 900, 5000)), 0, 0, 0, 0, rng.choice((0, 700, 50_000))))


@pytest.mark.parametrize("seed", range(6))
def test_fast_admission_decides_and_counts_as_the_general_path(seed: int) -> None:
    rng = random.Random(seed)
    fast, slow = MemoryStore(), _general_only()
    live: list[tuple[Decision, Decision]] = []
    for adm in _random_admissions(rng, 400, 3600):
        a, b = fast.admit_now(adm), slow.admit_now(adm)
        assert a == b
        if a.admitted:
            live.append((a, b))
        if live and rng.random() < 0.5:
            da, db = live.pop(rng.randrange(len(live)))
            assert da.reservation is not None and db.reservation is not None
            usage = _random_usage(rng, da.reservation.request_id, adm.day)
            assert fast.settle_and_record_now(da.reservation, usage, adm.now) == slow.settle_and_record_now(
                db.reservation, usage, adm.now)
        assert _state(fast) == _state(slow)


async def _dump(store: RedisStore, prefix: str) -> dict[str, object]:
    """Every key under `prefix` (prefix taken off) with its value, for comparing two stores."""
    conn = store._resp
    assert conn is not None
    out: dict[str, object] = {}
    for key in sorted(await conn.call(pack(("KEYS", prefix + "*")))):
        kind = await conn.call(pack(("TYPE", key)))
        if kind == b"hash":
            value: object = sorted(await conn.call(pack(("HGETALL", key))))
        elif kind == b"zset":
            value = await conn.call(pack(("ZRANGE", key, 0, -1, "WITHSCORES")))
        elif kind == b"set":
            value = sorted(await conn.call(pack(("SMEMBERS", key))))
        else:
            value = await conn.call(pack(("GET", key)))
        out[key.decode()[len(prefix):]] = value
    return out


@pytest.mark.parametrize("seed", range(8))
async def test_redis_direct_admission_decides_and_counts_as_the_general_path_and_the_memory_store(redis_server: RedisProc,
                                                                            seed: int) -> None:
    """`fast` takes what the proxy takes: admit_soon and settle_and_record_soon (the commands sent at
    once, the direct path); `slow` the coroutine calls and the general path; `memory` the embedded store."""
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:8]
    fast, slow = RedisStore(redis_server.url, prefix=f"f{run}:"), RedisStore(redis_server.url, prefix=f"s{run}:")
    slow._admit_direct = lambda layout, admission, seen: None  # type: ignore[method-assign]
    await fast.start()
    await slow.start()
    memory = MemoryStore()  # the reference: the same decisions from counters kept in Python
    live: list[tuple[Decision, Decision, Decision]] = []
    direct = sent_settles = 0
    try:
        for i, adm in enumerate(_random_admissions(rng, 150, 1800)):
            sent = fast.admit_soon(adm)
            assert sent is not None  # the lean connection is open
            a, b, c = await sent, await slow.admit(adm), memory.admit_now(adm)
            assert a == b
            assert a == c
            direct += a.admitted and not a.shadow_denied
            if a.admitted and all(adm.request_id != d[0].reservation.request_id for d in live if d[0].reservation):
                live.append((a, b, c))  # a replayed admission is the same reservation: settled once
            if live and rng.random() < 0.5:
                da, db, dc = live.pop(rng.randrange(len(live)))
                assert da.reservation is not None and db.reservation is not None and dc.reservation is not None
                usage = _random_usage(rng, f"e{i}", adm.day)
                settled = fast.settle_and_record_soon(da.reservation, usage, adm.now)
                sent_settles += settled is not None  # None only before the day index lists the subject
                fast_recorded = await (settled if settled is not None else
                                       fast.settle_and_record(da.reservation, usage, adm.now))
                assert fast_recorded == await slow.settle_and_record(db.reservation, usage, adm.now) == \
                    memory.settle_and_record_now(dc.reservation, usage, adm.now)
        assert await _dump(fast, f"f{run}:") == await _dump(slow, f"s{run}:")
        assert direct > 20  # the direct path was taken, not only the general one
        assert sent_settles > 10  # and the settles sent at once
    finally:
        await fast.close()
        await slow.close()


@contextlib.asynccontextmanager
async def _fresh_redis_store(url: str) -> AsyncIterator[tuple[RedisStore, str, Callable[[bytes], Awaitable[Any]]]]:
    """A started redis store under a prefix of its own: (store, prefix, raw call)."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store = RedisStore(url, prefix=prefix)
    await store.start()
    assert store._resp is not None
    try:
        yield store, prefix, store._resp.call
    finally:
        await store.close()


async def test_redis_window_without_a_running_total_is_summed_once_in_full(redis_server: RedisProc) -> None:
    async with _fresh_redis_store(redis_server.url) as (store, prefix, call):
        key, second = prefix + "{team-a}:user:al:tpm", math.floor(T0)
        tpm = (Limit("user:al", LimitName.TPM, 1000),)
        # As a version without running totals left it: buckets only, one already out of the window.
        await call(pack(("HSET", key, second - 70, 500, second - 30, 300, second - 5, 200)))
        first = await store.admit(Admission("r1", TAG, tpm, 100, 0, T0, "2030-03-17", "2030-03"))
        assert first.admitted and first.states[0].used == 600  # 300 + 200 + this 100
        assert first.states[0].reset_seconds == pytest.approx(second - 30 + 60 - T0)  # the oldest live bucket
        fields = await call(pack(("HGETALL", key)))
        assert dict(zip(fields[::2], fields[1::2], strict=True)) == {
            str(second - 30).encode(): b"300", str(second - 5).encode(): b"200", str(second).encode(): b"100",
            b"t": b"600", b"o": str(second - 30).encode()}
        # From the running total on: 31 s later the 300 has left, and 500 more does not fit.
        refused = await store.admit(Admission("r2", TAG, tpm, 800, 0, T0 + 31, "2030-03-17", "2030-03"))
        assert not refused.admitted and refused.states[0].used == 300  # 200 + 100
        assert refused.retry_after_seconds == pytest.approx(second - 5 + 60 - (T0 + 31))  # when the 200 leaves


def _script_ran_on(ran: list[Ran], key: str) -> list[list[str]]:
    """The commands a Lua script ran on `key`, in order."""
    return [r.args for r in ran if r.from_script and len(r.args) > 1 and r.args[1] == key]


async def test_redis_admission_reads_a_sparse_window_whole_instead_of_probing_it(redis_server: RedisProc) -> None:
    """A subject seen every 20 s has a bucket every 20 s: past the window's start its oldest live
    bucket is a gap away, which admit.lua finds by reading the few buckets there are, not by
    looking up every second ahead (181 lookups per window per admission before, 4x Redis's CPU per
    request at 100,000 users in bench/)."""
    async with _fresh_redis_store(redis_server.url) as (store, prefix, call):
        key, second = prefix + "{team-a}:user:al:tpm", math.floor(T0)
        tpm = (Limit("user:al", LimitName.TPM, 1000),)
        for n, at in enumerate((0, 20, 40)):
            assert (await store.admit(Admission(f"r{n}", TAG, tpm, 100 + n, 0, T0 + at, "2030-03-17", "2030-03"))).admitted
        late, ran = await monitored(redis_server.url, store.admit(
            Admission("r9", TAG, tpm, 100, 0, T0 + 61, "2030-03-17", "2030-03")))
        on_window = _script_ran_on(ran, key)
        probed = sum(len(args) - 2 for args in on_window if args[0].upper() in ("HMGET", "HEXISTS"))
        assert any(args[0].upper() == "HGETALL" for args in on_window)  # the buckets there are, read once
        assert probed <= 16, on_window  # t and o, the 2 s that left, a look ahead of 8 s
        assert late.admitted and late.states[0].used == 101 + 102 + 100  # the bucket of T0 has left
        assert late.states[0].reset_seconds == pytest.approx(second + 20 + 60 - (T0 + 61))


async def test_redis_window_with_nothing_live_is_made_again_in_one_write(redis_server: RedisProc) -> None:
    """A subject back after a quiet minute (the common case for most users): admit.lua drops the
    old key whole and writes the new bucket, total and oldest second at once, not field by field."""
    async with _fresh_redis_store(redis_server.url) as (store, prefix, call):
        key, second = prefix + "{team-a}:user:al:tpm", math.floor(T0)
        tpm = (Limit("user:al", LimitName.TPM, 1000),)
        for n, at in enumerate((0, 30)):
            assert (await store.admit(Admission(f"r{n}", TAG, tpm, 100, 0, T0 + at, "2030-03-17", "2030-03"))).admitted
        back, ran = await monitored(redis_server.url, store.admit(
            Admission("r9", TAG, tpm, 250, 0, T0 + 95, "2030-03-17", "2030-03")))
        assert back.admitted and back.states[0].used == 250
        assert [args[0].upper() for args in _script_ran_on(ran, key)] == ["HMGET", "HGETALL", "DEL", "HSET", "EXPIRE"]
        fields = await call(pack(("HGETALL", key)))
        assert dict(zip(fields[::2], fields[1::2], strict=True)) == {
            str(second + 95).encode(): b"250", b"t": b"250", b"o": str(second + 95).encode()}
        # and one never seen: no DEL, the same write
        other = prefix + "{team-a}:user:bo:tpm"
        first, ran = await monitored(redis_server.url, store.admit(
            Admission("r10", TAG, (Limit("user:bo", LimitName.TPM, 1000),), 40, 0, T0, "2030-03-17", "2030-03")))
        assert first.admitted
        assert [args[0].upper() for args in _script_ran_on(ran, other)] == ["HMGET", "HGETALL", "HSET", "EXPIRE"]


async def test_redis_window_write_sets_a_ttl_for_a_new_bucket_and_o_for_an_older_one(redis_server: RedisProc) -> None:
    """A bucket admit.lua makes gives the window's key its TTL again (a request into an existing
    bucket does not), and one older than 'o' (a proxy whose clock is behind) moves 'o'."""
    async with _fresh_redis_store(redis_server.url) as (store, prefix, call):
        key, second = prefix + "{team-a}:user:al:tpm", math.floor(T0)
        tpm = (Limit("user:al", LimitName.TPM, 1000),)

        async def admit(n: int, tokens: int, at: float) -> None:
            assert (await store.admit(Admission(f"r{n}", TAG, tpm, tokens, 0, at, "2030-03-17", "2030-03"))).admitted

        await admit(1, 100, T0 + 5)
        await call(pack(("PERSIST", key)))
        await admit(2, 50, T0 + 5.5)  # the same second's bucket: its TTL was set when it was made
        assert await call(pack(("TTL", key))) == -1
        await admit(3, 70, T0 + 2)  # 3 s behind: a new bucket, older than 'o'
        assert 0 < await call(pack(("TTL", key))) <= 70
        fields = await call(pack(("HGETALL", key)))
        assert dict(zip(fields[::2], fields[1::2], strict=True)) == {
            str(second + 5).encode(): b"150", str(second + 2).encode(): b"70", b"t": b"220",
            b"o": str(second + 2).encode()}


async def test_redis_aggregate_hash_expires_a_retention_after_its_days_first_event(redis_server: RedisProc) -> None:
    async with _fresh_redis_store(redis_server.url) as (store, prefix, call):
        key = prefix + aggregate_key(TAG, "2030-03-17", "al", "a")
        for n in range(3):
            assert await store.settle_and_record(None, _random_usage(random.Random(n), f"e{n}", "2030-03-17"), T0)
            ttl = await call(pack(("TTL", key)))
            assert AGG_TTL_SECONDS - 5 < ttl <= AGG_TTL_SECONDS  # never left without one
        assert (await store.aggregates(("2030-03-17",), user="al"))[0].totals.requests == 3


@pytest.mark.parametrize("requests", [1, 0])
async def test_redis_aggregate_hash_keeps_its_ttl_when_a_second_model_arrives(redis_server: RedisProc,
                                                                           requests: int) -> None:
    """record.lua tells a new hash from its requests field's count (no EXISTS call): a model new to
    an existing hash is a new field, not a new hash, so the retention still counts from the day's
    first event. An event counting no request (not one the gate sends) is told by EXISTS instead."""
    async with _fresh_redis_store(redis_server.url) as (store, prefix, call):
        key = prefix + aggregate_key(TAG, "2030-03-17", "al", "a")

        def usage(n: int, model: str) -> AggregateDelta:
            return AggregateDelta(f"e{n}", TAG, "2030-03-17", "al", "a", model, Totals(requests, 5, 7, 0, 0, 0, 90))

        assert await store.settle_and_record(None, usage(0, "m1"), T0)
        assert AGG_TTL_SECONDS - 5 < await call(pack(("TTL", key))) <= AGG_TTL_SECONDS
        await call(pack(("EXPIRE", key, 1000)))  # as if the day's first event were long ago
        for n, model in enumerate(("m2", "m1", "m3"), start=1):
            assert await store.settle_and_record(None, usage(n, model), T0)
            assert 990 < await call(pack(("TTL", key))) <= 1000
        rows = {r.model: r.totals for r in await store.aggregates(("2030-03-17",), user="al")}
        assert {m: (t.requests, t.input_tokens) for m, t in rows.items()} == {
            "m1": (2 * requests, 10), "m2": (requests, 5), "m3": (requests, 5)}


def test_fast_admission_refuses_negative_amounts_like_the_general_path() -> None:
    adm = Admission("r", TAG, (Limit("user:al", LimitName.RPM, 5),), -1, 0, T0, "2030-03-17", "2030-03")
    with pytest.raises(ValueError):
        MemoryStore().admit_now(adm)


def test_history_percentile_is_the_nearest_rank_of_the_last_outputs() -> None:
    rng = random.Random(7)
    history = _History()
    ref: deque[int] = deque(maxlen=_HISTORY_SIZE)
    for i in range(300):
        value = rng.choice((0, 3, 3, 17, 250, rng.randrange(1000)))
        history.add("al", "m", value)
        ref.append(value)
        got = history.percentile("al", "m")
        if i + 1 < _HISTORY_MIN_SAMPLES:
            assert got is None
        else:
            ordered = sorted(ref)
            assert got == ordered[min(len(ordered) - 1, math.ceil(_PERCENTILE * len(ordered)) - 1)]
    assert history.percentile("bo", "m") is None


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_full_history_keeps_its_pairs_and_takes_new_ones_as_idle_ones_leave() -> None:
    """Past its bound the history does not evict a pair in use for a newcomer (with more active
    pairs than the bound that would churn on every request, and no pair would ever reach a
    percentile); a sweep drops pairs idle for ten minutes, a slice per add, and makes room."""
    clock = _Clock()
    history = _History(clock)
    slices = _HISTORY_SUBJECTS // _SWEEP_SLICE + 1  # adds that take a sweep through every pair
    for _ in range(_HISTORY_MIN_SAMPLES):
        history.add("first", "m", 900)
    for i in range(_HISTORY_SUBJECTS - 1):
        history.add(f"u{i}", "m", 10_000)  # left in a reused run, this would be the new pair's p95
    history.add("new", "m", 40)  # full, nothing idle: not remembered, nobody evicted
    assert ("new", "m") not in history._runs and len(history._runs) == _HISTORY_SUBJECTS
    for _ in range(slices):
        history.add("first", "m", 900)  # the sweep this began looks at every pair, drops none
    assert len(history._runs) == _HISTORY_SUBJECTS and not history._sweeping
    clock.now += 30
    history.add("first", "m", 900)  # used again (no sweep is due yet): not idle when the next one comes
    clock.now += _HISTORY_IDLE_SECONDS - 29
    history.add("new", "m", 40)  # the next sweep's first slice makes room at once
    assert ("new", "m") in history._runs
    assert len(history._runs) == _HISTORY_SUBJECTS - _SWEEP_SLICE + 1  # one slice looked at, not all
    for _ in range(slices):
        history.add("new", "m", 40)
    assert history.percentile("new", "m") == 40  # a fresh run: nothing of an idle pair's outputs
    assert history.percentile("first", "m") == 900
    assert set(history._runs) == {("first", "m"), ("new", "m")}


def test_an_idle_pair_used_again_is_not_swept_by_the_add_that_uses_it() -> None:
    """A pair back after ten idle minutes, whose add starts a sweep that looks at it first, keeps
    its run and the new output: the add marks it used before the sweep looks."""
    clock = _Clock()
    history = _History(clock)
    for i in range(_HISTORY_SUBJECTS - 1):
        history.add(f"u{i}", "m", 10)
    for _ in range(_HISTORY_SUBJECTS // _SWEEP_SLICE + 1 + _HISTORY_MIN_SAMPLES):
        history.add("back", "m", 900)  # full from its first add: a sweep runs through, drops none
    assert not history._sweeping
    clock.now += _HISTORY_IDLE_SECONDS + 100
    history.add("back", "m", 40)  # starts the next sweep, whose first slice holds this pair
    assert len(history._runs) == _HISTORY_SUBJECTS - _SWEEP_SLICE + 1  # the idle rest of the slice went
    assert history.percentile("back", "m") == 900 and history._runs[("back", "m")].recent[-1] == 40


def test_sweep_drops_expired_counters_a_slice_per_admission() -> None:
    store = MemoryStore(sweep_interval_seconds=60.0)
    rpm = (Limit("user:x", LimitName.RPM, 1000),)
    n = 3 * _SWEEP_SLICE + 10
    for i in range(n):  # one counter per subject, all expired by the second sweep below
        assert store.admit_now(Admission(f"r{i}", f"u{i}", rpm, 1, 0, T0, "2030-03-17", "2030-03")).admitted
    later = T0 + 3600  # past every window's and record's expiry
    store.admit_now(Admission("first", "other", rpm, 1, 0, later, "2030-03-17", "2030-03"))
    assert len(store._cells) == n - _SWEEP_SLICE + 1  # the sweep began: one slice looked at, not all
    for i in range(4):
        store.admit_now(Admission(f"more{i}", "other", rpm, 1, 0, later, "2030-03-17", "2030-03"))
    assert len(store._cells) == 1 and "other" in next(iter(store._cells))  # the rest: swept
    assert not store._sweeping



def test_sweep_never_drops_the_new_cell_of_a_counter_it_saw_expire() -> None:
    """The sweep walks the cells there were when it began. A counter whose cell expired and was
    replaced meanwhile (its subject came back) keeps the new cell: the sweep skips the old one."""
    store = MemoryStore(sweep_interval_seconds=60.0)
    rpm = (Limit("user:x", LimitName.RPM, 1000),)
    n = 2 * _SWEEP_SLICE + 10  # slices go from the end: u0's old cell is among the last ten looked at
    for i in range(n):
        assert store.admit_now(Admission(f"r{i}", f"u{i}", rpm, 1, 0, T0, "2030-03-17", "2030-03")).admitted
    later = T0 + 3600
    store.admit_now(Admission("first", "other", rpm, 1, 0, later, "2030-03-17", "2030-03"))  # the sweep begins
    back = store.admit_now(Admission("back", "u0", rpm, 1, 0, later, "2030-03-17", "2030-03"))  # the 2nd slice, not u0
    assert [s.used for s in back.states] == [1]  # its expired window was dropped: a new one
    store.admit_now(Admission("next", "other", rpm, 1, 0, later, "2030-03-17", "2030-03"))  # sweeps u0's old cell
    assert not store._sweeping
    fresh = (Limit("user:x", LimitName.RPM, 1000),)  # another tuple: a new layout finds the counter by its key
    again = store.admit_now(Admission("again", "u0", fresh, 1, 0, later, "2030-03-17", "2030-03"))
    assert [s.used for s in again.states] == [2]


async def test_a_layout_never_counts_into_a_cell_the_store_dropped() -> None:
    """Two limit sets share a counter; the second drops it (expired) and starts a new one. When the
    clock then steps back (an NTP correction), the first must not count into the dropped cell,
    which its layout still holds and which has not expired by that clock: the count would be lost."""
    store = MemoryStore()
    rpm = Limit("user:x", LimitName.RPM, 100)
    one, two = (rpm,), (rpm, Limit("user:x", LimitName.RPM, 50, False))  # one counter, two layouts

    def admit(limits: tuple[Limit, ...], rid: str, now: float) -> None:
        assert store.admit_now(Admission(rid, TAG, limits, 1, 0, now, "2030-03-17", "2030-03")).admitted

    admit(one, "a", T0)
    admit(two, "b", T0 + 100)  # the first window expired: dropped, a new one made
    admit(one, "c", T0 + 50)  # the clock stepped back, before the dropped window's expiry
    states = await store.usage(one, TAG, T0 + 101, "2030-03-17", "2030-03")
    assert states[0].used == 2

def test_inflight_gauge_is_folded_at_collection() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.inflight_add("openai", 1)
    metrics.inflight_add("openai", 1)
    metrics.inflight_add("anthropic", 1)
    metrics.inflight_add("anthropic", -1)
    assert registry.get_sample_value("meterproxy_inflight_requests", {"provider": "openai"}) == 2
    assert registry.get_sample_value("meterproxy_inflight_requests", {"provider": "anthropic"}) == 0
    metrics.inflight_add("openai", -1)
    assert registry.get_sample_value("meterproxy_inflight_requests", {"provider": "openai"}) == 1


async def test_tracker_callbacks_count_until_run_and_may_hand_over_to_a_task(
        caplog: pytest.LogCaptureFixture) -> None:
    tracker = Tracker()
    done: list[str] = []
    gate = asyncio.Event()

    async def later() -> None:
        await gate.wait()
        done.append("task")

    def now(tag: str, wait: bool) -> None:
        done.append(tag)
        if wait:
            tracker.spawn(later())

    def fails() -> None:
        raise RuntimeError("boom")

    tracker.soon(now, "a", False)
    tracker.soon(now, "b", True)
    tracker.soon(fails)
    assert len(tracker) == 3 and done == []
    asyncio.get_running_loop().call_later(0.05, gate.set)
    with caplog.at_level(logging.ERROR, logger="meterproxy"):
        await tracker.drain()
    assert done == ["a", "b", "task"]
    assert len(tracker) == 0
    assert "settle/record failed" in caplog.text


async def test_tracker_waits_for_tracked_futures_then_records(caplog: pytest.LogCaptureFixture) -> None:
    """A settle sent at once is a future the tracker waits for (shutdown too), then records; one
    a later task resolves (settle_soon's fallback) is waited for; a failed one is logged only."""
    tracker = Tracker()
    loop = asyncio.get_running_loop()
    done: list[str] = []
    ok, handed_over, failed = loop.create_future(), loop.create_future(), loop.create_future()

    async def retry() -> None:
        await asyncio.sleep(0.05)
        handed_over.set_result(None)

    tracker.track(ok, lambda: done.append("ok"))
    tracker.track(handed_over, lambda: done.append("handed over"))
    tracker.track(failed, lambda: done.append("failed"))
    assert len(tracker) == 3
    loop.call_soon(ok.set_result, None)
    loop.call_soon(lambda: tracker.spawn(retry()))  # what settle_soon's fallback does
    loop.call_later(0.01, failed.set_exception, RuntimeError("boom"))
    with caplog.at_level(logging.ERROR, logger="meterproxy"):
        await tracker.drain()
    assert done == ["ok", "handed over"] and len(tracker) == 0
    assert "settle/record failed" in caplog.text


def test_key_ring_hands_out_one_subject_per_key_and_end_user(tmp_path: Path) -> None:
    """The gate keeps a subject's profile on the Subject (its memo), so the key ring hands out the
    same Subject for a key, and for each end user a trusted key names, on every request; a plain
    key's subject ignores x-meterproxy-user, and a key not in the config gets none here."""
    ring = KeyRing(parse_config(yaml.safe_dump(base_config("http://127.0.0.1:9", tmp_path))))
    alice = ring.configured_subject(ALICE_KEY, "mallory")
    assert alice is not None and alice.user == "alice" and alice.team == "research"
    assert ring.configured_subject(ALICE_KEY, None) is alice
    carol = ring.configured_subject(BACKEND_KEY, "carol")
    assert carol is not None and (carol.user, carol.trusted) == ("carol", True)
    assert ring.configured_subject(BACKEND_KEY, "carol") is carol
    assert ring.configured_subject(BACKEND_KEY, "dave") is not carol
    backend = ring.configured_subject(BACKEND_KEY, None)
    assert backend is not None and backend.user == "backend" and ring.configured_subject(BACKEND_KEY, "") is backend
    assert ring.configured_subject("mp-not-a-config-key", "carol") is None
    assert ring.configured_subject(None, None) is None


def test_per_subject_caches_hold_200_000_subjects() -> None:
    """Every per-subject cache the request path keeps holds at least 200,000 subjects. One bound
    below the active subjects sends every request past it (the redis store remembered 100,000
    listed aggregate hashes: at 100,000 users each settle went the slow way, with a round trip
    more). History is bounded lower on purpose: a miss there costs only a full-size reservation."""
    from proxy import auth
    from proxy.quota import counters, limits, redis_store

    bounds = {
        "auth subjects": auth._MAX_CACHED_SUBJECTS,
        "limit book": limits._CACHE_MAX,
        "layouts": counters.SHAPE_CACHE_MAX,
        "listed aggregate hashes": redis_store._INDEXED_MAX,
        **{f"{f.__name__} cache": f.cache_info().maxsize or 0
           for f in (counters.hash_tag, counters.aggregate_key, counters.index_member)},
    }
    assert {name: n for name, n in bounds.items() if n < 200_000} == {}


def test_the_server_leaves_frozenlists_cpp_extension_and_libstdcxx_unloaded() -> None:
    """frozenlist's C extension is C++: loading it maps libstdc++, 1.1 MiB of the server's resident
    set, for lists aiohttp reads at most once a request. `proxy` picks the pure-Python one."""
    env = {k: v for k, v in os.environ.items() if k != "FROZENLIST_NO_EXTENSIONS"}
    code = ("import proxy.cli, proxy.app, aiohttp.web, frozenlist\n"
            "maps = open('/proc/self/maps').read()\n"
            "print(frozenlist.FrozenList.__module__, 'libstdc++' in maps)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["frozenlist", "False"]


def test_end_users_of_one_key_share_all_but_their_own_counters(tmp_path: Path) -> None:
    """With many subjects each object of its own a request reaches is a cache miss, so what
    subjects have in common is one object for all: two end users of one trusted key get the same
    tag and record prefix strings and the same counter and check shapes, while each keeps its own
    layout (on the Subject itself, no holder between), counters and cells. A top-up still
    reserves on the subject's output limits."""
    from zoneinfo import ZoneInfo

    from proxy.app import load_prices
    from proxy.estimate import Estimate
    from proxy.providers import build_adapter
    from proxy.quota.gate import Gate
    from proxy.records import CountSource

    raw = base_config("http://127.0.0.1:9", tmp_path)
    raw["plans"]["free"] = {"rpm": 1000, "tpm": 1_000_000}
    config = parse_config(yaml.safe_dump(raw))
    store = MemoryStore()
    gate = Gate(config, store, load_prices(config, str(tmp_path / "config.yaml")), Metrics(CollectorRegistry()),
                ZoneInfo("UTC"))
    ring = KeyRing(config)
    adapter = build_adapter("openai", config.providers["openai"])
    est = Estimate("gpt-4o-mini", 10, CountSource.TOKENIZER, 20, 20, 1, 5, True)
    users = [ring.configured_subject(BACKEND_KEY, "carol"), ring.configured_subject(BACKEND_KEY, "dave")]
    tickets = [gate.admit_now(s, adapter, est, f"r-{i}") for i, s in enumerate(users) if s is not None]
    assert len(tickets) == 2 and all(t is not None for t in tickets)
    carol, dave = (s.layout for s in users if s is not None)
    assert carol is not dave and carol.limits is not dave.limits
    assert carol.tag == "k:" + users[0].key_id and carol.tag is dave.tag  # type: ignore[union-attr]
    assert carol.record_prefix is dave.record_prefix
    assert carol.shape is dave.shape and len(carol.shape) == 2
    assert carol.check_shape is dave.check_shape
    assert [key for _, _, key, _ in carol.counters] != [key for _, _, key, _ in dave.counters]
    assert all(c is not None for c in carol.cells) and not set(map(id, carol.cells)) & set(map(id, dave.cells))
    assert [lim.name for lim in tickets[0].limits] == [LimitName.TPM]  # type: ignore[union-attr]
