"""Counter arithmetic the quota stores share: which counters an admission touches, how a decision
and its limit states are derived from what the counters held, and the usage-aggregate keys.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from enum import StrEnum
from functools import lru_cache

from proxy.quota.store import (
    DEFAULT_LEASE_SECONDS,
    MEASURES,
    MONEY_LIMITS,
    Admission,
    AggregateDelta,
    AggregateRow,
    Decision,
    Limit,
    LimitName,
    LimitState,
    Reservation,
    Totals,
)

WINDOW_SECONDS = 60
# A window's one-second buckets outlive the window by a little so a late reader still sees them.
# admit.lua sets a window key's TTL when it makes a second's bucket, so this margin is also how
# far proxies' clocks may disagree before one's writes into another's bucket expire early.
WINDOW_TTL_SECONDS = WINDOW_SECONDS + 10
# Periods are named in the caller's zone, so a day key must outlive the UTC day by up to a day.
DAY_TTL_SECONDS = 3 * 86400
MONTH_TTL_SECONDS = 62 * 86400
# The unsettled-reservation record must outlive every counter settle may still adjust.
RECORD_TTL_SECONDS = 2 * 86400
# A full concurrency limit frees when some request settles, which cannot be predicted.
LEASE_RETRY_SECONDS = 1.0


class CounterKind(StrEnum):
    WINDOW = "w"  # one-second buckets summed over the last 60 s
    PERIOD = "p"  # one integer per calendar period
    LEASES = "l"  # request_id -> lease expiry


class Measure(StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"
    MONEY = "money"
    SLOTS = "slots"


@dataclass(slots=True)  # store-internal and built per call: a plain dataclass is 4x cheaper to make
class Counter:
    """One distinct counter an admission touches (limits naming the same one share it)."""

    kind: CounterKind
    measure: Measure
    key: str  # unprefixed; starts with the admission's hash tag, e.g. "{team-a}:user:al:tpm"
    amount: int  # what one admission adds
    ttl_seconds: int


@dataclass(slots=True)  # store-internal and built per call: a plain dataclass is 4x cheaper to make
class Plan:
    counters: tuple[Counter, ...]
    slots: tuple[int, ...]  # for each limit, the index of its counter


@dataclass(slots=True)  # store-internal and built per call: a plain dataclass is 4x cheaper to make
class CounterView:
    """A counter as it stood before the admission."""

    used: int
    oldest: int | None = None  # WINDOW: the oldest bucket still in the window


@lru_cache(maxsize=262_144)  # one per subject: sized for a few hundred thousand
def hash_tag(tag: str) -> str:
    """`{tag}` with braces escaped, since Redis hashes only up to the first `}`."""
    escaped = tag.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return "{" + escaped + "}"


def counter_for(limit: Limit, tag: str, tokens: int, cost_micro_usd: int, day: str, month: str,
                lease_seconds: float) -> Counter:
    base = f"{hash_tag(tag)}:{limit.scope}:{limit.name.value}"  # built once per subject and day: shapes are cached
    name = limit.name
    if name is LimitName.RPM:
        return Counter(CounterKind.WINDOW, Measure.REQUESTS, base, 1, WINDOW_TTL_SECONDS)
    if name is LimitName.TPM:
        return Counter(CounterKind.WINDOW, Measure.TOKENS, base, tokens, WINDOW_TTL_SECONDS)
    if name is LimitName.MAX_CONCURRENT:
        return Counter(CounterKind.LEASES, Measure.SLOTS, base, 1, math.ceil(lease_seconds) + 1)
    if name is LimitName.USD_PER_MONTH:
        return Counter(CounterKind.PERIOD, Measure.MONEY, f"{base}:{month}", cost_micro_usd,
                       MONTH_TTL_SECONDS)
    measure = Measure.MONEY if name in MONEY_LIMITS else Measure.TOKENS
    amount = cost_micro_usd if name in MONEY_LIMITS else tokens
    return Counter(CounterKind.PERIOD, measure, f"{base}:{day}", amount, DAY_TTL_SECONDS)


_Shape = tuple[tuple[tuple[CounterKind, Measure, str, int], ...], tuple[int, ...]]
# (id of the limits tuple, tag, day, month, lease) -> (that tuple, shape). Keyed by identity: the
# limit book hands out one tuple per subject, and hashing its Limits costs more than the shape.
# The entry holds the tuple, so its id cannot be reused while the entry lives.
_SHAPES: dict[tuple[int, str, str, str, float], tuple[tuple[Limit, ...], _Shape]] = {}
SHAPE_CACHE_MAX = 262_144


def counter_shape(limits: tuple[Limit, ...], tag: str, day: str, month: str, lease_seconds: float) -> _Shape:
    """`build_shape`, cached for the general path (the stores' direct paths cache layouts instead)."""
    key = (id(limits), tag, day, month, lease_seconds)
    hit = _SHAPES.get(key)
    if hit is not None and hit[0] is limits:
        return hit[1]
    shape = build_shape(limits, tag, day, month, lease_seconds)
    if len(_SHAPES) >= SHAPE_CACHE_MAX:
        _SHAPES.clear()
    _SHAPES[key] = (limits, shape)
    return shape


def build_shape(limits: tuple[Limit, ...], tag: str, day: str, month: str, lease_seconds: float) -> _Shape:
    """The distinct counters (without amounts) the limits touch, and each limit's counter: the
    same for every admission of a subject in a day, so worked out once."""
    counters: list[Counter] = []
    index: dict[str, int] = {}
    slots: list[int] = []
    for limit in limits:
        counter = counter_for(limit, tag, 0, 0, day, month, lease_seconds)
        if counter.key not in index:
            index[counter.key] = len(counters)
            counters.append(counter)
        slots.append(index[counter.key])
    return tuple((c.kind, c.measure, c.key, c.ttl_seconds) for c in counters), tuple(slots)


def amount_of(measure: Measure, tokens: int, cost_micro_usd: int) -> int:
    """What one admission adds to a counter of `measure`."""
    return tokens if measure is Measure.TOKENS else cost_micro_usd if measure is Measure.MONEY else 1


def plan(limits: tuple[Limit, ...], tag: str, tokens: int, cost_micro_usd: int, day: str,
         month: str, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> Plan:
    shape, slots = counter_shape(limits, tag, day, month, lease_seconds)
    counters = []
    for kind, measure, key, ttl in shape:
        counters.append(Counter(kind, measure, key, amount_of(measure, tokens, cost_micro_usd), ttl))
    return Plan(tuple(counters), slots)


def admission_plan(admission: Admission) -> Plan:
    if admission.tokens < 0 or admission.cost_micro_usd < 0:
        raise ValueError("an admission cannot reserve negative tokens or cost")
    return plan(admission.limits, admission.tag, admission.tokens, admission.cost_micro_usd,
                admission.day, admission.month, admission.lease_seconds)


def reservation_plan(reservation: Reservation) -> Plan:
    return plan(reservation.limits, reservation.tag, reservation.tokens,
                reservation.cost_micro_usd, reservation.day, reservation.month)


def record_key(tag: str, request_id: str) -> str:
    return f"{hash_tag(tag)}:reservation:{request_id}"


def settle_delta(measure: Measure, reservation: Reservation, tokens: int,
                 cost_micro_usd: int) -> int:
    """What settling adds to a counter of `measure`; requests are not refunded (the request happened)."""
    if measure is Measure.TOKENS:
        return max(0, tokens) - reservation.tokens
    if measure is Measure.MONEY:
        return max(0, cost_micro_usd) - reservation.cost_micro_usd
    return 0


def window_floor(now: float) -> int:
    """The oldest bucket second still inside the window at `now`."""
    return math.floor(now) - WINDOW_SECONDS + 1


def window_view(buckets: Mapping[int, int], now: float) -> CounterView:
    """Sum the buckets in the window. Buckets ahead of `now` count: another replica's clock ran
    a little ahead, and its usage is real."""
    low = window_floor(now)
    live = [(second, n) for second, n in buckets.items() if second >= low and n > 0]
    return CounterView(sum(n for _, n in live), min((s for s, _ in live), default=None))


def window_free_at(buckets: Mapping[int, int], now: float, need: int) -> int | None:
    """The bucket whose expiry frees at least `need` units, or None if the window cannot."""
    freed = 0
    for second in sorted(s for s in buckets if s >= window_floor(now)):
        freed += buckets[second]
        if freed >= need:
            return second
    return None


def fails(plan_: Plan, limits: tuple[Limit, ...], views: tuple[CounterView, ...]) -> list[bool]:
    """Per limit: would adding this admission's amount take its counter over the value?"""
    out = []
    for limit, slot in zip(limits, plan_.slots, strict=True):
        counter = plan_.counters[slot]
        out.append(views[slot].used + counter.amount > limit.value)
    return out


@lru_cache(maxsize=256)
def period_end(period: str, tz: tzinfo) -> float:
    """Unix time a `YYYY-MM-DD` day or `YYYY-MM` month named in zone `tz` ends."""
    if len(period) == 7:
        year, month = (int(p) for p in period.split("-"))
        start = date(year + month // 12, month % 12 + 1, 1)
    else:
        start = date.fromisoformat(period) + timedelta(days=1)
    return datetime(start.year, start.month, start.day, tzinfo=tz).timestamp()


@dataclass(slots=True)  # store-internal and built per call: a plain dataclass is 4x cheaper to make
class Periods:
    """When the admission's day and month end, computed once before touching the store."""

    day_end: float
    month_end: float

    @classmethod
    def of(cls, day: str, month: str, tz: tzinfo) -> Periods:
        return cls(period_end(day, tz), period_end(month, tz))

    def end(self, name: LimitName) -> float:
        return self.month_end if name is LimitName.USD_PER_MONTH else self.day_end


def reset_seconds(limit: Limit, counter: Counter, used: int, oldest: int | None, now: float,
                  periods: Periods) -> float:
    if counter.kind is CounterKind.WINDOW:
        return 0.0 if used <= 0 or oldest is None else max(0.0, oldest + WINDOW_SECONDS - now)
    if counter.kind is CounterKind.PERIOD:
        return max(0.0, periods.end(limit.name) - now)
    return 0.0 if used < limit.value else LEASE_RETRY_SECONDS


def retry_after(limit: Limit, counter: Counter, free_at: int | None, now: float,
                periods: Periods) -> float:
    if counter.kind is CounterKind.WINDOW:
        # None: this request alone exceeds the limit; a window is the honest wait.
        if free_at is None:
            return float(WINDOW_SECONDS)
        return max(0.0, free_at + WINDOW_SECONDS - now)
    if counter.kind is CounterKind.PERIOD:
        return max(0.0, periods.end(limit.name) - now)
    return LEASE_RETRY_SECONDS


def limit_states(limits: tuple[Limit, ...], plan_: Plan, views: tuple[CounterView, ...],
                 admitted: bool, now: float, periods: Periods) -> tuple[LimitState, ...]:
    states = []
    second = math.floor(now)
    for limit, slot in zip(limits, plan_.slots, strict=True):
        counter, view = plan_.counters[slot], views[slot]
        used, oldest = view.used, view.oldest
        if admitted and counter.amount > 0:
            used += counter.amount
            oldest = second if oldest is None else min(oldest, second)
        states.append(LimitState(limit, used, max(0, limit.value - used),
                                 reset_seconds(limit, counter, used, oldest, now, periods)))
    return tuple(states)


def decide(admission: Admission, plan_: Plan, views: tuple[CounterView, ...],
           free_at: tuple[int | None, ...], periods: Periods, failing: list[bool] | None = None) -> Decision:
    """The decision the store's counters imply; `free_at` is per limit (WINDOW ones that fail)."""
    if failing is None:
        failing = fails(plan_, admission.limits, views)
    denied = [lim for lim, f in zip(admission.limits, failing, strict=True) if f and lim.enforce]
    shadow = tuple(lim for lim, f in zip(admission.limits, failing, strict=True)
                   if f and not lim.enforce)
    admitted = not denied
    states = limit_states(admission.limits, plan_, views, admitted, admission.now, periods)
    if not admitted:
        # The request can pass only once every refusing limit has room: wait for the slowest.
        wait = max(
            retry_after(lim, plan_.counters[slot], at, admission.now, periods)
            for lim, slot, f, at in zip(admission.limits, plan_.slots, failing, free_at,
                                        strict=True)
            if f and lim.enforce
        )
        return Decision(False, None, states, denied[0], wait, shadow)
    return Decision(True, reservation_of(admission), states, None, 0.0, shadow)


def replayed_decision(admission: Admission, plan_: Plan, views: tuple[CounterView, ...],
                      periods: Periods) -> Decision:
    """The answer to an admission already reserved under its request_id (a retried call):
    admitted, counted once; `views` already include its reservation."""
    states = limit_states(admission.limits, plan_, views, False, admission.now, periods)
    shadow = tuple(s.limit for s in states if not s.limit.enforce and s.used > s.limit.value)
    return Decision(True, reservation_of(admission), states, None, 0.0, shadow)


def reservation_of(admission: Admission, layout: object = None) -> Reservation:
    """The reservation an admitted `admission` leaves, with the layout a direct path used for it."""
    return Reservation(admission.request_id, admission.tag, admission.limits, admission.tokens,
                       admission.cost_micro_usd, admission.now, admission.day, admission.month, layout)


# ---------------------------------------------------------------- usage aggregates (shared with redis)
# An event's seen marker lives this long: a replay of it later than this would count it again.
# Replays come from the fail-open queue as soon as the store answers again, and a settle whose
# reply was lost is retried within seconds, so an hour covers them. Each marker is ~100 bytes in
# Redis for that hour (about 360 MB at a sustained 1,000 requests/s).
SEEN_TTL_SECONDS = 3600
# The memory store is never replayed into (it cannot fail); its markers only guard against a
# double settle in-process, so they can be short and keep memory bounded. An event with a
# reservation needs none: the reservation's record is found by one settle only.
MEMORY_SEEN_TTL_SECONDS = 60
# Aggregates are the usage history reports and forecasts read: kept for a bit over a year.
AGG_TTL_SECONDS = 400 * 86400


def seen_key(tag: str, event_id: str) -> str:
    return f"{hash_tag(tag)}:seen:{event_id}"


@lru_cache(maxsize=262_144)  # per subject and day, asked at every settle: json.dumps costs more than a lookup
def aggregate_key(tag: str, day: str, user: str, team: str | None) -> str:
    """The hash of one (day, user, team), under the admission's hash tag (JSON keeps it unambiguous)."""
    return f"{hash_tag(tag)}:agg:{day}:" + json.dumps([user, team], separators=(",", ":"))


def index_key(day: str) -> str:
    """The day's index of aggregate hashes (no hash tag: it lists every subject's)."""
    return f"agg-index:{day}"


@lru_cache(maxsize=262_144)
def index_member(tag: str, user: str, team: str | None) -> str:
    return json.dumps([tag, user, team], separators=(",", ":"))


def parse_index_member(member: str | bytes) -> tuple[str, str, str | None]:
    tag, user, team = json.loads(member)
    return str(tag), str(user), None if team is None else str(team)


@lru_cache(maxsize=4096)
def aggregate_field_names(model: str) -> tuple[str, ...]:
    return tuple(f"{m}|{model}" for m in MEASURES)


def aggregate_fields(usage: AggregateDelta) -> list[tuple[str, int]]:
    """Hash field `measure|model` -> increment, for the measures this event has (requests always)."""
    return [(name, v) for name, m, v in zip(aggregate_field_names(usage.model), MEASURES, usage.totals.values(), strict=True)
            if v or m == "requests"]


def aggregate_rows(day: str, user: str, team: str | None,
                   fields: Mapping[str, int]) -> list[AggregateRow]:
    """One hash read back as rows, one per model."""
    by_model: dict[str, dict[str, int]] = {}
    for name, value in fields.items():
        measure, _, model = name.partition("|")
        if measure in MEASURES:
            by_model.setdefault(model, {})[measure] = int(value)
    return [AggregateRow(day, user, team, model, Totals(**vals)) for model, vals in sorted(by_model.items())]
