"""Prometheus metrics: defined once, on a registry the app hands in; names are DESIGN.md's contract.

User and team label values are capped (beyond the cap: `other`); keys are never labels. Label
children are cached per (provider, model, user, team) so the hot path does no label lookups.

Per-request observations (and the in-flight level) are added to plain numbers on the hot path
(prometheus-client takes a lock per update and walks histogram buckets in Python) and folded into
the Prometheus children by `flush()`: at every collection of the registry (a scrape) and, for multi-process workers whose
values another process reads, every FLUSH_SECONDS.
"""
from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from .records import UsageRecord

DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)
OTHER = "other"
NO_TEAM = "none"
TOKEN_TYPES = ("input", "cached_input", "cache_write", "output", "reasoning")
SOURCES = ("provider", "tokenizer", "estimate")
FLUSH_SECONDS = 0.25  # how stale a worker's metrics may be for the process serving the scrape


class LabelCap:
    """Admits the first `limit` distinct values; every later one is reported as `other`."""

    __slots__ = ("limit", "_seen")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return OTHER


class _Pending:
    """A histogram's observations not folded into its Prometheus child yet."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = (*bounds, float("inf"))
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with value <= bound
        self.total += value

    def fold(self, child: Histogram) -> None:
        # prometheus-client keeps per-bucket (not cumulative) values and cumulates when collected.
        buckets = child._buckets  # type: ignore[attr-defined]
        for i, n in enumerate(self.counts):
            if n:
                buckets[i].inc(n)
                self.counts[i] = 0
        if self.total:
            child._sum.inc(self.total)  # type: ignore[attr-defined]
            self.total = 0.0


@dataclass(slots=True)
class _Children:
    """Prebuilt label children for one (provider, model, user, team), and what is not folded in yet."""

    labels: tuple[str, str, str, str]
    tokens: tuple[Counter, ...]
    cost: Counter
    duration: Histogram
    ttft: Histogram
    overhead: Histogram
    requests: dict[int, Counter] = field(default_factory=dict)  # by status code, filled as codes appear
    n_requests: dict[int, int] = field(default_factory=dict)
    n_tokens: list[int] = field(default_factory=lambda: [0] * len(TOKEN_TYPES))
    n_cost_micro_usd: int = 0
    p_duration: _Pending = field(default_factory=lambda: _Pending(DURATION_BUCKETS))
    p_ttft: _Pending = field(default_factory=lambda: _Pending(TTFT_BUCKETS))
    p_overhead: _Pending = field(default_factory=lambda: _Pending(OVERHEAD_BUCKETS))
    dirty: bool = False


class _FlushFirst:
    """Registered before every metric, so a collection of the registry sees flushed values. Only
    on the thread that observes: a scrape rendered in a worker thread flushes on the loop first."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.thread = threading.get_ident()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if threading.get_ident() == self.thread:
            self.metrics.flush()
        return iter(())


class Metrics:
    def __init__(self, registry: CollectorRegistry, max_user_labels: int = 1000, max_team_labels: int = 1000,
                 multiprocess: bool = False) -> None:
        self.registry = registry
        self.users = LabelCap(max_user_labels)
        self.teams = LabelCap(max_team_labels)
        gauge_mode = {"multiprocess_mode": "livesum"} if multiprocess else {}
        r = registry
        self._dirty: list[_Children] = []
        self._n_sources = [0] * len(SOURCES)
        self._n_unpriced: dict[str, int] = {}
        registry.register(_FlushFirst(self))  # type: ignore[arg-type]
        self.requests = Counter("meterproxy_requests", "Requests by outcome.",
                                ["provider", "model", "user", "team", "code"], registry=r)
        self.tokens = Counter("meterproxy_tokens", "Tokens metered, by normalized type.",
                              ["provider", "model", "user", "team", "type"], registry=r)
        self.cost = Counter("meterproxy_cost_usd", "Spend in US dollars.",
                            ["provider", "model", "user", "team"], registry=r)
        self.rejections = Counter("meterproxy_limit_rejections", "Requests refused by a limit.",
                                  ["user", "team", "limit"], registry=r)
        self.shadow_rejections = Counter("meterproxy_shadow_rejections",
                                         "Requests a shadow (enforce: false) limit would have refused.",
                                         ["user", "team", "limit"], registry=r)
        self.duration = Histogram("meterproxy_request_duration_seconds", "Whole request latency.",
                                  ["provider", "model"], buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("meterproxy_time_to_first_token_seconds", "Time to the first streamed byte.",
                              ["provider", "model"], buckets=TTFT_BUCKETS, registry=r)
        self.overhead = Histogram("meterproxy_overhead_seconds", "Time the proxy itself adds.",
                                  ["provider"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.inflight = Gauge("meterproxy_inflight_requests", "Requests in flight.", ["provider"],
                              registry=r, **gauge_mode)  # type: ignore[arg-type]
        self.upstream_errors = Counter("meterproxy_upstream_errors", "Upstream failures by kind.",
                                       ["provider", "kind"], registry=r)
        self.store_errors = Counter("meterproxy_store_errors", "Quota store failures by operation.",
                                    ["op"], registry=r)
        self.count_source = Counter("meterproxy_token_count_source", "Token counts by where they came from.",
                                    ["source"], registry=r)
        self.budget_remaining = Gauge("meterproxy_budget_remaining_usd", "Budget left in the period.",
                                      ["subject", "period"], registry=r,
                                      **({"multiprocess_mode": "mostrecent"} if multiprocess else {}))  # type: ignore[arg-type]
        self.budget_limit = Gauge("meterproxy_budget_limit_usd", "Budget of the period.",
                                  ["subject", "period"], registry=r,
                                  **({"multiprocess_mode": "mostrecent"} if multiprocess else {}))  # type: ignore[arg-type]
        self.store_fallback = Counter("meterproxy_store_fallback_admissions",
                                      "Admissions made without the store (on_store_failure: open).", registry=r)
        self.unpriced = Counter("meterproxy_unpriced_requests", "Requests for models with no price.",
                                ["model"], registry=r)
        self.ledger_dropped = Counter("meterproxy_ledger_dropped_events",
                                      "Usage events lost because the ledger queue overflowed.", registry=r)
        self.tokenizer_fallback = Gauge("meterproxy_tokenizer_fallback",
                                        "1 when tiktoken could not load and counts come from byte length.",
                                        registry=r, **({"multiprocess_mode": "max"} if multiprocess else {}))  # type: ignore[arg-type]
        for op in ("admit", "settle", "replay"):
            self.store_errors.labels(op)  # present at 0, so a first failure shows up as a rate
        self._children: dict[tuple[str, str, str, str], _Children] = {}
        self._sources = tuple(self.count_source.labels(s) for s in SOURCES)
        self._source_index = {s: i for i, s in enumerate(SOURCES)}
        self._inflight: dict[str, Gauge] = {}
        self._n_inflight: dict[str, int] = {}  # provider -> started minus finished, not folded in yet

    def inflight_for(self, provider: str) -> Gauge:
        """The in-flight gauge child of a provider."""
        g = self._inflight.get(provider)
        if g is None:
            g = self._inflight[provider] = self.inflight.labels(provider)
        return g

    def inflight_add(self, provider: str, n: int) -> None:
        """A request to `provider` started (1) or finished (-1); the gauge sees it at the next flush."""
        self._n_inflight[provider] = self._n_inflight.get(provider, 0) + n

    def user_team(self, user: str, team: str | None) -> tuple[str, str]:
        return self.users(user), self.teams(team) if team else NO_TEAM

    def _children_for(self, provider: str, model: str, user: str, team: str) -> _Children:
        key = (provider, model, user, team)
        ch = self._children.get(key)
        if ch is None:
            ch = _Children(
                key,
                tuple(self.tokens.labels(provider, model, user, team, t) for t in TOKEN_TYPES),
                self.cost.labels(provider, model, user, team),
                self.duration.labels(provider, model),
                self.ttft.labels(provider, model),
                self.overhead.labels(provider),
            )
            if len(self._children) < 100_000:
                self._children[key] = ch
        return ch

    def observe(self, rec: UsageRecord, overhead_seconds: float | None) -> None:
        """Count one finished request (plain integer work; `flush` hands it to Prometheus)."""
        user, team = self.user_team(rec.user, rec.team)
        model = rec.model
        ch = self._children_for(rec.provider, model, user, team)
        if not ch.dirty:
            ch.dirty = True
            self._dirty.append(ch)
        ch.n_requests[rec.status] = ch.n_requests.get(rec.status, 0) + 1
        t = rec.tokens
        n = ch.n_tokens
        n[0] += t.input
        n[1] += t.cached_input
        n[2] += t.cache_write
        n[3] += t.output
        n[4] += t.reasoning
        ch.n_cost_micro_usd += rec.cost_micro_usd
        ch.p_duration.observe(rec.latency_seconds)
        if rec.ttft_seconds is not None:
            ch.p_ttft.observe(rec.ttft_seconds)
        if overhead_seconds is not None:
            ch.p_overhead.observe(overhead_seconds)
        if t.total:
            self._n_sources[self._source_index[rec.input_source.value]] += 1
            if t.output:
                self._n_sources[self._source_index[rec.output_source.value]] += 1
            if not rec.priced:
                self._n_unpriced[model] = self._n_unpriced.get(model, 0) + 1

    def flush(self) -> None:
        """Fold what `observe` counted into the Prometheus children."""
        dirty, self._dirty = self._dirty, []
        for ch in dirty:
            ch.dirty = False
            for status, count in ch.n_requests.items():
                req = ch.requests.get(status)
                if req is None:
                    req = ch.requests[status] = self.requests.labels(*ch.labels, str(status))
                req.inc(count)
            ch.n_requests.clear()
            for i, (child, count) in enumerate(zip(ch.tokens, ch.n_tokens, strict=True)):
                if count:
                    child.inc(count)
                    ch.n_tokens[i] = 0
            if ch.n_cost_micro_usd:
                ch.cost.inc(ch.n_cost_micro_usd / 1_000_000)
                ch.n_cost_micro_usd = 0
            ch.p_duration.fold(ch.duration)
            ch.p_ttft.fold(ch.ttft)
            ch.p_overhead.fold(ch.overhead)
        for i, count in enumerate(self._n_sources):
            if count:
                self._sources[i].inc(count)
                self._n_sources[i] = 0
        pending = self._n_inflight
        for provider, n in pending.items():  # every provider seen keeps its child, at 0 too
            gauge = self.inflight_for(provider)
            if n:
                gauge.inc(n)
                pending[provider] = 0
        unpriced, self._n_unpriced = self._n_unpriced, {}
        for model, count in unpriced.items():
            self.unpriced.labels(model).inc(count)

    def rejected(self, user: str, team: str | None, limit: str, shadow: bool = False) -> None:
        u, tm = self.user_team(user, team)
        (self.shadow_rejections if shadow else self.rejections).labels(u, tm, limit).inc()
