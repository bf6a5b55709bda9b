"""Recent output sizes per (user, model), and the percentile of them that sizes a reservation
(what a request will likely write rather than its whole max_tokens).
"""
from __future__ import annotations

import math
import sys
import time
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Callable

from .sweep import sweep_slice

_HISTORY_SIZE = 64  # recent outputs kept per (user, model)
_HISTORY_MIN_SAMPLES = 8  # fewer than this: no percentile, reserve the full max_tokens
_HISTORY_SUBJECTS = 10_000  # (user, model) pairs remembered
_HISTORY_IDLE_SECONDS = 600.0  # a pair unused this long makes room for a new one
_SWEEP_SECONDS = 60.0  # how often a full history starts looking for idle pairs
_PERCENTILE = 0.95


class _Run:
    """One pair's outputs in arrival order (what leaves next) and sorted (so the percentile every
    admission asks for is one index, not a sort), and when it was last added to."""

    __slots__ = ("recent", "ordered", "used")

    def __init__(self) -> None:
        self.recent: deque[int] = deque(maxlen=_HISTORY_SIZE)
        self.ordered: list[int] = []
        self.used = 0.0


class History:
    """Recent output sizes per (user, model), bounded in length and in number of pairs.

    Full, it takes a new pair only once an idle one has left: a sweep, at most once a minute and a
    slice per add, drops pairs unused for ten minutes. Evicting the least recently used pair instead would,
    with more active pairs than the bound, have every request touch another pair's cold run for
    nothing, as no pair would keep its run long enough for a percentile. A pair not remembered
    costs only a full-size reservation."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._runs: dict[tuple[str, str], _Run] = {}
        self._clock = clock
        self._next_sweep = -math.inf
        self._sweeping: list[tuple[str, str]] = []  # pairs the running sweep has yet to look at

    def add(self, user: str, model: str, output: int) -> None:
        key = (user, model)
        run = self._runs.get(key)
        now = self._clock()
        if run is not None:
            run.used = now  # before the sweep below: a pair in use is not idle
        full = len(self._runs) >= _HISTORY_SUBJECTS
        if self._sweeping or (full and now >= self._next_sweep):
            self._sweep(now)
            full = len(self._runs) >= _HISTORY_SUBJECTS
        if run is None:
            if full:
                return  # every remembered pair was in use lately: this one waits for room
            # The model interned: every pair's key then holds one string, which each lookup's
            # comparison reads, instead of a string of its own (a cache miss with many users).
            run = self._runs[(user, sys.intern(model))] = _Run()
            run.used = now
        recent, ordered = run.recent, run.ordered
        if len(recent) == _HISTORY_SIZE:
            del ordered[bisect_left(ordered, recent[0])]  # the oldest leaves both
        recent.append(output)
        insort(ordered, output)

    def percentile(self, user: str, model: str) -> int | None:
        run = self._runs.get((user, model))
        if run is None:
            return None
        ordered = run.ordered
        n = len(ordered)
        if n < _HISTORY_MIN_SAMPLES:
            return None
        return ordered[min(n - 1, math.ceil(_PERCENTILE * n) - 1)]  # nearest rank

    def _sweep(self, now: float) -> None:
        """One slice of the sweep, started (once a minute at most) when the history is full."""
        if not self._sweeping:
            self._next_sweep = now + _SWEEP_SECONDS
            self._sweeping = list(self._runs)
        sweep_slice(self._sweeping, self._idle_at, self._drop, now)

    def _idle_at(self, key: tuple[str, str]) -> float | None:
        run = self._runs.get(key)
        return None if run is None else run.used + _HISTORY_IDLE_SECONDS

    def _drop(self, key: tuple[str, str]) -> None:
        del self._runs[key]
