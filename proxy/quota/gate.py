"""Admit and settle: a subject's applicable limits, checked and reserved in one store round trip.

Also owns what surrounds the store call: clamping max_tokens to what a budget still affords,
queueing by plan priority, rate-limit headers, fail-open with local counters and a replay of
every usage delta to the store once it is back, and in-stream enforcement of reservations.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from decimal import Decimal

from ..auth import key_id_of, sha256_hex
from ..config import Config, KeyConfig, PlanConfig
from ..errors import ProxyError, QuotaExhausted, RateLimited, StoreError, StoreUnavailable
from ..estimate import Estimate
from ..metrics import Metrics
from ..pricing import PriceTable
from ..providers import Adapter, Call, StreamTap
from ..records import Subject, UsageRecord
from .memory import MemoryStore
from .store import (
    MONEY_LIMITS,
    TOKEN_LIMITS,
    Admission,
    Decision,
    Limit,
    LimitName,
    LimitState,
    QuotaStore,
    Reservation,
)

log = logging.getLogger("meterproxy.quota")

_MIN_CLAMPED_OUTPUT = 16  # below this a clamped request is not worth serving
_RETRY_BACKOFF = (0.5, 1, 2, 4, 8, 15)


def go_duration(seconds: float) -> str:
    """OpenAI's reset format: `12ms`, `1s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = int(math.ceil(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


@dataclass(slots=True)
class Ticket:
    """One admitted request: what to settle, and what to tell the client."""

    reservation: Reservation | None
    headers: dict[str, str]
    clamp_output: int | None = None  # lower max_tokens to this before forwarding
    reserved_output: int = 0
    output_capped: bool = True  # the provider stops at the reserved output by itself
    local: bool = False  # admitted on local counters while the store was down
    slot: _Slot | None = None
    next_check: int = 4096  # bytes of kept stream text at the next overrun check


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    future: asyncio.Future[None] = field(compare=False)


class _Slot:
    """A per-provider concurrency slot, handed to waiters by plan priority, FIFO within one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()

    async def acquire(self, priority: int, timeout: float) -> bool:
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return True
        if timeout <= 0:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        w = _Waiter(-priority, next(self._seq), fut)
        heapq.heappush(self._waiters, w)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except TimeoutError:
            if fut.done():  # handed over just as we gave up: pass it on
                self.release()
            else:
                fut.cancel()
            return False

    def release(self) -> None:
        while self._waiters:
            w = heapq.heappop(self._waiters)
            if not w.future.done():
                w.future.set_result(None)  # the slot moves to the waiter; `used` is unchanged
                return
        self.used = max(0, self.used - 1)


@dataclass(frozen=True, slots=True)
class _Replay:
    """Usage the store has not seen: a local admission to add, or a store reservation to settle."""

    tokens: int
    cost_micro_usd: int
    admission: Admission | None = None
    reservation: Reservation | None = None


class Gate:
    def __init__(self, config: Config, store: QuotaStore, prices: PriceTable, metrics: Metrics,
                 tz: tzinfo) -> None:
        self.config = config
        self.store = store
        self.prices = prices
        self.metrics = metrics
        self.tz = tz
        self._local = MemoryStore(tz=tz)  # fail-open counters while the store is down
        self._store_down_until = 0.0
        self._failures = 0
        self._replay: deque[_Replay] = deque(maxlen=1_000_000)
        self._settled = asyncio.Event()
        self._slots = {name: _Slot(p.max_concurrent) for name, p in config.providers.items() if p.max_concurrent}
        self._limits_cache: dict[tuple[str, str | None, str, str], tuple[Limit, ...]] = {}
        self._key_limits: dict[str, KeyConfig] = {
            key_id_of(k.key_sha256 or sha256_hex(k.key or "")): k for k in config.keys if k.values()}

    def adopt(self, old: Gate) -> None:
        """Take over a previous gate's fail-open state on reload, so no usage delta is lost."""
        self._local = old._local
        self._replay = old._replay
        self._store_down_until = old._store_down_until
        self._failures = old._failures
        for name, slot in old._slots.items():
            if name in self._slots and self._slots[name].limit == slot.limit:
                self._slots[name] = slot

    # ------------------------------------------------------------ limits
    def plan_of(self, subject: Subject) -> PlanConfig:
        return self.config.plans.get(subject.plan) or self.config.plans[self.config.default_plan]

    def limits_for(self, subject: Subject) -> tuple[Limit, ...]:
        """Every limit that applies: the user's (plan and own, tightest wins), the team's, the key's."""
        ck = (subject.user, subject.team, subject.plan, subject.key_id)
        hit = self._limits_cache.get(ck)
        if hit is not None:
            return hit
        plan = self.plan_of(subject)
        user_cfg = self.config.users.get(subject.user)
        out: list[Limit] = []
        user_vals = plan.values()
        for name, v in (user_cfg.values() if user_cfg else {}).items():
            user_vals[name] = min(v, user_vals.get(name, v))
        enforce = plan.enforce and (user_cfg.enforce if user_cfg else True)
        out += [Limit(f"user:{subject.user}", LimitName(n), v, enforce) for n, v in user_vals.items()]
        team_cfg = self.config.teams.get(subject.team) if subject.team else None
        if team_cfg is not None:
            out += [Limit(f"team:{subject.team}", LimitName(n), v, team_cfg.enforce) for n, v in team_cfg.values().items()]
        key_cfg = self._key_limits.get(subject.key_id)
        if key_cfg is not None:
            out += [Limit(f"key:{subject.key_id}", LimitName(n), v, key_cfg.enforce) for n, v in key_cfg.values().items()]
        result = tuple(out)
        if len(self._limits_cache) < 200_000:
            self._limits_cache[ck] = result
        return result

    def periods(self, now: float) -> tuple[str, str]:
        d = datetime.fromtimestamp(now, self.tz)
        return d.strftime("%Y-%m-%d"), d.strftime("%Y-%m")

    # ------------------------------------------------------------ admit
    async def admit(self, subject: Subject, adapter: Adapter, call: Call, est: Estimate, request_id: str) -> Ticket:
        plan = self.plan_of(subject)
        limits = self.limits_for(subject)
        queue_for = plan.max_queue_seconds if plan.on_limit == "queue" else 0.0
        deadline = time.monotonic() + queue_for
        slot = self._slots.get(adapter.name)
        if slot is not None and not await slot.acquire(plan.priority, queue_for):
            self.metrics.rejected(subject.user, subject.team, "max_concurrent")
            raise RateLimited(f"Provider {adapter.name!r} is at its max_concurrent limit; try again shortly.",
                              headers={"retry-after": "1"})
        try:
            ticket = await self._admit_limits(subject, plan, limits, call, est, request_id, deadline)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        ticket.slot = slot
        return ticket

    async def _admit_limits(self, subject: Subject, plan: PlanConfig, limits: tuple[Limit, ...], call: Call,
                            est: Estimate, request_id: str, deadline: float) -> Ticket:
        tag = f"t:{subject.team}" if subject.team else f"u:{subject.user}"
        out_tokens, cost, clamp = est.max_output_tokens, est.cost_micro_usd, None
        while True:
            now = time.time()
            day, month = self.periods(now)
            adm = Admission(request_id, tag, limits, est.prompt_tokens + out_tokens, cost, now, day, month)
            decision, local = await self._store_admit(adm)
            for lim in decision.shadow_denied:
                self.metrics.rejected(subject.user, subject.team, lim.name.value, shadow=True)
                log.info("shadow limit %s %s would have refused request %s", lim.scope, lim.name.value, request_id)
            if decision.admitted:
                self._budget_gauges(decision.states)
                capped = est.client_max_tokens is not None or clamp is not None
                return Ticket(decision.reservation, self._headers(decision.states), clamp, out_tokens, capped, local)
            denied = decision.denied
            assert denied is not None
            if (clamp is None and plan.on_limit_clamp and denied.name in (MONEY_LIMITS | TOKEN_LIMITS)
                    and est.max_output_tokens > 0):
                fit = self._affordable_output(decision, limits, est)
                if fit is not None and fit >= _MIN_CLAMPED_OUTPUT and fit < est.max_output_tokens:
                    per_choice = fit // max(1, est.choices)
                    clamp, out_tokens = per_choice, per_choice * est.choices
                    cost = self.prices.cost_for_estimate(est.model, est.prompt_tokens, out_tokens, _date(now, self.tz)) if est.priced else 0
                    continue
            wait = decision.retry_after_seconds
            left = deadline - time.monotonic()
            if denied.name not in MONEY_LIMITS and 0 < wait <= left:
                await self._wait_for_room(min(wait, left))
                continue
            self.metrics.rejected(subject.user, subject.team, denied.name.value)
            raise self._refusal(denied, decision)

    async def _wait_for_room(self, seconds: float) -> None:
        """Sleep until room may have freed: the window's reset, or a local settle, whichever first."""
        self._settled.clear()
        try:
            await asyncio.wait_for(self._settled.wait(), seconds)
        except TimeoutError:
            pass

    def _affordable_output(self, decision: Decision, limits: tuple[Limit, ...], est: Estimate) -> int | None:
        """Output tokens every budget can still take after the prompt, or None if unknown."""
        best: int | None = None
        day = _date(time.time(), self.tz)
        price = self.prices.lookup(est.model, day) if est.priced else None
        for st in decision.states:
            lim = st.limit
            if not lim.enforce:
                continue
            room = lim.value - (st.used if not decision.admitted else st.used)
            if lim.name in TOKEN_LIMITS:
                fit = room - est.prompt_tokens
            elif lim.name in MONEY_LIMITS and price is not None and price.output > 0:
                prompt_cost = -(-est.prompt_tokens * price.input // 1_000_000)
                fit = (room - prompt_cost) * 1_000_000 // price.output
            else:
                continue
            best = fit if best is None else min(best, fit)
        return best

    def _refusal(self, denied: Limit, decision: Decision) -> ProxyError:
        retry = max(1, math.ceil(decision.retry_after_seconds))
        headers = {**self._headers(decision.states), "retry-after": str(retry)}
        what = f"{denied.name.value} limit of {_fmt_limit(denied)} for {denied.scope}"
        if denied.name in MONEY_LIMITS:
            headers["x-should-retry"] = "false"
            return QuotaExhausted(f"Budget exhausted: the {what} is used up. It resets in {go_duration(retry)}.",
                                  headers=headers)
        return RateLimited(f"Rate limit reached: the {what} is reached. Try again in {go_duration(retry)}.",
                           headers=headers)

    def _headers(self, states: tuple[LimitState, ...]) -> dict[str, str]:
        out: dict[str, str] = {}
        req = _tightest(states, (LimitName.RPM,))
        tok = _tightest(states, (LimitName.TPM,))
        money = _tightest(states, (LimitName.USD_PER_DAY, LimitName.USD_PER_MONTH))
        if req is not None:
            out["x-ratelimit-limit-requests"] = str(req.limit.value)
            out["x-ratelimit-remaining-requests"] = str(req.remaining)
            out["x-ratelimit-reset-requests"] = go_duration(req.reset_seconds)
        if tok is not None:
            out["x-ratelimit-limit-tokens"] = str(tok.limit.value)
            out["x-ratelimit-remaining-tokens"] = str(tok.remaining)
            out["x-ratelimit-reset-tokens"] = go_duration(tok.reset_seconds)
        if money is not None:
            out["x-budget-remaining-usd"] = str(Decimal(money.remaining) / 1_000_000)
        return out

    def _budget_gauges(self, states: tuple[LimitState, ...]) -> None:
        for st in states:
            if st.limit.name in MONEY_LIMITS:
                period = "day" if st.limit.name == LimitName.USD_PER_DAY else "month"
                self.metrics.budget_remaining.labels(st.limit.scope, period).set(st.remaining / 1_000_000)
                self.metrics.budget_limit.labels(st.limit.scope, period).set(st.limit.value / 1_000_000)

    # ------------------------------------------------------------ store, fail-open
    async def _store_admit(self, adm: Admission) -> tuple[Decision, bool]:
        if time.monotonic() >= self._store_down_until:
            try:
                decision = await asyncio.wait_for(self.store.admit(adm), self.config.store_timeout * 2)
                self._store_ok()
                return decision, False
            except (StoreError, TimeoutError) as e:
                self._store_failed("admit", e)
        if self.config.on_store_failure == "closed":
            raise StoreUnavailable("The quota store is unreachable and on_store_failure is closed; try again shortly.",
                                   headers={"retry-after": "1"})
        self.metrics.store_fallback.inc()
        return await self._local.admit(adm), True

    def _store_ok(self) -> None:
        if self._failures:
            log.warning("quota store is back; replaying %d usage deltas", len(self._replay))
        self._failures = 0

    def _store_failed(self, op: str, e: BaseException) -> None:
        self.metrics.store_errors.labels(op).inc()
        backoff = _RETRY_BACKOFF[min(self._failures, len(_RETRY_BACKOFF) - 1)]
        self._failures += 1
        self._store_down_until = time.monotonic() + backoff
        log.warning("quota store %s failed (%s); %s for %.1fs", op, e or type(e).__name__,
                    "serving on local counters" if self.config.on_store_failure == "open" else "refusing", backoff)

    # ------------------------------------------------------------ settle
    async def settle(self, ticket: Ticket | None, rec: UsageRecord) -> None:
        """Replace the reservation with what `rec` says was used (rejected requests: no ticket)."""
        if ticket is None:
            return
        if ticket.slot is not None:
            ticket.slot.release()
            ticket.slot = None
        res = ticket.reservation
        self._settled.set()
        if res is None:
            return
        total, cost_micro_usd = rec.tokens.total, rec.cost_micro_usd
        now = time.time()
        if ticket.local:
            await self._local.settle(res, total, cost_micro_usd, now)
            self._replay.append(_Replay(total, cost_micro_usd, admission=_replay_admission(res)))
            return
        try:
            await asyncio.wait_for(self.store.settle(res, total, cost_micro_usd, now), self.config.store_timeout * 2)
        except (StoreError, TimeoutError) as e:
            self._store_failed("settle", e)
            # The reservation stays counted in the store until its record expires; settle it later.
            self._replay.append(_Replay(total, cost_micro_usd, reservation=res))

    async def replay_pending(self) -> int:
        """Apply usage kept while the store was down. Each delta is applied once (removed on success)."""
        done = 0
        while self._replay and time.monotonic() >= self._store_down_until:
            item = self._replay[0]
            try:
                if item.admission is not None:  # a local admission: add its usage to the store's counters
                    d = await self.store.admit(item.admission)
                    if d.reservation is not None:
                        await self.store.settle(d.reservation, item.tokens, item.cost_micro_usd, item.admission.now)
                elif item.reservation is not None:  # a store admission whose settle failed
                    await self.store.settle(item.reservation, item.tokens, item.cost_micro_usd, time.time())
            except (StoreError, TimeoutError) as e:
                self._store_failed("replay", e)
                break
            self._replay.popleft()
            done += 1
        return done

    @property
    def pending_replays(self) -> int:
        return len(self._replay)

    # ------------------------------------------------------------ in-stream enforcement
    def overrun(self, ticket: Ticket, tap: StreamTap, tokenizer: object, model: str) -> ProxyError | None:
        """End a stream whose output passed its reservation by more than the slack.

        Checked when the kept text doubles in size, never per chunk; only for streams the provider
        itself would not stop (no max_tokens given).
        """
        if ticket.output_capped or tap.kept_bytes < ticket.next_check:
            return None
        ticket.next_check = tap.kept_bytes * 2
        count = tokenizer.count_text(model, tap.output_text())  # type: ignore[attr-defined]
        if count > ticket.reserved_output * (1 + self.config.stream_overrun_slack):
            return RateLimited(f"The stream passed its reserved {ticket.reserved_output} output tokens and was ended.")
        return None


def _replay_admission(res: Reservation) -> Admission:
    # Replayed usage never refuses: every limit becomes a shadow one, and no concurrency lease.
    limits = tuple(
        Limit(lim.scope, lim.name, lim.value, False) for lim in res.limits if lim.name != LimitName.MAX_CONCURRENT)
    return Admission("replay-" + res.request_id, res.tag, limits, res.tokens, res.cost_micro_usd,
                     res.time, res.day, res.month)


def _tightest(states: tuple[LimitState, ...], names: tuple[LimitName, ...]) -> LimitState | None:
    best = None
    for st in states:
        if st.limit.name in names and st.limit.enforce and (best is None or st.remaining < best.remaining):
            best = st
    return best


def _fmt_limit(lim: Limit) -> str:
    if lim.name in MONEY_LIMITS:
        return f"${Decimal(lim.value) / 1_000_000}"
    return str(lim.value)


def _date(now: float, tz: tzinfo) -> date:
    return datetime.fromtimestamp(now, tz).date()
