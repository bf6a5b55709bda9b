"""Upstream resilience: retries with jittered backoff, a circuit breaker per provider, fallbacks.

All of it happens before the first byte reaches the client, so a retry can never duplicate
output the client has seen. Every failed attempt is counted by kind.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from .config import CircuitBreaker
from .errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from .forwarding import send
from .providers import Adapter, Call
from .upstream import UpstreamPool, UpstreamResponse


class Breaker:
    """Closed → open after N consecutive failures → one trial after `reset` seconds (half-open)."""

    __slots__ = ("failures", "reset", "_count", "_open_until", "_trial")

    def __init__(self, cfg: CircuitBreaker) -> None:
        self.failures = cfg.failures
        self.reset = cfg.reset
        self._count = 0
        self._open_until = 0.0
        self._trial = False

    @property
    def is_open(self) -> bool:
        return self._count >= self.failures and time.monotonic() < self._open_until

    def allow(self) -> bool:
        if self._count < self.failures:
            return True
        if time.monotonic() < self._open_until or self._trial:
            return False
        self._trial = True  # half-open: let one request find out
        return True

    def success(self) -> None:
        self._count = 0
        self._trial = False

    def failure(self) -> None:
        self._count += 1
        self._trial = False
        if self._count >= self.failures:
            self._open_until = time.monotonic() + self.reset


@dataclass(slots=True, unsafe_hash=True)  # not frozen: built per request, 4x cheaper to make
class Attempt:
    adapter: Adapter
    path: str  # raw path to send upstream


@dataclass(slots=True)
class Outcome:
    upstream: UpstreamResponse
    adapter: Adapter
    retries: int


class AttemptsFailed(Exception):
    """No attempt got an answer: the last error, and the retries made (the usage event records them)."""

    def __init__(self, error: ProxyError, retries: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.retries = retries


async def forward(
    pool: UpstreamPool,
    attempts: list[Attempt],
    breakers: dict[str, Breaker],
    call: Call,
    request: web.Request,
    body: bytes | None,
    on_error: Callable[[str, str], None],
) -> Outcome:
    """Try each target in turn (with its retries) until one answers with a non-retryable status."""
    started = time.monotonic()
    retries = 0
    last: ProxyError | None = None
    last_response: UpstreamResponse | None = None
    last_adapter = attempts[0].adapter
    for target in attempts:
        adapter = target.adapter
        policy = adapter.config.retries
        breaker = breakers[adapter.name]
        for n in range(policy.attempts + 1):
            if not breaker.allow():
                on_error(adapter.name, "circuit_open")
                last = last or UpstreamUnreachable(
                    f"The upstream provider {adapter.name!r} is failing; its circuit is open. Try again shortly.")
                break
            if last_response is not None:
                last_response.release()
                last_response = None
            try:
                upstream = await send(pool, adapter, call, target.path, request, body)
            except (UpstreamUnreachable, UpstreamTimeout) as e:
                breaker.failure()
                on_error(adapter.name, "unreachable" if isinstance(e, UpstreamUnreachable) else "timeout")
                last = e
            else:
                if upstream.status not in policy.on_status:
                    breaker.success()
                    return Outcome(upstream, adapter, retries)
                if upstream.status >= 500:
                    breaker.failure()
                on_error(adapter.name, f"status_{upstream.status}")
                last_response, last_adapter = upstream, adapter
            delay = _backoff(policy.backoff, n, last_response)
            if n == policy.attempts or time.monotonic() - started + delay > policy.deadline:
                break
            retries += 1
            await asyncio.sleep(delay)
        if target is not attempts[-1]:
            retries += 1
    if last_response is not None:  # out of attempts: the client gets the provider's own answer
        return Outcome(last_response, last_adapter, retries)
    assert last is not None
    raise AttemptsFailed(last, retries)


def _backoff(base: float, n: int, resp: UpstreamResponse | None) -> float:
    """Exponential with full jitter; an upstream's own retry-after (if short) wins."""
    if resp is not None:
        ra = resp.headers.get("retry-after-ms") or None
        if ra is not None:
            try:
                return min(float(ra) / 1000, 10.0)
            except ValueError:
                pass
        ra = resp.headers.get("retry-after")
        if ra is not None:
            try:
                return min(float(ra), 10.0)
            except ValueError:
                pass
    return random.uniform(0, base * (2**n))
