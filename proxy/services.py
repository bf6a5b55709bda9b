"""The long-lived things one request uses, bundled so a reload can swap them in one assignment.

Everything here is built by `app.py`; handlers read it from the app under typed keys.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import date, tzinfo
from typing import Any

from aiohttp import web

from .auth import KeyRing
from .config import Config
from .ledger import Ledger
from .metrics import Metrics
from .pricing import PriceTable, date_at
from .providers import Adapter
from .quota.gate import Gate
from .relay import HangUps
from .resilience import Breaker
from .route import Router
from .tokens import Tokenizer
from .upstream import UpstreamPool

log = logging.getLogger("meterproxy")


@dataclass(frozen=True, slots=True)
class Services:
    config: Config
    adapters: dict[str, Adapter]
    router: Router
    keys: KeyRing
    tokenizer: Tokenizer
    prices: PriceTable
    gate: Gate
    pool: UpstreamPool
    metrics: Metrics
    ledger: Ledger
    tz: tzinfo
    breakers: dict[str, Breaker]

    def today(self) -> date:
        return date_at(self.tz, time.time())

    def day_of(self, ts: float) -> date:
        return date_at(self.tz, ts)

    def guess_adapter(self, request: web.Request) -> Adapter:
        """The adapter whose error shape fits a request that was refused before routing."""
        first = request.path.split("/", 2)[1] if request.path.count("/") else ""
        if first in self.adapters:
            return self.adapters[first]
        h = request.headers
        family = ("anthropic" if "anthropic-version" in h or "x-api-key" in h
                  else "gemini" if "x-goog-api-key" in h or first == "v1beta" else "openai")
        return next((a for a in self.adapters.values() if a.family == family), next(iter(self.adapters.values())))


class RequestIds:
    """Unique request ids without uuid4's cost: 64 random bits per process, then a counter."""

    __slots__ = ("_prefix", "_next")

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._next = itertools.count(1).__next__

    def new(self) -> str:
        return f"{self._prefix}{self._next():012x}"


class Tracker:
    """Background work that must finish before shutdown (settle and record of each request): tasks,
    futures of work already sent (a store command), and callbacks for work that never suspends (a
    task costs ten times a callback)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[None]] = set()
        self._soon = 0  # callbacks queued, not run yet

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def track(self, fut: asyncio.Future[None], then: Callable[[], None]) -> None:
        """Wait for `fut` (work already under way), then run `then()` unless it failed."""
        self._tasks.add(fut)
        fut.add_done_callback(functools.partial(self._then, then))

    def _then(self, then: Callable[[], None], fut: asyncio.Future[None]) -> None:
        self._done(fut)
        if not fut.cancelled() and fut.exception() is None:
            self._run(then, ())

    def soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(*args)` at the loop's next turn (it may `spawn` what must wait)."""
        self._soon += 1
        asyncio.get_running_loop().call_soon(self._run_soon, fn, args)

    def _run_soon(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self._soon -= 1
        self._run(fn, args)

    def _run(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            log.error("settle/record failed", exc_info=True)

    def _done(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("settle/record failed", exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks) + self._soon

    async def drain(self, timeout: float = 30.0) -> None:
        if self._soon:
            await asyncio.sleep(0)  # queued callbacks run first (FIFO); they may spawn tasks
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


class Live:
    """Holds the current Services; a reload replaces `.services` (the app itself stays frozen)."""

    __slots__ = ("services",)

    def __init__(self) -> None:
        self.services: Services | None = None

    def get(self) -> Services:
        assert self.services is not None, "services are built at app startup"
        return self.services


SERVICES = web.AppKey("services", Live)
TRACKER = web.AppKey("tracker", Tracker)
HANG_UPS = web.AppKey("hang_ups", HangUps)
REQUEST_IDS = web.AppKey("request_ids", RequestIds)
Reloader = Callable[[], Awaitable[str | None]]  # reloads the config: None, or the error
RELOAD: web.AppKey[Reloader] = web.AppKey("reload")
