"""The redis store's direct path: admit.lua's and record.lua's arguments from a subject's cached
layout, and admit.lua's reply read back, without Counter, Plan or view objects. What admit.lua
and record.lua take is documented at the top of each script.
"""
from __future__ import annotations

import math
from typing import Any

from proxy.quota.counters import Measure, amount_of, settle_delta
from proxy.quota.layout import CounterSlot, Layout, LimitCheck, Seen, record_ttl_seconds
from proxy.quota.store import Admission, Limit, Reservation

Args = list[str | int]
_ADMIT_HEAD = 6  # now, request_id, record_ttl, lease_expiry, n counters, m limits


class ScriptLayout(Layout):
    """A layout with what the scripts take precomputed: the counter keys, and admit.lua's argument
    tail with the places where this admission's tokens and cost go."""

    __slots__ = ("keys", "kinds", "record_ttl", "admit_tail", "amount_at")

    def __init__(self, limits: tuple[Limit, ...], counters: tuple[CounterSlot, ...],
                 checks: tuple[LimitCheck, ...], lease_seconds: float) -> None:
        super().__init__(limits, counters, checks, lease_seconds)
        self.keys = [key for _, _, key, _ in counters]
        self.kinds = tuple(kind.value for kind, _, _, _ in counters)  # plain str: no enum lookups per call
        self.record_ttl = record_ttl_seconds(lease_seconds)
        tail: Args = []  # per counter (kind, amount, ttl), then per limit (counter index, value, enforce)
        amount_at: list[tuple[int, int]] = []  # (place in ARGV, counter): filled per admission
        for i, (kind, measure, _, ttl) in enumerate(counters):
            if measure is Measure.TOKENS or measure is Measure.MONEY:
                amount_at.append((_ADMIT_HEAD + 3 * i + 1, i))
            tail += [kind.value, 1, ttl]
        for lim, slot, _, _ in checks:
            tail += [slot + 1, lim.value, int(lim.enforce)]
        self.admit_tail = tail
        self.amount_at = tuple(amount_at)


def admit_args(layout: ScriptLayout, admission: Admission) -> tuple[Args, list[int]]:
    """admit.lua's ARGV, and what the admission adds to each counter."""
    tokens, cost = admission.tokens, admission.cost_micro_usd
    now = float(admission.now)
    args: Args = [repr(now), admission.request_id, layout.record_ttl, repr(now + layout.lease_seconds),
                  len(layout.keys), len(layout.checks), *layout.admit_tail]
    added = [amount_of(measure, tokens, cost) for _, measure, _, _ in layout.counters]
    for at, counter in layout.amount_at:
        args[at] = added[counter]
    return args, added


def read_admit_reply(reply: Any, added: list[int]) -> tuple[bool, list[Seen], tuple[int | None, ...], bool]:
    """admit.lua's {admitted, used, oldest, free_at, replayed} as (admitted, what each counter held
    before this admission, each window limit's free-at bucket, replayed). Raises TypeError or
    ValueError on a malformed reply."""
    admitted, used, oldest, free_at, replayed = reply
    seen: list[Seen] = []
    for u, o, a in zip(used, oldest, added, strict=True):
        first = int(o)
        seen.append((int(u), None if first < 0 else first, a))
    frees = tuple(None if int(f) < 0 else int(f) for f in free_at)
    return bool(int(admitted)), seen, frees, bool(int(replayed))


def settle_args(layout: ScriptLayout, reservation: Reservation, tokens: int, cost_micro_usd: int) -> Args:
    """record.lua's per-counter arguments for settling a reservation: kind, delta, bucket, ttl."""
    bucket = math.floor(reservation.time)
    args: Args = []
    for kind, (_, measure, _, ttl) in zip(layout.kinds, layout.counters, strict=True):
        args += [kind, settle_delta(measure, reservation, tokens, cost_micro_usd), bucket, ttl]
    return args
