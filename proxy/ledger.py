"""The usage ledger: one event per finished request, written off the request path to its sinks.

`write` only enqueues (never blocks, never raises). Each sink (the JSONL file; with the redis
store, also a capped Redis stream) has one background writer that takes events from the one
bounded queue in order, keeps whatever it could not write, and retries with a backoff. An event
leaves the queue once every sink has it; only a full queue loses events, counted and logged.
The JSONL sink fsyncs at an interval and rotates by size; a restart appends, never truncates.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import orjson

from .errors import StoreError
from .metrics import Metrics
from .records import UsageRecord

log = logging.getLogger("meterproxy.ledger")

_MAX_BATCH = 1000
_LINGER_SECONDS = 0.02  # how long a first event waits for others to share its write
_BACKOFF_FIRST, _BACKOFF_MAX = 0.1, 10.0
# On shutdown, a sink still failing after this many seconds of retries gives up (and says so).
_CLOSE_GIVE_UP_SECONDS = 5.0


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


@runtime_checkable
class EventStream(Protocol):
    """A Redis stream to append ledger events to (the redis store implements it, the memory one
    does not: `isinstance(store, EventStream)` tells)."""

    async def append_events(self, events: Sequence[bytes], maxlen: int) -> None: ...


class _Sink:
    """One destination: how far into the shared queue it has written, and how to write."""

    name: str = "sink"

    def __init__(self) -> None:
        self.done = 0  # events at the head of the queue this sink has written
        self.task: asyncio.Task[None] | None = None

    async def write(self, lines: list[bytes]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    async def idle(self) -> None:
        """Called when no event came for a while."""
        return None


class _FileSink(_Sink):
    name = "file"

    def __init__(self, path: Path, fsync_interval: float, rotate_bytes: int) -> None:
        super().__init__()
        self.path = path
        self.fsync_interval = fsync_interval
        self.rotate_bytes = rotate_bytes
        self.closing = False
        self._file: Any = None
        self._last_fsync = 0.0
        self._dirty = False  # written but not fsynced yet

    async def write(self, lines: list[bytes]) -> None:
        try:
            await asyncio.to_thread(self._append, b"".join(lines))
        except OSError as e:
            self._drop_file()  # reopen next time: the file may have been moved or its disk fixed
            raise StoreError(f"cannot append to {self.path}: {e}") from e

    async def close(self) -> None:
        if self._file is not None:
            await asyncio.to_thread(self._close_file)

    async def idle(self) -> None:
        # The last batch before a lull is fsynced within the interval too, not at the next write.
        if self._dirty and self._file is not None:
            try:
                await asyncio.to_thread(self._fsync)
            except OSError as e:
                log.error("fsync of %s failed: %s", self.path, e)

    def _fsync(self) -> None:
        os.fsync(self._file.fileno())
        self._last_fsync = time.monotonic()
        self._dirty = False

    def _append(self, data: bytes) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - held open across batches
        self._file.write(data)
        self._file.flush()
        self._dirty = True
        if self.closing or time.monotonic() - self._last_fsync >= self.fsync_interval:
            self._fsync()
        if self._file.tell() >= self.rotate_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._fsync()
        self._file.close()
        self._file = None
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        n = 0
        while (target := self.path.with_name(f"{self.path.name}.{stamp}.{n}")).exists():
            n += 1
        os.replace(self.path, target)

    def _drop_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _close_file(self) -> None:
        self._fsync()
        self._file.close()
        self._file = None


class _StreamSink(_Sink):
    name = "redis stream"

    def __init__(self, stream: EventStream, maxlen: int) -> None:
        super().__init__()
        self.stream = stream
        self.maxlen = maxlen

    async def write(self, lines: list[bytes]) -> None:
        await self.stream.append_events([line.rstrip(b"\n") for line in lines], self.maxlen)


class Ledger:
    def __init__(self, path: str | None, metrics: Metrics, *, fsync_interval: float = 1.0,
                 rotate_bytes: int = 100 * 1024 * 1024, queue_size: int = 100_000,
                 stream: EventStream | None = None, stream_maxlen: int = 1_000_000) -> None:
        self.path = Path(path) if path else None
        self.metrics = metrics
        self.fsync_interval = fsync_interval
        self._sinks: list[_Sink] = []
        if self.path is not None:
            self._sinks.append(_FileSink(self.path, fsync_interval, rotate_bytes))
        if stream is not None:
            self._sinks.append(_StreamSink(stream, stream_maxlen))
        self._queue: deque[bytes] = deque()
        self._queue_size = queue_size
        self._wake = asyncio.Event()
        self._closing = False
        self.written = 0  # events every sink has

    def write(self, rec: UsageRecord) -> None:
        if not self._sinks:
            return
        if len(self._queue) >= self._queue_size:
            self.metrics.ledger_dropped.inc()
            log.error("ledger queue full (%d events): dropped event %s", self._queue_size, rec.event_id)
            return
        self._queue.append(orjson.dumps(event_of(rec)) + b"\n")
        self._wake.set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sink in self._sinks:
            sink.task = loop.create_task(self._run(sink))

    async def close(self) -> None:
        """Drain everything queued to every sink (a sink still failing gives up after a few
        seconds, logging what it lost), then stop."""
        self._closing = True
        for sink in self._sinks:
            if isinstance(sink, _FileSink):
                sink.closing = True  # the last batches are fsynced at once
        self._wake.set()
        for sink in self._sinks:
            if sink.task is not None:
                await sink.task
            await sink.close()

    @property
    def pending(self) -> int:
        """Events some sink has not written yet."""
        return len(self._queue)

    async def _run(self, sink: _Sink) -> None:
        backoff = _BACKOFF_FIRST
        failing_since: float | None = None
        while True:
            if sink.done >= len(self._queue):
                if self._closing:
                    return
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.fsync_interval or None)
                except TimeoutError:
                    await sink.idle()
                continue
            if not self._closing and len(self._queue) - sink.done < _MAX_BATCH:
                # Let a batch gather: one thread hop (or Redis call) per batch, not one per event.
                await asyncio.sleep(_LINGER_SECONDS)
            batch = list(islice(self._queue, sink.done, sink.done + _MAX_BATCH))
            try:
                await sink.write(batch)
            except StoreError as e:
                now = time.monotonic()
                failing_since = failing_since or now
                if self._closing and now - failing_since > _CLOSE_GIVE_UP_SECONDS:
                    lost = len(self._queue) - sink.done
                    log.error("ledger %s still failing at shutdown (%s): %d events not written to it",
                              sink.name, e, lost)
                    sink.done = len(self._queue)
                    self._trim()
                    return
                log.error("ledger %s write failed (%s); keeping %d events and retrying in %.1fs",
                          sink.name, e, len(self._queue) - sink.done, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            if failing_since is not None:
                log.warning("ledger %s writes again", sink.name)
            backoff, failing_since = _BACKOFF_FIRST, None
            sink.done += len(batch)
            self._trim()

    def _trim(self) -> None:
        """Drop the events every sink has written from the head of the queue."""
        n = min(s.done for s in self._sinks)
        for _ in range(n):
            self._queue.popleft()
        for s in self._sinks:
            s.done -= n
        self.written += n
