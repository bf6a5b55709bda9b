"""The quota store contract that `memory` and `redis` both implement.

Contract (one test suite checks it against both stores):
- `admit` is all-or-nothing: it checks every limit in the request and, only if all pass, reserves
  the request, its tokens, its cost and a concurrency lease on every counter, atomically, in one
  store round trip.
- `settle` replaces a reservation with the actual usage, once: settling the same reservation
  again changes nothing (it returns False). Counters never go negative.
- Concurrency slots are leases with an expiry, so a crashed proxy cannot leak them.
- Windows: `rpm` and `tpm` slide over the last 60 s; `*_per_day` and `usd_per_month` are calendar
  periods named by the caller (`Admission.day`, `Admission.month`, already in the configured zone).
- A limit with `enforce=False` never refuses; it is reported in `Decision.shadow_denied`.
"""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from ..records import LayoutSlot


class LimitName(StrEnum):
    RPM = "rpm"
    TPM = "tpm"
    TOKENS_PER_DAY = "tokens_per_day"
    USD_PER_DAY = "usd_per_day"
    USD_PER_MONTH = "usd_per_month"
    MAX_CONCURRENT = "max_concurrent"


# What each limit counts per admitted request.
REQUEST_LIMITS = frozenset({LimitName.RPM})
TOKEN_LIMITS = frozenset({LimitName.TPM, LimitName.TOKENS_PER_DAY})
MONEY_LIMITS = frozenset({LimitName.USD_PER_DAY, LimitName.USD_PER_MONTH})


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit on one scope, e.g. scope="user:alice", name=rpm, value=20.

    `value` is requests (rpm), tokens (tpm, tokens_per_day), micro-dollars (usd_*) or slots
    (max_concurrent). `tag` is the Redis Cluster hash tag shared by every key of one admission
    (the team's, or the user's when there is no team), so one script can touch them all.
    """

    scope: str
    name: LimitName
    value: int
    enforce: bool = True


# How long a concurrency slot is held unless the admission says otherwise. A reservation does not
# carry it: settling needs only its counters' keys, which do not depend on it.
DEFAULT_LEASE_SECONDS = 600.0


@dataclass(slots=True, unsafe_hash=True)  # not frozen: built per request, 4x cheaper to make
class Admission:
    request_id: str
    tag: str
    limits: tuple[Limit, ...]
    tokens: int  # reserved tokens: prompt estimate + max output
    cost_micro_usd: int  # reserved cost
    now: float  # unix seconds
    day: str  # e.g. "2026-11-28", in the configured timezone
    month: str  # e.g. "2026-11"
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    # Where the subject keeps the store's layout for it (the gate passes one per subject), or None.
    slot: LayoutSlot | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True, unsafe_hash=True)  # not frozen: built per request, 4x cheaper to make
class LimitState:
    """Where one limit stands after an admission (for rate-limit headers and the admin API)."""

    limit: Limit
    used: int  # including this request's reservation when admitted
    remaining: int  # max(0, value - used)
    reset_seconds: float  # until the window frees up (sliding: until the oldest use leaves it)


@dataclass(slots=True, unsafe_hash=True)  # not frozen: built per request, 4x cheaper to make
class Reservation:
    """What admit reserved; handed back to settle. Opaque to everyone but the store."""

    request_id: str
    tag: str
    limits: tuple[Limit, ...]
    tokens: int
    cost_micro_usd: int
    time: float
    day: str
    month: str
    layout: object = field(default=None, compare=False, repr=False)  # the store's layout for it, if it kept one


@dataclass(slots=True, unsafe_hash=True)  # not frozen: built per request, 4x cheaper to make
class Decision:
    admitted: bool
    reservation: Reservation | None
    states: tuple[LimitState, ...]
    denied: Limit | None = None  # the first enforced limit that refused
    retry_after_seconds: float = 0.0
    shadow_denied: tuple[Limit, ...] = ()  # enforce=False limits that would have refused


# ---------------------------------------------------------------- usage aggregates and stored keys
# Aggregates: one hash per (UTC-or-configured-zone day, user, team) with a field per (measure,
# model); `settle_and_record` settles a reservation and adds one finished request to its hash in
# the same atomic round trip, once per event id (a replayed event changes nothing). A per-day index
# lists the hashes, so usage queries read a handful of hashes and never scan the ledger.

MEASURES = ("requests", "input_tokens", "output_tokens", "cached_input_tokens",
            "cache_write_tokens", "reasoning_tokens", "cost_micro_usd")


@dataclass(slots=True, unsafe_hash=True)  # not frozen: built per request, 4x cheaper to make
class Totals:
    """Counts of one aggregate cell (or a sum of cells); money in micro-dollars."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micro_usd: int = 0

    @property
    def tokens(self) -> int:
        """Billed tokens (reasoning is part of output, never added again)."""
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens + self.output_tokens

    def values(self) -> tuple[int, ...]:
        """In MEASURES order."""
        return (self.requests, self.input_tokens, self.output_tokens, self.cached_input_tokens,
                self.cache_write_tokens, self.reasoning_tokens, self.cost_micro_usd)

    def __add__(self, other: Totals) -> Totals:
        return Totals(*(a + b for a, b in zip(self.values(), other.values(), strict=True)))


@dataclass(slots=True, unsafe_hash=True)  # not frozen: built per request, 4x cheaper to make
class AggregateDelta:
    """One finished request as the aggregates see it. `tag` is the admission's hash tag."""

    event_id: str
    tag: str
    day: str  # YYYY-MM-DD in the configured zone (the zone budgets use)
    user: str
    team: str | None
    model: str
    totals: Totals


@dataclass(frozen=True, slots=True)
class AggregateRow:
    """One aggregate cell read back: a (day, user, team, model) and its totals."""

    day: str
    user: str
    team: str | None
    model: str
    totals: Totals


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A virtual key created through the admin API or CLI: only its sha256 is kept."""

    key_id: str  # short non-secret id (digest prefix), what `revoke` takes
    digest: str
    user: str
    team: str | None = None
    plan: str | None = None
    trusted: bool = False
    created: float = 0.0


class UsageStore(Protocol):
    """What the usage ledger, admin API and CLI need from a store beyond admit and settle."""

    async def settle_and_record(self, reservation: Reservation | None, usage: AggregateDelta,
                                now: float) -> bool:
        """Settle `reservation` (if any, and only if not settled yet) to `usage`'s tokens and cost
        and add `usage` to its aggregate, atomically and in one round trip. Once per event id:
        returns False, changing nothing, for an event already recorded."""
        ...

    def settle_and_record_soon(self, reservation: Reservation | None, usage: AggregateDelta,
                               now: float) -> asyncio.Future[bool] | None:
        """`settle_and_record` sent at once, its outcome in the future returned (a caller that sees
        it fail calls `settle_and_record`); None, having done nothing, where the store cannot."""
        ...

    async def aggregates(self, days: tuple[str, ...], user: str | None = None,
                         team: str | None = None) -> tuple[AggregateRow, ...]: ...

    async def put_key(self, key: StoredKey) -> None: ...

    async def get_key(self, digest: str) -> StoredKey | None: ...

    async def list_keys(self) -> tuple[StoredKey, ...]: ...

    async def revoke_key(self, key_id: str) -> StoredKey | None: ...


class QuotaStore(UsageStore, Protocol):
    @property
    def bounds_own_calls(self) -> bool:
        """True when every call fails by itself within the store's timeout (the caller need not
        add a timer of its own)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def admit(self, admission: Admission) -> Decision: ...

    def admit_soon(self, admission: Admission) -> Coroutine[Any, Any, Decision] | None:
        """`admit` with its command sent at once and fewer coroutine layers: await what it returns
        (it fails as `admit` would); None, having done nothing, where the store cannot."""
        ...

    async def settle(
        self, reservation: Reservation, tokens: int, cost_micro_usd: int, now: float
    ) -> bool: ...

    async def usage(self, limits: tuple[Limit, ...], tag: str, now: float, day: str, month: str) -> tuple[LimitState, ...]:
        """Read-only view of the same counters (admin API)."""
        ...
