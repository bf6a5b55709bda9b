"""What a gate hands on to the next at a config reload: fail-open counters and the replay queue
(and its item), store health, output history, in-flight counts and queued requests' wake-up.
"""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from datetime import tzinfo

from .history import History
from .memory import MemoryStore
from .store import Admission, AggregateDelta, Reservation


@dataclass(frozen=True, slots=True)
class Replay:
    """What the store has not seen yet: a finished request's usage (with the local admission to
    add it under, or the store reservation to settle), or a top-up to give back (`usage` None)."""

    usage: AggregateDelta | None
    admission: Admission | None = None
    reservation: Reservation | None = None


class State:
    """What outlives a config reload: fail-open counters and replay queue, store health, output
    history, in-flight counts and the wake-up of queued requests."""

    def __init__(self, tz: tzinfo) -> None:
        self.local = MemoryStore(tz=tz)
        self.replay: deque[Replay] = deque()
        self.replay_lock = asyncio.Lock()
        self.history = History()
        self.inflight: dict[str, int] = {}  # hash tag -> admitted, unsettled tickets in this process
        self.down = False
        self.retry_at = 0.0
        self.failures = 0
        self.probing = False
        self._room: asyncio.Future[None] | None = None

    def room(self) -> asyncio.Future[None]:
        """Resolved by the next settle in this process (room may have freed)."""
        if self._room is None or self._room.done():
            self._room = asyncio.get_running_loop().create_future()
        return self._room

    def wake(self) -> None:
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        self._room = None
