"""Per-provider concurrency slots of one process, handed to waiting requests by plan priority and
first come, first served within a priority.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field


@dataclass(order=True)
class Waiter:
    priority: int  # negated plan priority: the heap pops the highest plan priority first
    seq: int  # FIFO within one priority
    future: asyncio.Future[None] = field(compare=False)


class ProviderSlot:
    """A per-provider concurrency limit (this process's), handed to waiters by plan priority, FIFO
    within a priority. In-process by design: it protects one replica's upstream connections."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: list[Waiter] = []
        self._seq = itertools.count()

    async def acquire(self, priority: int, timeout: float) -> bool:
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return True
        if timeout <= 0:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, Waiter(-priority, next(self._seq), fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except TimeoutError:
            self._give_up(fut)
            return False
        except asyncio.CancelledError:  # the client went away while queued
            self._give_up(fut)
            raise

    def _give_up(self, fut: asyncio.Future[None]) -> None:
        if fut.done():  # handed over just as we gave up: pass it on
            self.release()
        else:
            fut.cancel()  # `release` skips cancelled waiters

    def release(self) -> None:
        while self._waiters:
            w = heapq.heappop(self._waiters)
            if not w.future.done():
                w.future.set_result(None)  # the slot moves to the waiter; `used` is unchanged
                return
        self.used = max(0, self.used - 1)
