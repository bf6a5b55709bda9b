"""The gate's calls to the quota store and what happens when it fails: each call bounded by a
timeout, store health with backed-off probes, fail-open (or closed) admission on local counters,
and the exact replay to the store of what it missed.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..config import Config
from ..errors import StoreError, StoreUnavailable
from ..metrics import Metrics
from .memory import MemoryStore
from .state import Replay, State
from .store import Admission, AggregateDelta, Decision, Limit, QuotaStore, Reservation

log = logging.getLogger("meterproxy.quota")
T = TypeVar("T")

_BACKOFF_SECONDS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)  # between probes of a store that is down
_REPLAY_MAX = 1_000_000  # usage deltas kept for the store; beyond, the oldest are dropped (logged)


class _StoreDown(Exception):
    """The store is down or just failed: serve per `on_store_failure`."""


class StoreLink:
    """Gate's base: its store calls as methods of the gate itself, so a request reaches the store
    through no further object. Gate sets the attributes declared here."""

    config: Config
    store: QuotaStore
    metrics: Metrics
    _state: State
    _timeout: float  # a store call waits at most this long (connect + command)
    _embedded: MemoryStore | None  # the store, when it is exactly the in-process one

    async def _guarded(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        """One store call, bounded by a short timeout. While the store is down, calls are not made
        (raise _StoreDown at once) except one probe at a time after a growing backoff."""
        st = self._state
        if st.down and (st.probing or time.monotonic() < st.retry_at):
            raise _StoreDown
        probe = st.down
        st.probing = st.probing or probe
        try:
            if not self.store.bounds_own_calls:  # bound the call (no extra task, unlike wait_for)
                async with asyncio.timeout(self._timeout):
                    result = await call()
            else:  # in-memory store: it never waits
                result = await call()
        except (StoreError, TimeoutError) as e:
            self._store_failed(op, e, probe)
            raise _StoreDown from e
        finally:
            if probe:
                st.probing = False
        if st.down:
            log.warning("quota store is back; %d usage deltas to replay", len(st.replay))
            st.down, st.failures = False, 0
        return result

    def _store_failed(self, op: str, e: BaseException, probe: bool) -> None:
        st = self._state
        self.metrics.store_errors.labels(op).inc()
        if st.down and not probe:
            return  # already known; only a failed probe backs off further
        backoff = _BACKOFF_SECONDS[min(st.failures, len(_BACKOFF_SECONDS) - 1)]
        st.failures += 1
        st.down = True
        st.retry_at = time.monotonic() + backoff
        log.warning("quota store %s failed (%s); %s, next try in %.2fs", op, e or type(e).__name__,
                    "serving on local counters" if self.config.on_store_failure == "open" else "refusing", backoff)

    async def _store_admit(self, adm: Admission) -> tuple[Decision, bool]:
        if self._embedded is not None:  # cannot fail or wait: no guard, no coroutine layers
            return self._embedded.admit_now(adm), False
        try:
            sent = None if self._state.down else self.store.admit_soon(adm)
            if sent is None:
                return await self._guarded("admit", lambda: self.store.admit(adm)), False
            try:  # sent already (the lean Redis connection): `_guarded`'s failure handling, no layers
                return await sent, False
            except StoreError as e:
                self._store_failed("admit", e, False)
                raise _StoreDown from e
        except _StoreDown:
            pass
        if self.config.on_store_failure == "closed":
            raise StoreUnavailable("The quota store is unreachable and on_store_failure is closed; try again shortly.",
                                   headers={"retry-after": "1"})
        self.metrics.store_fallback.inc()
        return await self._state.local.admit(adm), True

    def _keep_for_replay(self, item: Replay) -> None:
        q = self._state.replay
        if len(q) >= _REPLAY_MAX:
            q.popleft()
            self.metrics.store_errors.labels("replay_dropped").inc()
            log.error("fail-open replay queue is full (%d); the oldest usage delta is dropped", _REPLAY_MAX)
        q.append(item)

    async def _record(self, res: Reservation | None, local: bool, usage: AggregateDelta) -> None:
        now = time.time()
        if local:
            if res is not None:
                await self._state.local.settle(res, usage.totals.tokens, usage.totals.cost_micro_usd, now)
            self._keep_for_replay(Replay(usage, _replay_admission(res) if res is not None else None))
            return
        if self._embedded is not None:
            self._embedded.settle_and_record_now(res, usage, now)
            return
        try:
            await self._guarded("settle", lambda: self.store.settle_and_record(res, usage, now))
        except _StoreDown:
            # A reservation stays counted in the store (its record lasts 2 days): settle it later.
            self._keep_for_replay(Replay(usage, reservation=res))

    async def _give_back(self, res: Reservation, local: bool) -> None:
        now = time.time()
        if local:
            await self._state.local.settle(res, 0, 0, now)
            return
        try:
            await self._guarded("settle", lambda: self.store.settle(res, 0, 0, now))
        except _StoreDown:
            self._keep_for_replay(Replay(None, reservation=res))

    async def replay_pending(self) -> int:
        """Apply what was kept while the store was down, oldest first, each once: a local
        admission is first turned into a store reservation (admit is idempotent per request id),
        then settled and recorded (once per event id); an item leaves the queue only when done."""
        st = self._state
        done = 0
        async with st.replay_lock:
            while st.replay:
                item = st.replay[0]
                try:
                    if item.admission is not None:
                        d = await self._guarded("replay", functools.partial(self.store.admit, item.admission))
                        item = st.replay[0] = Replay(item.usage, reservation=d.reservation)
                    await self._guarded("replay", functools.partial(self._apply, item))
                except _StoreDown:
                    break
                st.replay.popleft()
                done += 1
        return done

    async def _apply(self, item: Replay) -> None:
        if item.usage is not None:
            await self.store.settle_and_record(item.reservation, item.usage, time.time())
        elif item.reservation is not None:  # a top-up to give back
            await self.store.settle(item.reservation, 0, 0, time.time())

    @property
    def pending_replays(self) -> int:
        return len(self._state.replay)

    @property
    def store_down(self) -> bool:
        return self._state.down


def _replay_admission(res: Reservation) -> Admission:
    # The same request id, so an admission the store made but whose reply was lost counts once;
    # every limit a shadow one, since usage already served is never refused.
    limits = tuple(Limit(lim.scope, lim.name, lim.value, False) for lim in res.limits)
    return Admission(res.request_id, res.tag, limits, res.tokens, res.cost_micro_usd, res.time, res.day, res.month)
