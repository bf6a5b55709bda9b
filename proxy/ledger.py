"""The usage ledger: one JSON line per finished request, written off the request path.

`write` only enqueues (never blocks, never raises); one background writer appends batches to the
JSONL file, fsyncs at an interval, rotates by size, and keeps events it could not write for the
next try. Only a full queue loses events, and those are counted and logged.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

from .metrics import Metrics
from .records import UsageRecord

log = logging.getLogger("meterproxy.ledger")


def event_of(rec: UsageRecord) -> dict[str, Any]:
    t = rec.tokens
    return {
        "event_id": rec.event_id, "request_id": rec.request_id, "time": round(rec.time, 6),
        "user": rec.user, "team": rec.team, "plan": rec.plan, "key_id": rec.key_id,
        "provider": rec.provider, "model": rec.model, "api": rec.api_kind,
        "input_tokens": t.input, "cached_input_tokens": t.cached_input, "cache_write_tokens": t.cache_write,
        "output_tokens": t.output, "reasoning_tokens": t.reasoning,
        "input_source": rec.input_source.value, "output_source": rec.output_source.value,
        "cost_micro_usd": rec.cost_micro_usd, "priced": rec.priced, "status": rec.status,
        "latency_ms": round(rec.latency_seconds * 1000, 3),
        "ttft_ms": None if rec.ttft_seconds is None else round(rec.ttft_seconds * 1000, 3),
        "streamed": rec.streamed, "cut_short": rec.cut_short, "retries": rec.retries, "error": rec.error,
    }


class Ledger:
    def __init__(self, path: str | None, metrics: Metrics, *, fsync_interval: float = 1.0,
                 rotate_bytes: int = 100 * 1024 * 1024, queue_size: int = 100_000) -> None:
        self.path = Path(path) if path else None
        self.metrics = metrics
        self.fsync_interval = fsync_interval
        self.rotate_bytes = rotate_bytes
        self._queue: deque[bytes] = deque()
        self._queue_size = queue_size
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._file: Any = None
        self._last_fsync = 0.0
        self._closing = False
        self.written = 0

    def write(self, rec: UsageRecord) -> None:
        if self.path is None:
            return
        if len(self._queue) >= self._queue_size:
            self.metrics.ledger_dropped.inc()
            log.error("ledger queue full (%d events): dropped event %s", self._queue_size, rec.event_id)
            return
        self._queue.append(orjson.dumps(event_of(rec)) + b"\n")
        self._wake.set()

    async def start(self) -> None:
        if self.path is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Drain everything queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._file is not None:
            await asyncio.to_thread(self._close_file)

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.fsync_interval or None)
            batch = list(self._queue)
            if not batch:
                continue
            try:
                await asyncio.to_thread(self._append, b"".join(batch))
            except OSError as e:
                log.error("ledger write to %s failed (%s); keeping %d events and retrying", self.path, e, len(batch))
                if self._closing and backoff > 5:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.1
            for _ in batch:
                self._queue.popleft()
            self.written += len(batch)

    def _append(self, data: bytes) -> None:
        assert self.path is not None
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - held open across batches
        self._file.write(data)
        self._file.flush()
        now = time.monotonic()
        if self._closing or now - self._last_fsync >= self.fsync_interval:
            os.fsync(self._file.fileno())
            self._last_fsync = now
        if self._file.tell() >= self.rotate_bytes:
            self._rotate()

    def _rotate(self) -> None:
        assert self.path is not None
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        n = 0
        while (target := self.path.with_name(f"{self.path.name}.{stamp}.{n}")).exists():
            n += 1
        os.replace(self.path, target)

    def _close_file(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
