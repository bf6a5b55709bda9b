"""A subject's counters and limits laid out once for the stores' direct paths, and the limit states
an admission leaves when every limit passes: the arithmetic both stores' direct paths share.

The general path (`counters.decide`, with Counter, Plan and view objects) handles everything; the
direct paths handle the common case (a new request id, every limit passing) without building those
objects, and hand anything else to it. Both are checked against each other in the tests.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from datetime import tzinfo
from typing import Any, Generic, TypeVar

from proxy.quota.counters import (
    LEASE_RETRY_SECONDS,
    RECORD_TTL_SECONDS,
    SHAPE_CACHE_MAX,
    WINDOW_SECONDS,
    CounterKind,
    Measure,
    build_shape,
    period_end,
    record_key,
    seen_key,
)
from proxy.quota.store import (
    DEFAULT_LEASE_SECONDS,
    AggregateDelta,
    LayoutSlot,
    Limit,
    LimitName,
    LimitState,
    Reservation,
)

# Per counter: (kind, measure, key with the store's prefix, ttl seconds).
CounterSlot = tuple[CounterKind, Measure, str, int]
# Per limit: (limit, index of its counter, kind of that counter, end of its period, 0.0 for others).
LimitCheck = tuple[Limit, int, CounterKind, float]
# Per counter, what every subject with the same limits shares: (kind, measure, ttl seconds).
CounterShape = tuple[CounterKind, Measure, int]
# Per limit, likewise: (index of its counter, kind of that counter, end of its period or 0.0).
CheckShape = tuple[int, CounterKind, float]
# Per counter, as a direct path saw it: (used, oldest window bucket or None, what this admission adds).
Seen = tuple[int, int | None, int]
_LayoutKey = tuple[int, str, str, str, float]


class Layout:
    """One subject's counters and limit checks for one day, month and lease length."""

    __slots__ = ("limits", "counters", "checks", "shape", "check_shape", "leases", "lease_seconds", "owner", "tag",
                 "day", "month", "record_prefix", "seen_prefix", "_agg_user", "_agg_team", "_agg")

    def __init__(self, limits: tuple[Limit, ...], counters: tuple[CounterSlot, ...],
                 checks: tuple[LimitCheck, ...], lease_seconds: float) -> None:
        self.limits = limits  # the tuple this was laid out for: the cache matches it by identity
        self.counters = counters
        self.checks = checks
        # `counters` and `checks` less the keys and Limit objects, shared by every layout of the
        # same shape (set by the Layouts that made it): a direct path walks these, which stay in
        # cache across subjects, and reads a subject's own key only to make its counter.
        self.shape: tuple[CounterShape, ...] = ()
        self.check_shape: tuple[CheckShape, ...] = ()
        self.leases = any(kind is CounterKind.LEASES for kind, _, _, _ in counters)
        self.lease_seconds = lease_seconds
        # Set by the Layouts that made it: what a slot's layout is checked against.
        self.owner: object = None
        self.tag = self.day = self.month = ""
        # Keys with the store's prefix, less the request or event id: record_key(...), seen_key(...)
        self.record_prefix = self.seen_prefix = ""
        # The aggregate held: its user and team, and the store's handle (None: none held). Slots,
        # not a tuple: one object fewer to reach on every settle.
        self._agg_user: str | None = None
        self._agg_team: str | None = None
        self._agg: Any = None

    def key(self, i: int) -> str:
        """The i-th counter's key (with the store's prefix): the subject's own string, read only
        to make or find its counter."""
        return self.counters[i][2]

    def held_aggregate(self, usage: AggregateDelta) -> Any:
        """What the store keeps for `usage`'s aggregate (its cell, or its key), if this layout
        holds it: a layout is one subject's for one day, so a settle need not look it up among
        every subject's. None: look it up, then `hold_aggregate` it."""
        if self._agg_user is usage.user and self._agg_team is usage.team and self.day is usage.day:
            return self._agg
        return None

    def hold_aggregate(self, usage: AggregateDelta, handle: Any) -> None:
        if self.day == usage.day and self.tag == usage.tag:
            self._agg_user, self._agg_team, self._agg = usage.user, usage.team, handle


def record_ttl_seconds(lease_seconds: float) -> int:
    """How long an unsettled reservation's record lives: past every counter settle may adjust, and
    past twice its lease."""
    return max(RECORD_TTL_SECONDS, math.ceil(lease_seconds * 2))


L_co = TypeVar("L_co", bound=Layout)


class Layouts(Generic[L_co]):
    """A store's layouts, cached per (limits tuple, tag, day, month, lease). Keyed by identity: the
    limit book hands out one tuple per subject, and hashing its Limits costs more than the layout.
    Each entry holds its tuple, so the id cannot be reused while the entry lives. A store that
    needs more per layout passes a subclass of `Layout` as `make`."""

    def __init__(self, tz: tzinfo, prefix: str,
                 make: Callable[[tuple[Limit, ...], tuple[CounterSlot, ...], tuple[LimitCheck, ...], float], L_co]) -> None:
        self._tz = tz
        self._prefix = prefix
        self._make = make
        self._cache: dict[_LayoutKey, L_co] = {}
        self._shapes: dict[tuple[Any, ...], tuple[Any, ...]] = {}  # each shape once, so layouts share it

    def get(self, limits: tuple[Limit, ...], tag: str, day: str, month: str, lease_seconds: float,
            slot: LayoutSlot | None = None) -> L_co:
        """The layout for these; `slot` (the subject's) is looked in first and left holding it."""
        if slot is not None:
            held = slot.layout
            # By identity, as the cache key is: the gate hands out one limits tuple, tag and day
            # string per subject and day. A miss only costs the lookup below.
            if (isinstance(held, Layout) and held.owner is self and held.limits is limits and held.tag is tag
                    and held.day is day and held.month is month and held.lease_seconds == lease_seconds):
                return held  # type: ignore[return-value]  # it is one of ours: an L_co
        key = (id(limits), tag, day, month, lease_seconds)
        hit = self._cache.get(key)
        if hit is None or hit.limits is not limits:
            hit = self._made(key, limits, tag, day, month, lease_seconds)
        if slot is not None:
            slot.layout = hit
        return hit

    def _made(self, key: _LayoutKey, limits: tuple[Limit, ...], tag: str, day: str, month: str,
              lease_seconds: float) -> L_co:
        shape, slots = build_shape(limits, tag, day, month, lease_seconds)
        prefix = self._prefix
        counters = tuple((kind, measure, prefix + key, ttl) for kind, measure, key, ttl in shape)
        checks = tuple(
            (lim, slot, shape[slot][0],
             period_end(month if lim.name is LimitName.USD_PER_MONTH else day, self._tz)
             if shape[slot][0] is CounterKind.PERIOD else 0.0)
            for lim, slot in zip(limits, slots, strict=True))
        layout = self._make(limits, counters, checks, lease_seconds)
        layout.owner, layout.tag, layout.day, layout.month = self, tag, day, month
        # Interned like the tag: the end users of a key (or a team) share them.
        layout.record_prefix = sys.intern(prefix + record_key(tag, ""))
        layout.seen_prefix = sys.intern(prefix + seen_key(tag, ""))
        layout.shape = self._shared(tuple((kind, measure, ttl) for kind, measure, _, ttl in counters))
        layout.check_shape = self._shared(tuple((slot, kind, end) for _, slot, kind, end in checks))
        if len(self._cache) >= SHAPE_CACHE_MAX:
            self._cache.clear()
        self._cache[key] = layout
        return layout

    def _shared(self, shape: tuple[Any, ...]) -> tuple[Any, ...]:
        hit = self._shapes.get(shape)
        if hit is None:
            if len(self._shapes) >= SHAPE_CACHE_MAX:
                self._shapes.clear()
            hit = self._shapes[shape] = shape
        return hit

    def of_reservation(self, reservation: Reservation) -> L_co:
        """What settling a reservation touches (its keys do not depend on the lease it was admitted with):
        the layout its admission used, when that was one of ours."""
        held = reservation.layout
        if isinstance(held, Layout) and held.owner is self:
            return held  # type: ignore[return-value]  # it is one of ours: an L_co
        return self.get(reservation.limits, reservation.tag, reservation.day, reservation.month, DEFAULT_LEASE_SECONDS)


def passing_states(layout: Layout, seen: list[Seen], now: float) -> list[LimitState] | None:
    """Each limit's state once this admission is counted, as `counters.limit_states` gives it for an
    admitted request; None if some limit (enforced or not) would go over, for the general path to
    say which and why."""
    second = math.floor(now)
    states = []
    limits = layout.limits
    for i, (slot, kind, end) in enumerate(layout.check_shape):
        lim = limits[i]
        used, oldest, added = seen[slot]
        if used + added > lim.value:
            return None
        if added > 0:
            used += added
            oldest = second if oldest is None or second < oldest else oldest
        # `counters.reset_seconds`, spelled out: a call per limit costs more than the rest
        if kind is CounterKind.PERIOD:
            reset = end - now
        elif kind is CounterKind.WINDOW:
            reset = 0.0 if used <= 0 or oldest is None else oldest + WINDOW_SECONDS - now
        else:
            reset = 0.0 if used < lim.value else LEASE_RETRY_SECONDS
        left = lim.value - used
        states.append(LimitState(lim, used, left if left > 0 else 0, reset if reset > 0.0 else 0.0))
    return states
