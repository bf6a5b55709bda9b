"""The embedded quota store: one process, no server, exact; its counters live in this process."""
from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Coroutine
from datetime import UTC, tzinfo
from typing import Any

from proxy.quota.counters import (
    MEMORY_SEEN_TTL_SECONDS,
    WINDOW_SECONDS,
    Counter,
    CounterKind,
    CounterView,
    Periods,
    admission_plan,
    aggregate_field_names,
    aggregate_rows,
    amount_of,
    decide,
    fails,
    limit_states,
    plan,
    record_key,
    replayed_decision,
    reservation_of,
    settle_delta,
    window_floor,
    window_free_at,
    window_view,
)
from proxy.quota.layout import (
    CounterSlot,
    Layout,
    Layouts,
    LimitCheck,
    Seen,
    passing_states,
    record_ttl_seconds,
)
from proxy.quota.store import (
    Admission,
    AggregateDelta,
    AggregateRow,
    Decision,
    Limit,
    LimitState,
    Reservation,
    StoredKey,
)
from proxy.quota.sweep import sweep_slice


class _Cell:
    """One counter and when it expires: a sliding window's per-second buckets, oldest first, with
    their running total (a view costs only the buckets that left the window since the last one),
    a period's total, or a concurrency counter's leases.

    A subject's layout holds its cells, so the direct paths reach its counters without a lookup in
    the store's dict of every subject's; a cell the store drops is marked dead for them."""

    __slots__ = ("key", "buckets", "total", "last", "expiry", "leases", "dead")

    def __init__(self, key: str) -> None:
        self.key = key  # so the sweep, which walks cells, can drop one without a lookup
        self.buckets: dict[int, int] = {}
        self.total = 0
        self.last = -math.inf  # newest second inserted: keeps `buckets` in time order
        self.expiry = -math.inf  # set by whoever adds to it
        self.leases: dict[str, float] | None = None  # LEASES: request_id -> lease expiry
        self.dead = False

    def sweep_expiry(self) -> float | None:
        """When the sweep may drop it; None once it is dropped."""
        return None if self.dead else self.expiry

    def expire(self, low: int) -> None:
        b = self.buckets
        while b:
            first = next(iter(b))
            if first >= low:
                return
            self.total -= b.pop(first)

    def view(self, now: float) -> CounterView:
        self.expire(window_floor(now))
        return CounterView(self.total, next(iter(self.buckets)) if self.buckets else None)

    def add(self, second: int, amount: int) -> None:
        """Add (or, negative, take back) at `second`; never below zero for that bucket."""
        b = self.buckets
        old = b.get(second, 0)
        new = max(0, old + amount)
        self.total += new - old
        if new:
            b[second] = new
            if second < self.last and old == 0:  # out of time order (a replay): re-sort, rarely
                self.buckets = dict(sorted(b.items()))
            self.last = max(self.last, second)
        else:
            b.pop(second, None)


class _Layout(Layout):
    """A layout with its counters' cells, found on first use."""

    __slots__ = ("cells",)

    def __init__(self, limits: tuple[Limit, ...], counters: tuple[CounterSlot, ...],
                 checks: tuple[LimitCheck, ...], lease_seconds: float) -> None:
        super().__init__(limits, counters, checks, lease_seconds)
        self.cells: list[_Cell | None] = [None] * len(counters)


class MemoryStore:
    """The quota store in this process's memory: exact, but shared by nobody else.

    Atomic without locks because admit and settle never await between checking and writing.
    Expiry runs on the callers' `now`, the same clock the windows use.
    """

    def __init__(self, *, tz: tzinfo = UTC, sweep_interval_seconds: float = 60.0) -> None:
        self._tz = tz
        self._cells: dict[str, _Cell] = {}  # counter key -> its cell
        self._records: dict[str, float] = {}  # record key -> expiry
        self._sweep_interval = sweep_interval_seconds
        self._next_sweep = -math.inf
        self._sweeping: list[_Cell] = []  # counters the running sweep has yet to look at
        self._sweeping_records: list[str] = []
        # usage aggregates: day -> (user, team) -> "measure|model" -> count; see `settle_and_record`
        self._aggs: dict[str, dict[tuple[str, str | None], dict[str, int]]] = {}
        # Events recorded without a reservation -> marker expiry, and the same ids oldest first.
        self._seen: dict[str, float] = {}
        self._seen_order: deque[str] = deque()
        self._keys: dict[str, StoredKey] = {}  # digest -> key created through the admin API
        self._layouts = Layouts(tz, "", _Layout)

    @property
    def bounds_own_calls(self) -> bool:
        return True  # it never waits

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def admit(self, admission: Admission) -> Decision:
        return self.admit_now(admission)

    # The embedded store never suspends: callers that know it may skip the coroutine layers.
    def admit_now(self, admission: Admission) -> Decision:
        if admission.now >= self._next_sweep or self._sweeping or self._sweeping_records:
            self._sweep(admission.now)
        decision = self._admit_fast(admission)
        return decision if decision is not None else self._admit(admission)

    def _admit_fast(self, admission: Admission) -> Decision | None:
        """The common case without Counter, Plan or view objects: window and period counters only,
        a new request id, every limit passing. None: anything else, for the general path (which
        then sees the same counters: expiring them here first changes nothing it reads)."""
        layout = self._layouts.get(admission.limits, admission.tag, admission.day, admission.month,
                                   admission.lease_seconds, admission.slot)
        if layout.leases:
            return None  # concurrency leases: the general path
        now = admission.now
        record = layout.record_prefix + admission.request_id  # record_key(tag, request_id)
        if record in self._records:  # a retried request id (or one whose record expired): general path
            return None
        tokens, cost = admission.tokens, admission.cost_micro_usd
        if tokens < 0 or cost < 0:
            return None  # the general path raises
        seen = self._fast_views(layout, tokens, cost, now)
        states = passing_states(layout, seen, now)
        if states is None:
            return None  # refused or shadow-refused: the general path says which and why
        second = math.floor(now)
        cells = layout.cells
        for i, ((kind, _, ttl), (_, _, added)) in enumerate(zip(layout.shape, seen, strict=True)):
            if added == 0:
                continue
            cell = cells[i]  # live: `_fast_views` just looked
            if cell is None:
                cell = cells[i] = self._new_cell(layout.key(i))
            if kind is CounterKind.WINDOW:
                cell.add(second, added)
            else:
                cell.total += added
            cell.expiry = now + ttl
        self._records[record] = now + record_ttl_seconds(admission.lease_seconds)
        return Decision(True, reservation_of(admission, layout), tuple(states), None, 0.0, ())

    def _fast_views(self, layout: _Layout, tokens: int, cost: int, now: float) -> list[Seen]:
        """Per counter: (used, oldest window bucket, what this admission adds), as `_view` sees it;
        leaves `layout.cells` holding each counter's live cell, or None."""
        low = math.floor(now) - WINDOW_SECONDS + 1
        seen: list[Seen] = []
        for i, (kind, measure, _) in enumerate(layout.shape):
            added = amount_of(measure, tokens, cost)
            cell = self._held(layout, i, now)
            if cell is None:
                seen.append((0, None, added))
            elif kind is CounterKind.WINDOW:
                cell.expire(low)
                seen.append((cell.total, next(iter(cell.buckets)) if cell.buckets else None, added))
            else:
                seen.append((cell.total, None, added))
        return seen

    def _admit(self, admission: Admission) -> Decision:
        periods = Periods.of(admission.day, admission.month, self._tz)
        now = admission.now
        plan_ = admission_plan(admission)
        views = tuple(self._view(c, now) for c in plan_.counters)
        record = record_key(admission.tag, admission.request_id)
        if self._records.get(record, -math.inf) > now:
            return replayed_decision(admission, plan_, views, periods)
        failing = fails(plan_, admission.limits, views)
        free_at = tuple(
            self._free_at(plan_.counters[slot], views[slot], lim, now) if f else None
            for lim, slot, f in zip(admission.limits, plan_.slots, failing, strict=True)
        ) if any(failing) else (None,) * len(failing)
        decision = decide(admission, plan_, views, free_at, periods, failing)
        if decision.admitted:
            for counter in plan_.counters:
                self._add(counter, admission)
            self._records[record] = now + record_ttl_seconds(admission.lease_seconds)
        return decision

    async def settle(self, reservation: Reservation, tokens: int, cost_micro_usd: int,
                     now: float) -> bool:
        return self.settle_now(reservation, tokens, cost_micro_usd, now)

    def settle_now(self, reservation: Reservation, tokens: int, cost_micro_usd: int, now: float) -> bool:
        return self._settle(self._layouts.of_reservation(reservation), reservation, tokens, cost_micro_usd, now)

    def _settle(self, layout: _Layout, reservation: Reservation, tokens: int, cost_micro_usd: int,
                now: float) -> bool:
        # The reservation's counters from their cached layout (no Counter objects): what
        # `reservation_plan` gives.
        expiry = self._records.pop(layout.record_prefix + reservation.request_id, None)  # record_key(...)
        if expiry is None or expiry <= now:
            return False
        cells = layout.cells
        for i, (kind, measure, ttl) in enumerate(layout.shape):
            delta = settle_delta(measure, reservation, tokens, cost_micro_usd)
            if kind is CounterKind.LEASES or delta != 0:
                cells[i] = self._adjust(kind, layout, i, ttl, self._held(layout, i, now), reservation, delta, now)
        return True

    async def usage(self, limits: tuple[Limit, ...], tag: str, now: float, day: str,
                    month: str) -> tuple[LimitState, ...]:
        periods = Periods.of(day, month, self._tz)
        plan_ = plan(limits, tag, 0, 0, day, month)
        views = tuple(self._view(c, now, write=False) for c in plan_.counters)
        return limit_states(limits, plan_, views, False, now, periods)

    def _live(self, key: str, now: float) -> _Cell | None:
        """The key's cell, None if it has none or it expired (then it is dropped)."""
        cell = self._cells.get(key)
        if cell is not None and cell.expiry <= now:
            self._drop(cell)
            return None
        return cell

    def _held(self, layout: _Layout, i: int, now: float) -> _Cell | None:
        """`_live` for a layout's i-th counter, through the cell it holds while that lives (the
        counter's key, the subject's own string, is read only when it does not)."""
        cells = layout.cells
        cell = cells[i]
        if cell is None or cell.dead or cell.expiry <= now:
            cell = cells[i] = self._live(layout.key(i), now)
        return cell

    def _new_cell(self, key: str) -> _Cell:
        cell = self._cells[key] = _Cell(key)
        return cell

    def _cell(self, key: str) -> _Cell:
        """The key's cell, made if it has none (callers have dropped an expired one first)."""
        cell = self._cells.get(key)
        return cell if cell is not None else self._new_cell(key)

    def _drop(self, cell: _Cell) -> None:
        if not cell.dead:  # a live cell is the one its key maps to
            del self._cells[cell.key]
            cell.dead = True

    def _sweep(self, now: float) -> None:
        """Drop expired counters and records now and then, so memory stays bounded: each call
        looks at one slice of what there was when the sweep began, so with many subjects no one
        admission pays for a whole pass (100,000 users: ~20 ms at once). The counters are walked
        as their cells, not their keys: looking each key up again cost a pass over 200,000
        counters ~3x more (cache misses on every table entry and key)."""
        if not self._sweeping and not self._sweeping_records:
            if now < self._next_sweep:
                return
            self._next_sweep = now + self._sweep_interval
            self._sweeping = list(self._cells.values())  # a copy of the references only: C speed
            self._sweeping_records = list(self._records)
        sweep_slice(self._sweeping, _Cell.sweep_expiry, self._drop, now)
        sweep_slice(self._sweeping_records, self._records.get, self._records.__delitem__, now)

    def _view(self, counter: Counter, now: float, *, write: bool = True) -> CounterView:
        cell = self._live(counter.key, now)
        if cell is None:
            return CounterView(0)
        if counter.kind is CounterKind.WINDOW:
            if write:
                return cell.view(now)
            return window_view(cell.buckets, now)
        if counter.kind is CounterKind.PERIOD:
            return CounterView(cell.total)
        leases = cell.leases or {}
        if write:
            for request_id in [r for r, t in leases.items() if t <= now]:
                del leases[request_id]
        return CounterView(sum(1 for t in leases.values() if t > now))

    def _free_at(self, counter: Counter, view: CounterView, limit: Limit,
                 now: float) -> int | None:
        if counter.kind is not CounterKind.WINDOW:
            return None
        if counter.amount > limit.value:
            return None
        need = view.used + counter.amount - limit.value
        cell = self._cells.get(counter.key)
        return window_free_at(cell.buckets if cell else {}, now, need)

    def _add(self, counter: Counter, admission: Admission) -> None:
        now = admission.now
        if counter.kind is CounterKind.LEASES:
            cell = self._cell(counter.key)
            expiry = now + admission.lease_seconds
            if cell.leases is None:
                cell.leases = {}
            cell.leases[admission.request_id] = expiry
            cell.expiry = max(cell.expiry, expiry + 1)
            return
        if counter.amount == 0:
            return
        cell = self._cell(counter.key)
        if counter.kind is CounterKind.WINDOW:
            cell.add(math.floor(now), counter.amount)
        else:
            cell.total += counter.amount
        cell.expiry = now + counter.ttl_seconds

    def _adjust(self, kind: CounterKind, layout: _Layout, i: int, ttl: int, cell: _Cell | None,
                reservation: Reservation, delta: int, now: float) -> _Cell | None:
        """Settle `layout`'s i-th counter, whose live cell (or None) is `cell`; returns its cell now."""
        if kind is CounterKind.LEASES:
            if cell is not None and cell.leases is not None:
                cell.leases.pop(reservation.request_id, None)
            return cell
        if kind is CounterKind.WINDOW:
            second = math.floor(reservation.time)
            if second < window_floor(now):
                return cell  # already out of the window: nothing left to correct
            if cell is None:
                cell = self._new_cell(layout.key(i))
                cell.expiry = now + ttl
            cell.add(second, delta)
            if delta > 0:  # what it added must outlive the window
                cell.expiry = max(cell.expiry, now + ttl)
            return cell
        if cell is None:
            if delta < 0:
                return None  # the period's counter is gone: nothing to refund
            cell = self._new_cell(layout.key(i))
            cell.expiry = now + ttl
        cell.total = max(0, cell.total + delta)
        return cell

    # ------------------------------------------------------------ usage aggregates and keys
    async def settle_and_record(self, reservation: Reservation | None, usage: AggregateDelta,
                                now: float) -> bool:
        return self.settle_and_record_now(reservation, usage, now)

    def admit_soon(self, admission: Admission) -> Coroutine[Any, Any, Decision] | None:
        return None  # `admit_now` is this store's way

    def settle_and_record_soon(self, reservation: Reservation | None, usage: AggregateDelta,
                               now: float) -> asyncio.Future[bool] | None:
        return None  # `settle_and_record_now` is this store's way: done before it returns

    def settle_and_record_now(self, reservation: Reservation | None, usage: AggregateDelta, now: float) -> bool:
        layout = None
        if reservation is not None:
            layout = self._layouts.of_reservation(reservation)
            # The reservation's record is the event's marker: only the first settle finds it.
            if not self._settle(layout, reservation, usage.totals.tokens, usage.totals.cost_micro_usd, now):
                return False
        else:
            seen, order = self._seen, self._seen_order
            while order and seen[order[0]] <= now:  # markers expire oldest first
                del seen[order.popleft()]
            if usage.event_id in seen:
                return False
            seen[usage.event_id] = now + MEMORY_SEEN_TTL_SECONDS
            order.append(usage.event_id)
        cell = self._aggregate(usage, layout)
        names = aggregate_field_names(usage.model)
        requests = names[0]
        for name, value in zip(names, usage.totals.values(), strict=True):  # `aggregate_fields`, inline
            if value or name is requests:
                cell[name] = cell.get(name, 0) + value
        return True

    def _aggregate(self, usage: AggregateDelta, layout: _Layout | None) -> dict[str, int]:
        """The (day, user, team) aggregate `usage` adds to: a reservation's layout (one subject's
        for one day) holds its subject's, so a settle does not look it up among every subject's."""
        if layout is not None:
            held: dict[str, int] | None = layout.held_aggregate(usage)
            if held is not None:
                return held
        by_subject = self._aggs.get(usage.day)
        if by_subject is None:
            by_subject = self._aggs[usage.day] = {}
        subject = (usage.user, usage.team)
        cell = by_subject.get(subject)
        if cell is None:
            cell = by_subject[subject] = {}
        if layout is not None:  # aggregates are never dropped: it stays the one
            layout.hold_aggregate(usage, cell)
        return cell

    async def aggregates(self, days: tuple[str, ...], user: str | None = None,
                         team: str | None = None) -> tuple[AggregateRow, ...]:
        rows: list[AggregateRow] = []
        for day in days:
            for (u, t), fields in self._aggs.get(day, {}).items():
                if (user is None or u == user) and (team is None or t == team):
                    rows += aggregate_rows(day, u, t, fields)
        return tuple(rows)

    async def put_key(self, key: StoredKey) -> None:
        self._keys[key.digest] = key

    async def get_key(self, digest: str) -> StoredKey | None:
        return self._keys.get(digest)

    async def list_keys(self) -> tuple[StoredKey, ...]:
        return tuple(sorted(self._keys.values(), key=lambda k: k.created))

    async def revoke_key(self, key_id: str) -> StoredKey | None:
        for digest, key in list(self._keys.items()):
            if key.key_id == key_id:
                return self._keys.pop(digest)
        return None
