"""Recent output sizes per (user, model), and the percentile of them that sizes a reservation
(what a request will likely write rather than its whole max_tokens).
"""
from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import OrderedDict, deque

_HISTORY_SIZE = 64  # recent outputs kept per (user, model)
_HISTORY_MIN_SAMPLES = 8  # fewer than this: no percentile, reserve the full max_tokens
_HISTORY_SUBJECTS = 10_000  # (user, model) pairs remembered, least recently used dropped
_PERCENTILE = 0.95


class History:
    """Recent output sizes per (user, model), bounded in length and in number of pairs.

    Each run is kept twice: in arrival order (what leaves next) and sorted (so the percentile
    every admission asks for is one index, not a sort)."""

    def __init__(self) -> None:
        self._runs: OrderedDict[tuple[str, str], tuple[deque[int], list[int]]] = OrderedDict()

    def add(self, user: str, model: str, output: int) -> None:
        key = (user, model)
        hit = self._runs.get(key)
        if hit is None:
            if len(self._runs) >= _HISTORY_SUBJECTS:
                # The least recently used pair's run is emptied and reused: with more active
                # pairs than the bound, every add lands here, and allocating would churn.
                hit = self._runs.popitem(last=False)[1]
                hit[0].clear()
                hit[1].clear()
            else:
                hit = (deque(maxlen=_HISTORY_SIZE), [])
            self._runs[key] = hit
        else:
            self._runs.move_to_end(key)
        run, ordered = hit
        if len(run) == _HISTORY_SIZE:
            del ordered[bisect_left(ordered, run[0])]  # the oldest leaves both
        run.append(output)
        insort(ordered, output)

    def percentile(self, user: str, model: str) -> int | None:
        hit = self._runs.get((user, model))
        if hit is None:
            return None
        ordered = hit[1]
        n = len(ordered)
        if n < _HISTORY_MIN_SAMPLES:
            return None
        return ordered[min(n - 1, math.ceil(_PERCENTILE * n) - 1)]  # nearest rank
