"""The embedded quota store: one process, no server, exact; its counters live in this process."""
from __future__ import annotations

import asyncio
import math
import sys
from array import array
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
    MEASURES,
    Admission,
    AggregateDelta,
    AggregateRow,
    Decision,
    Limit,
    LimitState,
    Reservation,
    StoredKey,
    Totals,
)
from proxy.quota.sweep import sweep_slice

# A cell's numbers, in its own array: when it expires (a whole second, see `_expiry`) and its
# total, then for a sliding window its per-second buckets as (second, amount) pairs, oldest first.
_EXPIRY, _TOTAL, _BUCKETS = 0, 1, 2
# The most a counter holds (it saturates there rather than overflow; only a shadow limit can let
# that much in, since limits stop at config.MAX_LIMIT).
_MOST = 2**64 - 1
# Unsigned 64-bit items: 'L' where a C long is 64 bits (it converts 2-digit ints, as seconds are,
# in a short loop; 'Q' goes through a byte-array conversion), else 'Q'.
_ITEMS = "L" if array("L").itemsize == 8 else "Q"


def _expiry(at: float) -> int:
    """A cell's expiry for `at`: the start of the next whole second (a cell may outlive its ttl by
    up to a second, never die before it). An int, so a cell is compared with `math.floor(now)`
    (`expiry <= now` exactly when `expiry <= floor(now)`), int with int."""
    return min(_MOST, math.floor(at) + 1)


class _Cell(array):
    """One counter: a sliding window's per-second buckets with their running total (a view costs
    only the buckets that left the window since the last one), a period's total, or a
    concurrency counter's leases; and when it expires.

    Its numbers live in the cell itself, an array of unsigned 64-bit integers (the signed types
    convert each item through argument parsing): with 100,000 subjects each object a request
    reaches is a cache miss, and a dict of buckets with an int object per second and a float for
    the expiry made ~6 of them a counter, where this makes 2-3.

    A subject's layout holds its cells, so the direct paths reach its counters without a lookup in
    the store's dict of every subject's; a cell the store drops is marked dead for them."""

    __slots__ = ("key", "leases", "dead")
    key: str  # so the sweep, which walks cells, can drop one without a lookup
    leases: dict[str, float] | None  # LEASES: request_id -> lease expiry
    dead: bool

    def __new__(cls, key: str) -> _Cell:
        cell = super().__new__(cls, _ITEMS, (0, 0))
        cell.key, cell.leases, cell.dead = key, None, False
        return cell

    @property
    def total(self) -> int:
        return self[_TOTAL]

    @property
    def expiry(self) -> int:
        return self[_EXPIRY]

    def live_until(self, at: float) -> None:
        self[_EXPIRY] = _expiry(at)

    def outlive(self, at: float) -> None:
        """Live at least until `at`."""
        if self[_EXPIRY] < at:
            self[_EXPIRY] = _expiry(at)

    def add_total(self, amount: int) -> None:
        """Add to (or, negative, take from) a period's total; never below zero, saturating."""
        self[_TOTAL] = min(_MOST, max(0, self[_TOTAL] + amount))

    @property
    def buckets(self) -> dict[int, int]:
        """A window's buckets, second -> amount (a copy, for the general path)."""
        return dict(zip(self[_BUCKETS::2], self[_BUCKETS + 1::2], strict=True))

    def sweep_expiry(self) -> float | None:
        """When the sweep may drop it; None once it is dropped."""
        return None if self.dead else self[_EXPIRY]

    def expire(self, low: int) -> int | None:
        """Drop the buckets older than second `low`; returns the oldest left."""
        n = len(self)
        i = _BUCKETS
        if i >= n or self[i] >= low:
            return self[i] if i < n else None
        total = self[_TOTAL]
        while i < n and self[i] < low:
            total -= self[i + 1]
            i += 2
        self[_TOTAL] = total
        del self[_BUCKETS:i]
        return self[_BUCKETS] if i < n else None

    def view(self, now: float) -> CounterView:
        oldest = self.expire(window_floor(now))
        return CounterView(self[_TOTAL], oldest)

    def add(self, second: int, amount: int) -> None:
        """Add (or, negative, take back) at `second`; never below zero for that bucket. The total
        stays its buckets' sum, saturating at `_MOST` (only a shadow limit lets that much in)."""
        i = len(self) - 2  # the newest bucket: where nearly every add lands
        newest = self[i] if i >= _BUCKETS else -1
        if amount > 0 and newest <= second:
            total = self[_TOTAL] + amount
            if total > _MOST:
                amount -= total - _MOST
                total = _MOST
            self[_TOTAL] = total
            if newest < second:  # a new second
                self.append(second)
                self.append(amount)
            else:
                self[i + 1] += amount
            return
        while i >= _BUCKETS and self[i] > second:  # an older second (a settle, a replay): walk back
            i -= 2
        old = self[i + 1] if i >= _BUCKETS and self[i] == second else 0
        new = max(0, old + amount)
        total = self[_TOTAL] + new - old
        if total > _MOST:
            new -= total - _MOST
            total = _MOST
        self[_TOTAL] = total
        if old:
            if new:
                self[i + 1] = new
            else:
                del self[i:i + 2]
        elif new:
            self.insert(i + 2, new)
            self.insert(i + 2, second)


class _Layout(Layout):
    """A layout with its counters' cells, found on first use, and the tally of its subject's
    aggregate it settled into last (a subject nearly always calls one model)."""

    __slots__ = ("cells", "tally_of", "tally_model", "tally")

    def __init__(self, limits: tuple[Limit, ...], counters: tuple[CounterSlot, ...],
                 checks: tuple[LimitCheck, ...], lease_seconds: float) -> None:
        super().__init__(limits, counters, checks, lease_seconds)
        # A tuple, not a list: one object to reach, not two; replaced only when a cell is.
        self.cells: tuple[_Cell | None, ...] = (None,) * len(counters)
        self.tally_of: dict[str, array[int]] | None = None  # the held aggregate the tally is in
        self.tally_model = ""  # interned
        self.tally: array[int] | None = None

    def hold(self, i: int, cell: _Cell | None) -> None:
        """Hold `cell` as the i-th counter's."""
        cells = self.cells
        if cells[i] is not cell:
            self.cells = (*cells[:i], cell, *cells[i + 1:])


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
        # usage aggregates: day -> (user, team) -> model -> tally (an array of counts in MEASURES
        # order, not an int object per count); see `settle_and_record`
        self._aggs: dict[str, dict[tuple[str, str | None], dict[str, array[int]]]] = {}
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
                cell = self._new_cell(layout.key(i))
                layout.hold(i, cell)
            if kind is CounterKind.WINDOW:
                cell.add(second, added)
            else:
                cell[_TOTAL] += added  # within its limits (every limit passed), so within the array's range
            cell[_EXPIRY] = second + ttl + 1  # `live_until(now + ttl)`, inline
        self._records[record] = now + record_ttl_seconds(admission.lease_seconds)
        return Decision(True, reservation_of(admission, layout), tuple(states), None, 0.0, ())

    def _fast_views(self, layout: _Layout, tokens: int, cost: int, now: float) -> list[Seen]:
        """Per counter: (used, oldest window bucket, what this admission adds), as `_view` sees it;
        leaves `layout.cells` holding each counter's live cell, or None."""
        second = math.floor(now)
        low = second - WINDOW_SECONDS + 1
        seen: list[Seen] = []
        for i, (kind, measure, _) in enumerate(layout.shape):
            added = amount_of(measure, tokens, cost)
            cell = self._held(layout, i, second)
            if cell is None:
                seen.append((0, None, added))
            elif kind is CounterKind.WINDOW:
                oldest = cell[_BUCKETS] if len(cell) > _BUCKETS else None
                if oldest is not None and oldest < low:
                    oldest = cell.expire(low)
                seen.append((cell[_TOTAL], oldest, added))
            else:
                seen.append((cell[_TOTAL], None, added))
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
        second = math.floor(now)
        for i, (kind, measure, ttl) in enumerate(layout.shape):
            delta = settle_delta(measure, reservation, tokens, cost_micro_usd)
            if kind is CounterKind.LEASES or delta != 0:
                layout.hold(i, self._adjust(kind, layout, i, ttl, self._held(layout, i, second), reservation, delta, now))
        return True

    async def usage(self, limits: tuple[Limit, ...], tag: str, now: float, day: str,
                    month: str) -> tuple[LimitState, ...]:
        periods = Periods.of(day, month, self._tz)
        plan_ = plan(limits, tag, 0, 0, day, month)
        views = tuple(self._view(c, now, write=False) for c in plan_.counters)
        return limit_states(limits, plan_, views, False, now, periods)

    def _live(self, key: str, second: int) -> _Cell | None:
        """The key's cell, None if it has none or it expired by `second` (`math.floor(now)`; then
        it is dropped)."""
        cell = self._cells.get(key)
        if cell is not None and cell[_EXPIRY] <= second:
            self._drop(cell)
            return None
        return cell

    def _held(self, layout: _Layout, i: int, second: int) -> _Cell | None:
        """`_live` for a layout's i-th counter, through the cell it holds while that lives (the
        counter's key, the subject's own string, is read only when it does not)."""
        cell = layout.cells[i]
        if cell is None or cell.dead or cell[_EXPIRY] <= second:
            cell = self._live(layout.key(i), second)
            layout.hold(i, cell)
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
        cell = self._live(counter.key, math.floor(now))
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
            cell.outlive(expiry + 1)
            return
        if counter.amount == 0:
            return
        cell = self._cell(counter.key)
        if counter.kind is CounterKind.WINDOW:
            cell.add(math.floor(now), counter.amount)
        else:
            cell.add_total(counter.amount)
        cell.live_until(now + counter.ttl_seconds)

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
                cell.live_until(now + ttl)
            cell.add(second, delta)
            if delta > 0:  # what it added must outlive the window
                cell.outlive(now + ttl)
            return cell
        if cell is None:
            if delta < 0:
                return None  # the period's counter is gone: nothing to refund
            cell = self._new_cell(layout.key(i))
            cell.live_until(now + ttl)
        cell.add_total(delta)
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
        tally = self._tally(usage, layout)
        for i, value in enumerate(usage.totals.values()):
            if value:
                try:
                    tally[i] += value
                except OverflowError:  # below zero or past 2**64 (a provider's absurd count): kept in range
                    tally[i] = min(_MOST, max(0, tally[i] + value))
        return True

    def _tally(self, usage: AggregateDelta, layout: _Layout | None) -> array[int]:
        """The (day, user, team, model) counts `usage` adds to: a reservation's layout (one
        subject's for one day) holds its subject's aggregate and last tally, so a settle does not
        look them up among every subject's."""
        held: dict[str, array[int]] | None = None
        if layout is not None:
            held = layout.held_aggregate(usage)
            if held is not None and layout.tally_of is held and layout.tally_model == usage.model:
                return layout.tally  # type: ignore[return-value]  # set with tally_of
        by_model = held
        if by_model is None:
            by_subject = self._aggs.get(usage.day)
            if by_subject is None:
                by_subject = self._aggs[usage.day] = {}
            subject = (usage.user, usage.team)
            by_model = by_subject.get(subject)
            if by_model is None:
                by_model = by_subject[subject] = {}
        model = sys.intern(usage.model)
        tally = by_model.get(model)
        if tally is None:
            tally = by_model[model] = array(_ITEMS, bytes(8 * len(MEASURES)))
        if layout is not None:  # aggregates are never dropped: it stays the one
            if held is None:
                layout.hold_aggregate(usage, by_model)
            if layout.held_aggregate(usage) is by_model:
                layout.tally_of, layout.tally_model, layout.tally = by_model, model, tally
        return tally

    async def aggregates(self, days: tuple[str, ...], user: str | None = None,
                         team: str | None = None) -> tuple[AggregateRow, ...]:
        rows: list[AggregateRow] = []
        for day in days:
            for (u, t), by_model in self._aggs.get(day, {}).items():
                if (user is None or u == user) and (team is None or t == team):
                    rows += (AggregateRow(day, u, t, model, Totals(*tally)) for model, tally in sorted(by_model.items()))
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
