"""Prometheus metrics: defined once, on a registry the app hands in; names are DESIGN.md's contract.

User and team label values are capped (beyond the cap: `other`); keys are never labels. Label
children are cached per (provider, model, user, team) so the hot path does no label lookups.
"""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .records import UsageRecord

DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05)
OTHER = "other"
NO_TEAM = "none"
TOKEN_TYPES = ("input", "cached_input", "cache_write", "output", "reasoning")


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


@dataclass(slots=True)
class _Children:
    """Prebuilt label children for one (provider, model, user, team)."""

    tokens: tuple[Counter, ...]
    cost: Counter
    duration: Histogram
    ttft: Histogram
    overhead: Histogram
    requests: dict[int, Counter]  # by status code, filled as codes appear


class Metrics:
    def __init__(self, registry: CollectorRegistry, max_user_labels: int = 1000, max_team_labels: int = 1000,
                 multiprocess: bool = False) -> None:
        self.registry = registry
        self.users = LabelCap(max_user_labels)
        self.teams = LabelCap(max_team_labels)
        gauge_mode = {"multiprocess_mode": "livesum"} if multiprocess else {}
        r = registry
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
        self._sources = {s: self.count_source.labels(s) for s in ("provider", "tokenizer", "estimate")}

    def user_team(self, user: str, team: str | None) -> tuple[str, str]:
        return self.users(user), self.teams(team) if team else NO_TEAM

    def _children_for(self, provider: str, model: str, user: str, team: str) -> _Children:
        key = (provider, model, user, team)
        ch = self._children.get(key)
        if ch is None:
            ch = _Children(
                tuple(self.tokens.labels(provider, model, user, team, t) for t in TOKEN_TYPES),
                self.cost.labels(provider, model, user, team),
                self.duration.labels(provider, model),
                self.ttft.labels(provider, model),
                self.overhead.labels(provider),
                {},
            )
            if len(self._children) < 100_000:
                self._children[key] = ch
        return ch

    def observe(self, rec: UsageRecord, overhead_seconds: float | None) -> None:
        user, team = self.user_team(rec.user, rec.team)
        model = rec.model
        ch = self._children_for(rec.provider, model, user, team)
        req = ch.requests.get(rec.status)
        if req is None:
            req = ch.requests[rec.status] = self.requests.labels(rec.provider, model, user, team, str(rec.status))
        req.inc()
        t = rec.tokens
        for child, n in zip(ch.tokens, (t.input, t.cached_input, t.cache_write, t.output, t.reasoning), strict=True):
            if n:
                child.inc(n)
        if rec.cost_micro_usd:
            ch.cost.inc(rec.cost_micro_usd / 1_000_000)
        ch.duration.observe(rec.latency_seconds)
        if rec.ttft_seconds is not None:
            ch.ttft.observe(rec.ttft_seconds)
        if overhead_seconds is not None:
            ch.overhead.observe(overhead_seconds)
        if t.total:
            self._sources[rec.input_source.value].inc()
            if t.output:
                self._sources[rec.output_source.value].inc()
        if not rec.priced and t.total:
            self.unpriced.labels(model).inc()

    def rejected(self, user: str, team: str | None, limit: str, shadow: bool = False) -> None:
        u, tm = self.user_team(user, team)
        (self.shadow_rejections if shadow else self.rejections).labels(u, tm, limit).inc()
