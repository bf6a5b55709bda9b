"""Usage aggregates in the store (exactly once per event, on every store) and the pure report
logic over them: query parsing, grouping, exact money, and the month-end forecast."""
from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from redisproc import RedisProc

from proxy.quota.redis_store import RedisStore
from proxy.quota.store import (
    Admission,
    AggregateDelta,
    AggregateRow,
    Limit,
    LimitName,
    QuotaStore,
    Totals,
)
from proxy.usage import (
    Query,
    daily_spend,
    forecast,
    forecast_days,
    group,
    parse_query,
    render,
    report,
    usd,
)

T0 = 1_900_000_000.25  # 2030-03-17T17:46:40Z
DAY, MONTH = "2030-03-17", "2030-03"
M = 1_000_000  # micro-dollars per dollar


# ---------------------------------------------------------------- the forecast, by hand


def test_forecast_known_history_month_end_and_run_out() -> None:
    # March 2030: $2/day on the 1st-12th, $3/day on the 13th-19th (the trailing 7 days), $1 so far today.
    daily = {f"2030-03-{d:02d}": 2 * M for d in range(1, 13)}
    daily |= {f"2030-03-{d:02d}": 3 * M for d in range(13, 20)}
    daily["2030-03-20"] = 1 * M
    daily["2030-02-28"] = 50 * M  # last month: not month-to-date, and outside the trailing window
    now = datetime(2030, 3, 20, 12, 0, tzinfo=UTC)  # 11.5 days left until April 1st
    f = forecast(daily, now, budget_micro_usd=70 * M)
    assert f.month == "2030-03"
    assert f.month_to_date_micro_usd == (12 * 2 + 7 * 3 + 1) * M == 46 * M
    assert f.burn_micro_usd_per_day == 3 * M
    assert f.month_end_micro_usd == 46 * M + 3 * M * 23 // 2 == 80_500_000  # 46 + 3 x 11.5
    # (70 - 46) / 3 = 8 days after Mar 20 noon
    assert f.runs_out_on == date(2030, 3, 28)
    assert forecast(daily, now, 100 * M).runs_out_on is None  # $80.50 at month end: never this month
    assert forecast(daily, now, 40 * M).runs_out_on == date(2030, 3, 20)  # already spent
    assert forecast(daily, now, None).runs_out_on is None
    j = f.as_json()
    assert j["month_end_usd"] == "80.5" and j["runs_out_on"] == "2030-03-28" and j["budget_usd"] == "70"


def test_forecast_rate_ignores_today_and_reaches_into_last_month() -> None:
    tz = ZoneInfo("America/New_York")
    now = datetime(2030, 3, 3, 6, 0, tzinfo=tz)  # 28.75 days left in March, local time
    # Trailing window: Feb 24 - Mar 2 (7 days): $7 in total, so $1/day.
    daily = {"2030-02-24": 1 * M, "2030-02-26": 3 * M, "2030-03-01": 2 * M, "2030-03-02": 1 * M,
             "2030-02-23": 99 * M, "2030-03-03": 5 * M}
    f = forecast(daily, now, budget_micro_usd=20 * M)
    assert f.month_to_date_micro_usd == 8 * M  # Mar 1, 2 and today
    assert f.burn_micro_usd_per_day == 1 * M  # today's $5 is not a full day: not in the rate
    assert f.month_end_micro_usd == 8 * M + 28_750_000
    assert f.runs_out_on == date(2030, 3, 15)  # 12 days after Mar 3, 06:00
    assert forecast_days(now.date())[0] == "2030-02-24" and forecast_days(now.date())[-1] == "2030-03-03"


def test_forecast_rounds_to_the_micro_dollar() -> None:
    now = datetime(2030, 1, 31, 0, 0, tzinfo=UTC)  # exactly one day left
    f = forecast({"2030-01-30": 10}, now, None)  # 10 micro-$ over 7 days: 1.428... per day
    assert f.burn_micro_usd_per_day == 1 and f.month_end_micro_usd == 10 + 1  # 10 + 10/7 -> 11


# ---------------------------------------------------------------- query, grouping, money


def test_usd_is_exact() -> None:
    assert usd(0) == "0" and usd(1) == "0.000001" and usd(1_500_000) == "1.5" and usd(100 * M) == "100"
    assert usd(123_456_789_012) == "123456.789012"


def test_parse_query_defaults_and_errors() -> None:
    today = date(2030, 3, 17)
    q = parse_query({}, today)
    assert (q.since, q.until, q.group_by) == (date(2030, 3, 1), today, ("user",))
    q = parse_query({"since": "2030-03-10", "until": "2030-03-12", "group_by": "model,day,model",
                     "user": "al"}, today)
    assert q.days == ("2030-03-10", "2030-03-11", "2030-03-12") and q.group_by == ("model", "day")
    for bad in ({"since": "March"}, {"group_by": "provider"}, {"since": "2030-03-12", "until": "2030-03-10"},
                {"since": "2028-01-01"}):
        with pytest.raises(ValueError):
            parse_query(bad, today)


def test_group_sums_exactly_and_filters() -> None:
    rows = [
        AggregateRow("2030-03-16", "al", "t1", "gpt-4o", Totals(2, 10, 5, 1, 0, 2, 333_333)),
        AggregateRow("2030-03-17", "al", "t1", "gpt-4o", Totals(1, 1, 1, 0, 0, 0, 333_334)),
        AggregateRow("2030-03-17", "al", "t1", "claude", Totals(1, 7, 3, 0, 4, 0, 1)),
        AggregateRow("2030-03-17", "bo", None, "gpt-4o", Totals(5, 0, 0, 0, 0, 0, 0)),
    ]
    q = Query(date(2030, 3, 1), date(2030, 3, 31), group_by=("user",))
    out = report(rows, q)
    assert [r["user"] for r in out] == ["al", "bo"]
    assert out[0]["requests"] == 4 and out[0]["cost_micro_usd"] == 666_668 and out[0]["cost_usd"] == "0.666668"
    assert out[0]["cache_write_tokens"] == 4 and out[0]["reasoning_tokens"] == 2
    q = Query(date(2030, 3, 17), date(2030, 3, 17), model="gpt-4o", group_by=("team", "day"))
    assert [(k, t.requests) for k, t in group(rows, q)] == [
        ({"team": None, "day": "2030-03-17"}, 5), ({"team": "t1", "day": "2030-03-17"}, 1)]
    assert daily_spend(rows) == {"2030-03-16": 333_333, "2030-03-17": 333_335}


# ---------------------------------------------------------------- aggregates in every store





def delta(event_id: str, user: str = "al", team: str | None = "t1", model: str = "gpt-4o", day: str = DAY,
          tokens: int = 100, cost: int = 5000, tag: str | None = None) -> AggregateDelta:
    return AggregateDelta(event_id, tag or (f"t:{team}" if team else f"u:{user}"), day, user, team, model,
                          Totals(1, tokens - 10, 10, 0, 0, 0, cost))


async def test_settle_and_record_once_per_event(store: QuotaStore) -> None:
    """Replaying the same event twice changes nothing: neither the aggregates nor the counters."""
    tpd = Limit("user:al", LimitName.TOKENS_PER_DAY, 10_000)
    money = Limit("team:t1", LimitName.USD_PER_MONTH, 10 * M)
    adm = Admission("ev-1", "t:t1", (tpd, money), 500, 20_000, T0, DAY, MONTH)
    decision = await store.admit(adm)
    assert decision.admitted and decision.reservation is not None
    d = delta("ev-1", tokens=120, cost=7000)
    assert await store.settle_and_record(decision.reservation, d, T0 + 1) is True
    for _ in range(2):  # a replay after a lost reply, and another one
        assert await store.settle_and_record(decision.reservation, d, T0 + 2) is False
    rows = await store.aggregates((DAY,))
    assert rows == (AggregateRow(DAY, "al", "t1", "gpt-4o", d.totals),)
    used = [s.used for s in await store.usage((tpd, money), "t:t1", T0 + 3, DAY, MONTH)]
    assert used == [120, 7000]  # settled once, to the actual


async def test_refused_requests_are_counted_without_a_reservation(store: QuotaStore) -> None:
    assert await store.settle_and_record(None, delta("r1", tokens=10, cost=0), T0)
    assert await store.settle_and_record(None, delta("r2", tokens=10, cost=0), T0)
    assert not await store.settle_and_record(None, delta("r2", tokens=10, cost=0), T0)
    (row,) = await store.aggregates((DAY,))
    assert row.totals.requests == 2


async def test_aggregates_by_subject_model_and_day(store: QuotaStore) -> None:
    events = [delta("a", "al", "t1", "gpt-4o", DAY, 100, 11), delta("b", "al", "t1", "claude", DAY, 50, 22),
              delta("c", "bo", None, "gpt-4o", DAY, 10, 33), delta("d", "al", "t1", "gpt-4o", "2030-03-16", 1, 44),
              delta("e", "tr", None, "gpt-4o", DAY, 7, 55, tag="k:backend"),
              delta("f", "tr", None, "gpt-4o", DAY, 7, 66)]  # same user, another hash tag
    for e in events:
        assert await store.settle_and_record(None, e, T0)
    both = ("2030-03-16", DAY)
    rows = await store.aggregates(both)
    assert sum(r.totals.cost_micro_usd for r in rows) == 231
    assert {(r.day, r.user, r.model) for r in await store.aggregates(both, user="al")} == {
        (DAY, "al", "gpt-4o"), (DAY, "al", "claude"), ("2030-03-16", "al", "gpt-4o")}
    assert {r.user for r in await store.aggregates((DAY,), team="t1")} == {"al"}
    q = Query(date(2030, 3, 16), date(2030, 3, 17), group_by=("user",))
    by_user = {k["user"]: t for k, t in group(rows, q)}
    assert by_user["tr"].requests == 2 and by_user["tr"].cost_micro_usd == 121
    assert await store.aggregates(("2030-03-15",)) == ()


async def test_aggregates_of_one_day_are_one_hash_per_subject(redis_server: RedisProc) -> None:
    """The index is written once per subject and day by a process, not on every event."""
    from redis.asyncio import Redis

    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_server.url, prefix=prefix)
    await store.start()
    try:
        for i in range(20):
            await store.settle_and_record(None, delta(f"x{i}", model=f"m{i % 3}"), T0)
        client = Redis.from_url(redis_server.url)
        keys = sorted(k.decode() for k in await client.keys(prefix + "*") if b":seen:" not in k)
        await client.aclose()
        assert keys == sorted([prefix + f"agg-index:{DAY}", prefix + '{t:t1}:agg:2030-03-17:["al","t1"]'])
    finally:
        await store.close()


def test_forecast_days_cover_month_and_window() -> None:
    today = date(2030, 3, 17)
    days = forecast_days(today)
    assert days[0] == "2030-03-01" and days[-1] == "2030-03-17" and len(days) == 17
    assert (today - timedelta(days=7)).isoformat() in days


def test_render_table_csv_json() -> None:
    rows: list[dict[str, object]] = [{"user": "al", "requests": 12, "cost_usd": "0.5"},
                                     {"user": "bobby", "requests": 3, "cost_usd": "10"}]
    cols = ["user", "requests", "cost_usd"]
    assert render(rows, cols, "table").splitlines() == [
        "user   requests  cost_usd", "al           12       0.5", "bobby         3        10"]
    assert render(rows, cols, "csv").splitlines() == ["user,requests,cost_usd", "al,12,0.5", "bobby,3,10"]
    assert render(rows, cols, "json") and render([], cols, "table") == "user  requests  cost_usd"


async def test_index_written_again_when_redis_lost_the_hash(redis_server: RedisProc) -> None:
    """A process lists a hash once per day; if Redis later loses it (restart without persistence,
    failover), the next event recreates the hash and lists it again, so it stays visible."""
    from redis.asyncio import Redis

    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store = RedisStore(redis_server.url, prefix=prefix)
    await store.start()
    client = Redis.from_url(redis_server.url)
    try:
        assert await store.settle_and_record(None, delta("before"), T0)
        await client.delete(*await client.keys(prefix + "*"))  # everything of ours is gone
        assert await store.settle_and_record(None, delta("after", cost=77), T0)
        rows = await store.aggregates((DAY,))
        assert [r.totals.cost_micro_usd for r in rows] == [77]
    finally:
        await client.aclose()
        await store.close()
