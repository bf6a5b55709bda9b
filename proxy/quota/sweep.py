"""Dropping what expired from a large table a slice at a time, so no single request pays for a
whole pass (the memory store's counters and records, the output history's idle pairs)."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

SWEEP_SLICE = 256  # keys looked at per call
K = TypeVar("K")


def sweep_slice(pending: list[K], expiry_of: Callable[[K], float | None], drop: Callable[[K], None],
                             now: float) -> None:
    """Look at the last slice of `pending` (taken off it from the end: no copy), dropping what expired."""
    for key in pending[-SWEEP_SLICE:]:
        expiry = expiry_of(key)
        if expiry is not None and expiry <= now:
            drop(key)
    del pending[-SWEEP_SLICE:]
