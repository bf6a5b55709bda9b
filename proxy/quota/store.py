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

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


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


@dataclass(frozen=True, slots=True)
class Admission:
    request_id: str
    tag: str
    limits: tuple[Limit, ...]
    tokens: int  # reserved tokens: prompt estimate + max output
    cost_micro_usd: int  # reserved cost
    now: float  # unix seconds
    day: str  # e.g. "2026-11-28", in the configured timezone
    month: str  # e.g. "2026-11"
    lease_seconds: float = 600.0


@dataclass(frozen=True, slots=True)
class LimitState:
    """Where one limit stands after an admission (for rate-limit headers and the admin API)."""

    limit: Limit
    used: int  # including this request's reservation when admitted
    remaining: int  # max(0, value - used)
    reset_seconds: float  # until the window frees up (sliding: until the oldest use leaves it)


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class Decision:
    admitted: bool
    reservation: Reservation | None
    states: tuple[LimitState, ...]
    denied: Limit | None = None  # the first enforced limit that refused
    retry_after_seconds: float = 0.0
    shadow_denied: tuple[Limit, ...] = ()  # enforce=False limits that would have refused


class QuotaStore(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool: ...

    async def admit(self, admission: Admission) -> Decision: ...

    async def settle(
        self, reservation: Reservation, tokens: int, cost_micro_usd: int, now: float
    ) -> bool: ...

    async def usage(self, limits: tuple[Limit, ...], tag: str, now: float, day: str, month: str) -> tuple[LimitState, ...]:
        """Read-only view of the same counters (admin API)."""
        ...
