"""What-if: replay recorded usage events against a proposed config's limits, offline.

Events are admitted in time order into a fresh in-memory store, with the same limit resolution
(`LimitBook`) and store arithmetic the proxy uses, and released when they finished (their start
plus latency), so rpm/tpm windows, daily and monthly budgets and max_concurrent all see the
traffic as it happened. A request is admitted with what it actually used (the real proxy
reserves an estimate first; a replay knows the truth). A refused request is clamped when its plan
clamps and a smaller output still fits, delayed when its plan queues and room frees within
`max_queue_seconds`, else rejected; rejected requests cost nothing.
"""
from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from pathlib import Path

from .config import Config
from .pricing import PriceTable
from .quota.limits import CLAMPABLE, LimitBook
from .quota.memory import MemoryStore
from .quota.store import MONEY_LIMITS, TOKEN_LIMITS, Admission, Decision, Reservation
from .records import Subject, TokenCounts

_MIN_CLAMPED_OUTPUT = 16  # as the proxy: below this a clamped request is not worth serving


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    event_id: str
    time: float
    latency_seconds: float
    user: str
    team: str | None
    plan: str
    key_id: str
    model: str
    tokens: TokenCounts
    cost_micro_usd: int


def read_events(path: Path) -> tuple[list[RecordedEvent], int]:
    """The ledger's events sorted by start time, and how many lines could not be read."""
    events: list[RecordedEvent] = []
    bad = 0
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                events.append(_event(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                bad += 1
    events.sort(key=lambda e: (e.time, e.event_id))
    return events, bad


def _event(d: dict[str, object]) -> RecordedEvent:
    def num(name: str) -> float:
        v = d.get(name) or 0
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise TypeError(f"{name} is not a number")
        return v

    if "time" not in d or "user" not in d:
        raise KeyError("time and user are needed")
    t = TokenCounts(*(int(num(n)) for n in ("input_tokens", "cached_input_tokens", "cache_write_tokens",
                                             "output_tokens", "reasoning_tokens")))
    team = d.get("team")
    return RecordedEvent(str(d["event_id"]), num("time"), max(0.001, num("latency_ms") / 1000), str(d["user"]),
                         None if team is None else str(team), str(d.get("plan") or ""),
                         str(d.get("key_id") or ""), str(d.get("model") or ""), t, int(num("cost_micro_usd")))


@dataclass(slots=True)
class Outcome:
    """What the proposed limits would have done to one user's or team's requests."""

    requests: int = 0
    admitted: int = 0
    clamped: int = 0
    delayed: int = 0
    rejected: int = 0
    cost_micro_usd: int = 0  # spend under the proposed limits
    recorded_cost_micro_usd: int = 0  # spend as recorded
    rejected_by: dict[str, int] = field(default_factory=dict)  # limit -> count


@dataclass(slots=True)
class ReplayResult:
    users: dict[str, Outcome] = field(default_factory=dict)
    teams: dict[str, Outcome] = field(default_factory=dict)
    events: int = 0
    unreadable: int = 0


@dataclass(frozen=True, slots=True)
class _Verdict:
    kind: str  # "admitted" | "clamped" | "delayed" | "rejected"
    cost_micro_usd: int = 0
    reservation: Reservation | None = None
    start: float = 0.0
    limit: str | None = None


class Replayer:
    def __init__(self, config: Config, prices: PriceTable, tz: tzinfo) -> None:
        self.config = config
        self.prices = prices
        self.tz = tz
        self.book = LimitBook(config)
        self.store = MemoryStore(tz=tz)
        self._ends: list[tuple[float, int, Reservation, int, int]] = []  # end, seq, res, tokens, cost
        self._seq = itertools.count()

    async def run(self, events: Iterable[RecordedEvent]) -> ReplayResult:
        result = ReplayResult()
        for ev in events:
            await self._release_until(ev.time)
            subject = self._subject(ev)
            verdict = await self._admit(ev, subject)
            if verdict.reservation is not None:
                end = verdict.start + ev.latency_seconds
                heapq.heappush(self._ends, (end, next(self._seq), verdict.reservation,
                                            verdict.reservation.tokens, verdict.cost_micro_usd))
            result.events += 1
            for book, name in ((result.users, subject.user), (result.teams, subject.team)):
                if name is not None:
                    _tally(book.setdefault(name, Outcome()), verdict, ev)
        await self._release_until(float("inf"))
        return result

    def _subject(self, ev: RecordedEvent) -> Subject:
        ucfg = self.config.users.get(ev.user)
        team = (ucfg.team if ucfg and ucfg.team else None) or ev.team
        plan = (ucfg.plan if ucfg and ucfg.plan else None) or ev.plan
        if plan not in self.config.plans:
            plan = self.config.default_plan
        return Subject(ev.user, team, plan, ev.key_id)

    async def _release_until(self, t: float) -> None:
        while self._ends and self._ends[0][0] <= t:
            end, _, res, tokens, cost = heapq.heappop(self._ends)
            await self.store.settle(res, tokens, cost, end)

    async def _admit(self, ev: RecordedEvent, subject: Subject) -> _Verdict:
        plan = self.book.plan_of(subject)
        tokens, cost = ev.tokens.total, ev.cost_micro_usd
        now = ev.time
        decision = await self.store.admit(self._admission(ev, subject, tokens, cost, now))
        if decision.admitted:
            return _Verdict("admitted", cost, decision.reservation, now)
        denied = decision.denied
        assert denied is not None
        if plan.on_limit_clamp and denied.name in CLAMPABLE and ev.tokens.output > 0:
            fit = self._affordable_output(decision, ev)
            if fit is not None and _MIN_CLAMPED_OUTPUT <= fit < ev.tokens.output:
                t = ev.tokens
                clamped = TokenCounts(t.input, t.cached_input, t.cache_write, fit, min(t.reasoning, fit))
                c_cost = self.prices.cost_micro_usd(ev.model, clamped, self._date(now))[0] if ev.model else 0
                d2 = await self.store.admit(self._admission(ev, subject, clamped.total, c_cost, now))
                if d2.admitted:
                    return _Verdict("clamped", c_cost, d2.reservation, now)
        wait = decision.retry_after_seconds
        if (plan.on_limit == "queue" and denied.name not in MONEY_LIMITS
                and 0 < wait <= plan.max_queue_seconds):
            later = now + wait
            await self._release_until(later)
            d3 = await self.store.admit(self._admission(ev, subject, tokens, cost, later))
            if d3.admitted:
                return _Verdict("delayed", cost, d3.reservation, later)
        return _Verdict("rejected", limit=denied.name.value)

    def _admission(self, ev: RecordedEvent, subject: Subject, tokens: int, cost: int, now: float) -> Admission:
        d = datetime.fromtimestamp(now, self.tz)
        # A fresh request id per try, as the proxy's retry of a refused admission is a new one.
        return Admission(f"{ev.event_id}:{next(self._seq)}", LimitBook.tag_for(subject),
                         self.book.limits_for(subject), tokens, cost, now, d.strftime("%Y-%m-%d"),
                         d.strftime("%Y-%m"), lease_seconds=ev.latency_seconds + 1)

    def _date(self, now: float) -> date:
        return datetime.fromtimestamp(now, self.tz).date()

    def _affordable_output(self, decision: Decision, ev: RecordedEvent) -> int | None:
        """Output tokens every refusing budget still takes after the prompt (as the proxy's clamp)."""
        prompt = ev.tokens.total - ev.tokens.output
        price = self.prices.lookup(ev.model, self._date(ev.time)) if ev.model else None
        best: int | None = None
        for st in decision.states:
            lim = st.limit
            if not lim.enforce:
                continue
            room = lim.value - st.used
            if lim.name in TOKEN_LIMITS:
                fit = room - prompt
            elif lim.name in MONEY_LIMITS and price is not None and price.output > 0:
                prompt_cost = -(-prompt * price.input // 1_000_000)
                fit = (room - prompt_cost) * 1_000_000 // price.output
            else:
                continue
            best = fit if best is None else min(best, fit)
        return best


def _tally(out: Outcome, verdict: _Verdict, ev: RecordedEvent) -> None:
    out.requests += 1
    out.recorded_cost_micro_usd += ev.cost_micro_usd
    out.cost_micro_usd += verdict.cost_micro_usd
    if verdict.kind == "rejected":
        out.rejected += 1
        limit = verdict.limit or "?"
        out.rejected_by[limit] = out.rejected_by.get(limit, 0) + 1
    else:
        out.admitted += 1
        if verdict.kind == "clamped":
            out.clamped += 1
        elif verdict.kind == "delayed":
            out.delayed += 1


async def replay_file(path: Path, config: Config, prices: PriceTable, tz: tzinfo) -> ReplayResult:
    events, bad = read_events(path)
    result = await Replayer(config, prices, tz).run(events)
    result.unreadable = bad
    return result


def rows(result: ReplayResult) -> Iterator[tuple[str, str, Outcome]]:
    """("user" | "team", name, outcome), users first, each sorted by name."""
    for kind, book in (("user", result.users), ("team", result.teams)):
        for name in sorted(book):
            yield kind, name, book[name]
