"""Admit and settle: a subject's limits checked and reserved in one store round trip, and what
surrounds that call: reservation sizing from recent outputs, clamping (clamp.py), queueing
(per-provider slots by plan priority) and in-stream enforcement of reservations. The store calls
themselves, with fail-open and replay, are the base class's (store_link.py).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from enum import StrEnum

from ..config import MAX_LIMIT, Config, PlanConfig
from ..errors import ProxyError, RateLimited, StoreUnavailable
from ..estimate import Estimate
from ..metrics import Metrics
from ..pricing import PriceTable, date_at
from ..providers import Adapter, Call, StreamTap
from ..records import Subject, UsageRecord
from ..tokens import Tokenizer
from .clamp import MIN_CLAMPED_OUTPUT, affordable_output, clamped, failing_limits
from .limits import OUTPUT_LIMITS, LimitBook, describe, rate_headers, refusal
from .memory import MemoryStore
from .slots import ProviderSlot
from .state import State
from .store import (
    MONEY_LIMITS,
    Admission,
    AggregateDelta,
    Decision,
    Limit,
    LimitName,
    LimitState,
    QuotaStore,
    Reservation,
    Totals,
)
from .store_link import StoreLink

log = logging.getLogger("meterproxy.quota")

_FIRST_CHECK_BYTES = 256
_MIN_CHECK_GROWTH = 1.125  # a stream's text is re-counted only after growing by at least this
_MIN_TOPUP_TOKENS = 256
_BEYOND_LIMITS = MAX_LIMIT + 1  # what an admission reserves at most (see `_reservable`)


class Watch(StrEnum):
    """What to do when a stream runs past its reservation."""

    ENFORCE = "enforce"  # reserve more; end the stream if the limits refuse
    SHADOW = "shadow"  # only count and log (the limits are enforce: false)


@dataclass(slots=True)
class Ticket:
    """One admitted request: what to settle, and what to tell the client."""

    reservation: Reservation | None
    headers: dict[str, str]
    clamp_output: int | None = None  # lower max_tokens (per choice) to this before forwarding
    reserved_output: int = 0  # output tokens reserved, all choices together
    local: bool = False  # admitted on local counters while the store was down
    slot: ProviderSlot | None = None
    subject: Subject | None = None
    tag: str = ""
    cap_per_choice: int | None = None  # the max_tokens the provider will stop at, if any
    choices: int = 1
    watch: Watch | None = None  # None: the provider stops within the reservation by itself
    # The subject's profile (not its output limits alone: holding that tuple would reach one more
    # of the subject's objects on every request, for a top-up's sake).
    profile: _Profile | None = None
    model: str = ""
    priced: bool = False
    next_check: int = _FIRST_CHECK_BYTES  # bytes of kept stream text at the next overrun check
    topup: asyncio.Task[str | None] | None = None
    topup_tokens: int = 0
    extensions: list[tuple[Reservation, bool]] = field(default_factory=list)  # (reservation, local)
    settled: bool = False

    @property
    def limits(self) -> tuple[Limit, ...]:
        """The limits counting output (what a top-up reserves on)."""
        return self.profile.output_limits if self.profile is not None else ()


@dataclass(frozen=True, slots=True)
class _Profile:
    """What admission needs to know about a subject, worked out once per subject and config."""

    plan: PlanConfig
    limits: tuple[Limit, ...]
    tag: str
    output_limits: tuple[Limit, ...]  # the limits counting output (what a top-up reserves on)
    watch: Watch | None  # how to watch a stream that may run past its reservation
    money: bool  # an enforced budget: its gauges are updated on admission


_UNLIMITED = Decision(True, None, ())


class Gate(StoreLink):
    def __init__(self, config: Config, store: QuotaStore, prices: PriceTable, metrics: Metrics,
                 tz: tzinfo) -> None:
        self.config = config
        self.store = store
        self.prices = prices
        self.metrics = metrics
        self.tz = tz
        self.book = LimitBook(config)
        self._state = State(tz)
        self._slots = {name: ProviderSlot(p.max_concurrent) for name, p in config.providers.items() if p.max_concurrent}
        # A store call waits at most this long (connect + command), so a dead store never hangs a request.
        self._timeout = config.store_timeout * 2
        self._embedded = store if type(store) is MemoryStore else None  # exactly: a subclass may wait
        self._period_cache: tuple[float, float, str, str] = (0.0, 0.0, "", "")
        self._retries: set[asyncio.Task[None]] = set()  # settle_soon's fallbacks, held until done

    def adopt(self, old: Gate) -> None:
        """Take over a previous gate's state on reload, so no usage delta or queued wake-up is lost."""
        self._state = old._state
        for name, slot in old._slots.items():
            if name in self._slots and self._slots[name].limit == slot.limit:
                self._slots[name] = slot

    # ------------------------------------------------------------ limits
    def plan_of(self, subject: Subject) -> PlanConfig:
        return self.book.plan_of(subject)

    def limits_for(self, subject: Subject) -> tuple[Limit, ...]:
        return self.book.limits_for(subject)

    def periods(self, now: float) -> tuple[str, str]:
        """(day, month) names in the configured zone; recomputed only when the day changes."""
        start, end, day, month = self._period_cache
        if start <= now < end:
            return day, month
        d = datetime.fromtimestamp(now, self.tz)
        midnight = datetime(d.year, d.month, d.day, tzinfo=self.tz)
        start, end = midnight.timestamp(), (midnight + timedelta(days=1)).timestamp()
        day, month = d.strftime("%Y-%m-%d"), d.strftime("%Y-%m")
        self._period_cache = (start, end, day, month)
        return day, month

    # ------------------------------------------------------------ admit
    def _profile(self, subject: Subject) -> _Profile:
        """The subject's profile, kept on the subject (the key ring keeps one per key and end user)."""
        if subject.memo_owner is self:
            prof: _Profile = subject.memo
            return prof
        limits = self.book.limits_for(subject)
        out = tuple(lim for lim in limits if lim.name in OUTPUT_LIMITS)
        watch = Watch.ENFORCE if any(lim.enforce for lim in out) else Watch.SHADOW if out else None
        money = any(lim.name in MONEY_LIMITS and lim.enforce for lim in limits)
        prof = _Profile(self.book.plan_of(subject), limits, self.book.tag_for(subject), out, watch, money)
        subject.memo_owner, subject.memo = self, prof
        return prof

    def admit_now(self, subject: Subject, adapter: Adapter, est: Estimate, request_id: str) -> Ticket | None:
        """`admit` without a coroutine for the usual case: the embedded store, no provider slot,
        admitted at once. None: anything else (a refusal too), for `admit`."""
        store = self._embedded
        if store is None or adapter.name in self._slots:
            return None
        prof = self._profile(subject)
        if not prof.limits:
            return self._ticket(subject, _UNLIMITED, False, None, prof, est, est.max_output_tokens, None)
        out = self._sized_output(subject.user, est)
        decision = store.admit_now(self._admission(request_id, subject, prof, est, out))
        if not decision.admitted:
            return None  # nothing was reserved: `admit` asks again and refuses, clamps or queues
        if decision.shadow_denied:
            self._count_shadow(subject, decision.shadow_denied, request_id)
        return self._ticket(subject, decision, False, None, prof, est, out, None)

    async def admit(self, subject: Subject, adapter: Adapter, call: Call, est: Estimate, request_id: str) -> Ticket:
        """Admit or refuse (RateLimited/QuotaExhausted 429, StoreUnavailable 503), queueing first
        when the plan says `on_limit: queue`."""
        prof = self._profile(subject)
        plan, limits, tag = prof.plan, prof.limits, prof.tag
        slot = self._slots.get(adapter.name)
        if not limits and slot is None:  # nothing to check or reserve: no store round trip
            return self._ticket(subject, _UNLIMITED, False, None, prof, est, est.max_output_tokens, None)
        deadline = time.monotonic() + (plan.max_queue_seconds if plan.on_limit == "queue" else 0.0)
        held = False
        out = self._sized_output(subject.user, est)
        clamp: int | None = None
        while True:
            if slot is not None and not held:
                if not await slot.acquire(plan.priority, deadline - time.monotonic()):
                    self.metrics.rejected(subject.user, subject.team, "provider_max_concurrent")
                    raise RateLimited(f"Rate limit reached: the max_concurrent limit of {slot.limit} for provider "
                                      f"{adapter.name} is reached. Try again shortly.", headers={"retry-after": "1"})
                held = True
            # Taken before asking, so a settle during the ask still wakes us (the embedded store
            # answers without suspending: nothing can settle meanwhile, so it is taken only to
            # wait); only by a plan that may queue.
            room = self._state.room() if self._embedded is None and plan.on_limit == "queue" else None
            adm = self._admission(request_id, subject, prof, est, out)
            try:
                decision, local = await self._store_admit(adm)
            except BaseException:
                if held and slot is not None:
                    slot.release()
                raise
            if decision.admitted:
                if decision.shadow_denied:
                    self._count_shadow(subject, decision.shadow_denied, request_id)
                return self._ticket(subject, decision, local, slot if held else None, prof, est, out, clamp)
            fit = clamped(plan, decision, adm, est, out, self.prices, self.tz)
            if fit is not None:
                clamp, out = fit  # keep the provider slot: the retry is immediate
                continue
            if held and slot is not None:
                slot.release()  # never sit on a provider slot while waiting for the subject's own room
                held = False
            wait = self._queue_wait(decision, adm, tag, deadline)
            if wait is None:
                denied = decision.denied
                assert denied is not None
                self._count_shadow(subject, decision.shadow_denied, request_id)
                self.metrics.rejected(subject.user, subject.team, denied.name.value)
                raise refusal(denied, decision)
            if room is None:
                room = self._state.room()
            await asyncio.wait({room}, timeout=wait)  # a local settle, or when the window frees room

    def _admission(self, request_id: str, subject: Subject, prof: _Profile, est: Estimate, out: int) -> Admission:
        now = time.time()
        day, month = self.periods(now)
        cost = est.cost_micro_usd
        if out != est.max_output_tokens:
            cost = self.prices.cost_for_estimate(est.model, est.prompt_tokens, out, self._date(now)) if est.priced else 0
        return Admission(request_id, prof.tag, prof.limits, _reservable(est.prompt_tokens + out), _reservable(cost),
                         now, day, month, slot=subject)

    def _sized_output(self, user: str, est: Estimate) -> int:
        """Output to reserve: min(max_tokens, p95 of this user's recent outputs on this model)."""
        if est.max_output_tokens <= 0:
            return 0
        p = self._state.history.percentile(user, est.model)
        per_choice = est.max_output_tokens // max(1, est.choices)
        if p is None or p >= per_choice:
            return est.max_output_tokens
        return max(1, p) * est.choices

    def _ticket(self, subject: Subject, decision: Decision, local: bool, slot: ProviderSlot | None, prof: _Profile,
                est: Estimate, out: int, clamp: int | None) -> Ticket:
        st = self._state
        tag = prof.tag
        st.inflight[tag] = st.inflight.get(tag, 0) + 1
        if prof.money:
            self._budget_gauges(decision.states)
        cap = clamp if clamp is not None else est.client_max_tokens
        # The provider may write past the reservation: watch the stream when output is limited.
        watch = prof.watch if out > 0 and (cap is None or cap * est.choices > out) else None
        threshold = out * (1 + self.config.stream_overrun_slack)
        return Ticket(decision.reservation, rate_headers(decision.states), clamp, out, local, slot, subject, tag,
                      cap, max(1, est.choices), watch, prof, est.model, est.priced,
                      max(_FIRST_CHECK_BYTES, math.ceil(threshold)))

    def _queue_wait(self, decision: Decision, adm: Admission, tag: str, deadline: float) -> float | None:
        """How long a queued request should wait before asking again; None: refuse now."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if decision.retry_after_seconds <= left:
            return max(0.01, decision.retry_after_seconds)
        # A settle here may refund a reservation or free a lease sooner (not a request count).
        failing = failing_limits(decision, adm)
        if self._state.inflight.get(tag) and all(lim.name is not LimitName.RPM for lim in failing):
            return left
        return None

    def _count_shadow(self, subject: Subject, limits: tuple[Limit, ...], request_id: str) -> None:
        for lim in limits:
            self.metrics.rejected(subject.user, subject.team, lim.name.value, shadow=True)
            log.info("shadow limit: %s would have refused request %s (enforce: false)", describe(lim), request_id)

    def _budget_gauges(self, states: tuple[LimitState, ...]) -> None:
        for st in states:
            if st.limit.name in MONEY_LIMITS and st.limit.enforce:
                period = "day" if st.limit.name == LimitName.USD_PER_DAY else "month"
                self.metrics.budget_remaining.labels(st.limit.scope, period).set(st.remaining / 1_000_000)
                self.metrics.budget_limit.labels(st.limit.scope, period).set(st.limit.value / 1_000_000)

    def _date(self, now: float) -> date:
        return date_at(self.tz, now)

    # ------------------------------------------------------------ settle
    async def settle(self, ticket: Ticket | None, rec: UsageRecord) -> None:
        """Replace the reservation with what `rec` says was used and add `rec` to the usage
        aggregates, in one store round trip. Refused requests (no ticket) are recorded too."""
        if ticket is None:
            await self._record(None, False, self._usage(rec, None))
            return
        if ticket.settled:
            return
        self._settling(ticket)
        try:
            if ticket.topup is not None:  # a top-up still on its way: settle what it reserved too
                await asyncio.wait({ticket.topup})
                if not ticket.topup.cancelled() and ticket.topup.exception() is not None:
                    log.error("stream top-up failed", exc_info=ticket.topup.exception())
            self._learn(ticket, rec)
            await self._record(ticket.reservation, ticket.local, self._usage(rec, ticket))
            for ext, local in ticket.extensions:  # top-ups give back all they held: the main one got the actual
                await self._give_back(ext, local)
        finally:
            self._settled(ticket)

    def settle_now(self, ticket: Ticket | None, rec: UsageRecord) -> bool:
        """`settle` without suspending where nothing in it can wait (the embedded store, no top-up
        under way or held); False, having done nothing, otherwise: then `settle` it."""
        store = self._embedded
        if store is None:
            return False
        if ticket is None:
            store.settle_and_record_now(None, self._usage(rec, None), time.time())
            return True
        if ticket.settled:
            return True
        if not _one_store_call(ticket):
            return False
        self._settling(ticket)
        try:
            self._learn(ticket, rec)
            store.settle_and_record_now(ticket.reservation, self._usage(rec, ticket), time.time())
        finally:
            self._settled(ticket)
        return True

    def settle_soon(self, ticket: Ticket | None, rec: UsageRecord) -> asyncio.Future[None] | None:
        """`settle` as one store command sent now and a callback on its reply, no coroutine or
        task, where the store can send at once (the lean Redis connection) and nothing else has
        to wait (no top-up, the store not down). The future is done once settled; if the command
        fails, `settle`'s own path takes over (retry, store health, replay). None, having done
        nothing: `settle` it."""
        if self._state.down or (ticket is not None and (ticket.settled or not _one_store_call(ticket))):
            return None
        usage = self._usage(rec, ticket)
        res = ticket.reservation if ticket is not None else None
        sent = self.store.settle_and_record_soon(res, usage, time.time())
        if sent is None:
            return None
        if ticket is not None:
            self._settling(ticket)
            self._learn(ticket, rec)
        done: asyncio.Future[None] = sent.get_loop().create_future()
        sent.add_done_callback(functools.partial(self._sent, ticket, res, usage, done))
        return done

    def _sent(self, ticket: Ticket | None, res: Reservation | None, usage: AggregateDelta,
              done: asyncio.Future[None], sent: asyncio.Future[bool]) -> None:
        if not sent.cancelled() and sent.exception() is None:
            self._after_send(ticket, done, None)
            return
        # The one attempt failed: the general path again, which retries, notes the store's health
        # and keeps the delta for replay (record.lua applies an event once, however often sent).
        retry = sent.get_loop().create_task(self._record(res, False, usage))
        self._retries.add(retry)
        retry.add_done_callback(functools.partial(self._after_send, ticket, done))

    def _after_send(self, ticket: Ticket | None, done: asyncio.Future[None], retry: asyncio.Task[None] | None) -> None:
        if ticket is not None:
            self._settled(ticket)
        if retry is None:
            done.set_result(None)
            return
        self._retries.discard(retry)
        exc = None if retry.cancelled() else retry.exception()
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(None)

    def _settling(self, ticket: Ticket) -> None:
        ticket.settled = True
        if ticket.slot is not None:
            ticket.slot.release()
            ticket.slot = None

    def _settled(self, ticket: Ticket) -> None:
        st = self._state
        n = st.inflight.get(ticket.tag, 0) - 1
        if n > 0:
            st.inflight[ticket.tag] = n
        else:
            st.inflight.pop(ticket.tag, None)
        st.wake()

    def _usage(self, rec: UsageRecord, ticket: Ticket | None) -> AggregateDelta:
        res = ticket.reservation if ticket is not None else None
        tag = ticket.tag if ticket is not None else self.book.tag_of_record(rec.user, rec.team, rec.key_id)
        day = res.day if res is not None else self.periods(rec.time)[0]
        t = rec.tokens
        totals = Totals(1, t.input, t.output, t.cached_input, t.cache_write, t.reasoning, rec.cost_micro_usd)
        return AggregateDelta(rec.event_id, tag, day, rec.user, rec.team, rec.model, totals)

    def _learn(self, ticket: Ticket, rec: UsageRecord) -> None:
        if ticket.reserved_output <= 0 or rec.status >= 400 or rec.cut_short or ticket.subject is None:
            return
        per_choice = rec.tokens.output // ticket.choices
        if ticket.cap_per_choice is not None and per_choice >= ticket.cap_per_choice:
            return  # stopped by max_tokens: the length it wanted is unknown
        self._state.history.add(ticket.subject.user, ticket.model, per_choice)

    # ------------------------------------------------------------ in-stream enforcement
    def overrun(self, ticket: Ticket, tap: StreamTap, tokenizer: Tokenizer, model: str) -> ProxyError | None:
        """Called after each relayed chunk; returns the error that ends a stream whose output ran
        past its reservation by more than `stream_overrun_slack` and could not reserve more.

        Cheap per chunk: the text is re-counted only at byte thresholds (growing geometrically and
        aimed at where the reservation would run out), and a top-up is one background store call.
        """
        if ticket.watch is None:
            return None
        if ticket.topup is not None:
            if not ticket.topup.done():
                return None
            return self._topup_done(ticket, tap)
        if tap.kept_bytes < ticket.next_check:
            return None
        # The provider's final count when it has come (the kept text is then dropped), else ours.
        final = tap.usage if tap.output_final else None
        count = final.tokens.output if final is not None else tokenizer.count_text(model, tap.output_text())
        allowed = ticket.reserved_output * (1 + self.config.stream_overrun_slack)
        kept = tap.kept_bytes
        if count <= allowed:
            aim = int(kept * allowed / count) + 1 if count else kept * 2
            ticket.next_check = min(kept * 2, max(int(kept * _MIN_CHECK_GROWTH) + 1, aim))
            return None
        sub = ticket.subject
        if ticket.watch is Watch.SHADOW:
            ticket.watch = None
            if sub is not None:
                self.metrics.rejected(sub.user, sub.team, "stream_overrun", shadow=True)
            log.info("shadow limit: a stream passed its %d reserved output tokens (enforce: false)",
                     ticket.reserved_output)
            return None
        ticket.topup_tokens = max(ticket.reserved_output, _MIN_TOPUP_TOKENS)
        ticket.topup = asyncio.get_running_loop().create_task(self._extend(ticket, ticket.topup_tokens))
        return None

    def _topup_done(self, ticket: Ticket, tap: StreamTap) -> ProxyError | None:
        task, ticket.topup = ticket.topup, None
        assert task is not None
        refused = None if task.cancelled() or task.exception() is not None else task.result()
        if refused is None:
            ticket.reserved_output += ticket.topup_tokens
            ticket.next_check = tap.kept_bytes + 1
            return None
        ticket.watch = None
        sub = ticket.subject
        if sub is not None:
            self.metrics.rejected(sub.user, sub.team, "stream_overrun")
        return RateLimited(f"meterproxy ended this stream: its output passed the {ticket.reserved_output} output "
                           f"tokens reserved for it and {refused}. Set max_tokens to keep within your quota.")

    async def _extend(self, ticket: Ticket, tokens: int) -> str | None:
        """Reserve `tokens` more output for a running stream: None if granted, else why not."""
        res = ticket.reservation
        if res is None or not ticket.limits:
            return None
        decision = await self._extension(ticket, tokens)
        if decision is None:
            return "the quota store is unreachable (on_store_failure: closed)"
        if not decision.admitted:  # not all of it: then what still fits, so the stream ends at the limit
            price = self.prices.lookup(ticket.model, self._date(time.time())) if ticket.priced else None
            fit = affordable_output(decision.states, price, 0, OUTPUT_LIMITS)
            if fit is not None and MIN_CLAMPED_OUTPUT <= fit < tokens:
                again = await self._extension(ticket, fit)
                if again is not None and again.admitted:
                    ticket.topup_tokens = fit
                    return None
        if decision.admitted:
            return None
        assert decision.denied is not None
        return f"{describe(decision.denied)} has no room for more"

    async def _extension(self, ticket: Ticket, tokens: int) -> Decision | None:
        """One top-up admission on the output-counting limits only (no request, no lease)."""
        res = ticket.reservation
        assert res is not None
        now = time.time()
        day, month = self.periods(now)
        cost = self.prices.cost_for_estimate(ticket.model, 0, tokens, self._date(now)) if ticket.priced else 0
        adm = Admission(f"{res.request_id}+{len(ticket.extensions) + 1}", res.tag, ticket.limits,
                        _reservable(tokens), _reservable(cost),
                        now, day, month)
        if ticket.local:
            decision, local = await self._state.local.admit(adm), True
        else:
            try:
                decision, local = await self._store_admit(adm)
            except StoreUnavailable:
                return None
        if decision.reservation is not None:
            ticket.extensions.append((decision.reservation, local))
        return decision


def _reservable(amount: int) -> int:
    """What an admission may reserve of `amount`: at most one more than any limit (config.MAX_LIMIT),
    so an enforced limit refuses as it would have, and no counter overflows."""
    return amount if amount <= _BEYOND_LIMITS else _BEYOND_LIMITS


def _one_store_call(ticket: Ticket) -> bool:
    """Whether settling `ticket` is its one store call and nothing else: no local admission to
    replay, no top-up under way or held (what `settle_now` and `settle_soon` can do at once)."""
    return not (ticket.local or ticket.topup is not None or ticket.extensions)
