"""The quota store shared by many proxy replicas: one Redis or Redis Cluster, one Lua script call
per admit and per settle, every redis error re-raised as `StoreError`.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import Awaitable, Sequence
from datetime import UTC, tzinfo
from importlib import resources
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import NoScriptError, RedisError

from proxy.errors import StoreError
from proxy.quota.memory import (
    AGG_TTL_SECONDS,
    RECORD_TTL_SECONDS,
    SEEN_TTL_SECONDS,
    Counter,
    CounterKind,
    CounterView,
    Periods,
    Plan,
    admission_plan,
    aggregate_fields,
    aggregate_key,
    aggregate_rows,
    decide,
    index_key,
    index_member,
    limit_states,
    parse_index_member,
    plan,
    record_key,
    replayed_decision,
    reservation_plan,
    seen_key,
    settle_delta,
    window_view,
)
from proxy.quota.resp import NoScript, RespClient, endpoint_from_url, pack
from proxy.quota.store import (
    Admission,
    AggregateDelta,
    AggregateRow,
    Decision,
    Limit,
    LimitState,
    Reservation,
    StoredKey,
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class _Script:
    """A Lua file, its SHA1 computed here so EVALSHA works before SCRIPT LOAD ever answered."""

    def __init__(self, name: str) -> None:
        self.source = resources.files("proxy.quota").joinpath(f"scripts/{name}").read_text("utf-8")
        self.sha = hashlib.sha1(self.source.encode("utf-8")).hexdigest()


def split_cluster_flag(url: str) -> tuple[str, bool | None]:
    """Take the `cluster=true|false` query parameter (ours, unknown to redis-py) off a URL."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    flag: bool | None = None
    rest = []
    for name, value in query:
        if name != "cluster":
            rest.append((name, value))
        elif value.lower() in _TRUE:
            flag = True
        elif value.lower() in _FALSE:
            flag = False
        else:
            raise ValueError(f"store url: cluster={value!r} is not true or false")
    return urlunsplit(parts._replace(query=urlencode(rest))), flag


def _fmt(x: float) -> str:
    return repr(float(x))


class RedisStore:
    """Quota counters in Redis (`redis://`, `rediss://`) or Redis Cluster.

    `cluster`: True/False, or None to take `?cluster=true|false` from the URL, else to ask the
    server (`INFO cluster`) when first connecting. Every key starts with `prefix` and then the
    admission's hash tag `{tag}`, so one script's keys share a cluster slot. The scripts run on
    the proxy's clock (`now` in each call), not Redis's. Socket timeouts are short so a dead Redis
    fails a request in well under a second or two instead of hanging it. If Redis is down at
    `start`, it raises `StoreError`; later calls try to connect again. The script calls (the
    per-request hot path) go over one lean pipelined connection of their own (`resp`) when the URL
    is a plain one to a single server; everything else, and Redis Cluster, uses redis-py.
    """

    def __init__(self, url: str, cluster: bool | None = None, prefix: str = "mp:", *,
                 timeout_seconds: float = 0.5, tz: tzinfo = UTC) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("store prefix must not contain braces (they would move the hash tag)")
        self._url, url_flag = split_cluster_flag(url)
        self._cluster = cluster if cluster is not None else url_flag
        self._prefix = prefix
        self._timeout = timeout_seconds
        self._tz = tz
        self._client: Redis | RedisCluster | None = None
        self._resp: RespClient | None = None  # the script calls' own connection (plain Redis only)
        self._connecting = asyncio.Lock()  # a burst before the first connect opens one client
        self._admit = _Script("admit.lua")
        self._record = _Script("record.lua")
        self._batch = _Batcher(self)
        self._indexed: set[tuple[str, str]] = set()  # (day, member) this process put in a day index

    async def start(self) -> None:
        await self._connect()

    async def close(self) -> None:
        client, self._client = self._client, None
        resp, self._resp = self._resp, None
        if resp is not None:
            resp.close()
        if client is not None:
            try:
                await client.aclose()
            except (RedisError, OSError) as exc:
                raise StoreError(f"closing redis: {exc}") from exc

    async def ping(self) -> bool:
        try:
            client = await self._connect()
            return bool(await _awaited(client.ping()))
        except (StoreError, RedisError, OSError):
            return False

    async def admit(self, admission: Admission) -> Decision:
        periods = Periods.of(admission.day, admission.month, self._tz)
        plan_ = admission_plan(admission)
        keys = [self._key(record_key(admission.tag, admission.request_id))]
        keys += [self._key(c.key) for c in plan_.counters]
        record_ttl = max(RECORD_TTL_SECONDS, math.ceil(admission.lease_seconds * 2))
        args: list[str | int] = [
            _fmt(admission.now), admission.request_id, record_ttl,
            _fmt(admission.now + admission.lease_seconds),
            len(plan_.counters), len(admission.limits),
        ]
        for counter in plan_.counters:
            args += [counter.kind.value, counter.amount, counter.ttl_seconds]
        for limit, slot in zip(admission.limits, plan_.slots, strict=True):
            args += [slot + 1, limit.value, int(limit.enforce)]
        reply = await self._run(self._admit, keys, args)
        try:
            admitted_flag, used, oldest, free_at, replayed = reply
            views = tuple(CounterView(int(u), None if int(o) < 0 else int(o))
                          for u, o in zip(used, oldest, strict=True))
            frees = tuple(None if int(f) < 0 else int(f) for f in free_at)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"admit.lua answered {reply!r}") from exc
        if int(replayed):
            return replayed_decision(admission, plan_, views, periods)
        decision = decide(admission, plan_, views, frees, periods)
        if decision.admitted != bool(int(admitted_flag)):
            raise StoreError("admit.lua and the client disagree on the decision")
        return decision

    async def settle(self, reservation: Reservation, tokens: int, cost_micro_usd: int,
                     now: float) -> bool:
        plan_ = reservation_plan(reservation)
        record = self._key(record_key(reservation.tag, reservation.request_id))
        # record.lua with no seen marker and no aggregate fields is the plain settle; the record
        # key stands in for the two keys it then does not touch (same hash tag).
        keys = [record, record, record, *(self._key(c.key) for c in plan_.counters)]
        bucket = math.floor(reservation.time)
        args: list[str | int] = [_fmt(now), reservation.request_id, 0, 0, len(plan_.counters), 0]
        for counter in plan_.counters:
            delta = settle_delta(counter, reservation, tokens, cost_micro_usd)
            args += [counter.kind.value, delta, bucket, counter.ttl_seconds]
        reply = await self._run(self._record, keys, args)
        try:
            return bool(int(reply[1]))
        except (TypeError, ValueError, IndexError) as exc:
            raise StoreError(f"record.lua answered {reply!r}") from exc

    async def usage(self, limits: tuple[Limit, ...], tag: str, now: float, day: str,
                    month: str) -> tuple[LimitState, ...]:
        periods = Periods.of(day, month, self._tz)
        plan_ = plan(limits, tag, 0, 0, day, month)
        views = await self._read(plan_, now)
        return limit_states(limits, plan_, views, False, now, periods)

    # ------------------------------------------------------------ usage aggregates, keys, events
    async def settle_and_record(self, reservation: Reservation | None, usage: AggregateDelta,
                                now: float) -> bool:
        if reservation is not None and reservation.tag != usage.tag:
            raise ValueError("a usage event must carry its reservation's hash tag")
        listed = await self._index(usage)
        counters = reservation_plan(reservation).counters if reservation is not None else ()
        request_id = reservation.request_id if reservation is not None else usage.event_id
        keys = [self._key(seen_key(usage.tag, usage.event_id)),
                self._key(record_key(usage.tag, request_id)),
                self._key(aggregate_key(usage.tag, usage.day, usage.user, usage.team))]
        keys += [self._key(c.key) for c in counters]
        fields = aggregate_fields(usage)
        args: list[str | int] = [_fmt(now), request_id, SEEN_TTL_SECONDS, AGG_TTL_SECONDS,
                                 len(counters), len(fields)]
        if reservation is not None:
            bucket = math.floor(reservation.time)
            tokens, cost = usage.totals.tokens, usage.totals.cost_micro_usd
            for counter in counters:
                args += [counter.kind.value, settle_delta(counter, reservation, tokens, cost), bucket,
                         counter.ttl_seconds]
        for name, value in fields:
            args += [name, value]
        reply = await self._run(self._record, keys, args)
        try:
            recorded, created = bool(int(reply[0])), bool(int(reply[2]))
        except (TypeError, ValueError, IndexError) as exc:
            raise StoreError(f"record.lua answered {reply!r}") from exc
        if created and not listed:  # the hash was gone (Redis lost data, or it expired): list it again
            await self._index(usage, force=True)
        return recorded

    async def _index(self, usage: AggregateDelta, force: bool = False) -> bool:
        """List the event's aggregate hash in its day's index; True if written now. The index key
        has no hash tag (it spans subjects), so it cannot join the script: a process writes it once
        per hash and day, before the script, so a hash is never left unlisted, and again whenever
        the script says it had to create the hash."""
        member = index_member(usage.tag, usage.user, usage.team)
        if not force and (usage.day, member) in self._indexed:
            return False
        key = self._key(index_key(usage.day))
        client = await self._connect()
        try:
            pipe = client.pipeline(transaction=False)
            pipe.sadd(key, member)
            pipe.expire(key, AGG_TTL_SECONDS)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis index write failed: {exc}") from exc
        if len(self._indexed) >= 100_000:
            self._indexed.clear()
        self._indexed.add((usage.day, member))
        return True

    async def aggregates(self, days: tuple[str, ...], user: str | None = None,
                         team: str | None = None) -> tuple[AggregateRow, ...]:
        client = await self._connect()
        cells: list[tuple[str, str, str | None, str]] = []
        try:
            pipe = client.pipeline(transaction=False)
            for day in days:
                pipe.smembers(self._key(index_key(day)))
            for day, members in zip(days, await pipe.execute() if days else [], strict=True):
                for member in sorted(members):
                    tag, u, t = parse_index_member(member)
                    if (user is None or u == user) and (team is None or t == team):
                        cells.append((day, u, t, self._key(aggregate_key(tag, day, u, t))))
            pipe = client.pipeline(transaction=False)
            for cell in cells:
                pipe.hgetall(cell[3])
            hashes = await pipe.execute() if cells else []
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis aggregates read failed: {exc}") from exc
        rows: list[AggregateRow] = []
        for (day, u, t, _), fields in zip(cells, hashes, strict=True):
            rows += aggregate_rows(day, u, t, {_text(k): int(v) for k, v in fields.items()})
        return tuple(rows)

    async def put_key(self, key: StoredKey) -> None:
        record = json.dumps({"key_id": key.key_id, "digest": key.digest, "user": key.user,
                             "team": key.team, "plan": key.plan, "trusted": key.trusted,
                             "created": key.created})
        client = await self._connect()
        try:
            pipe = client.pipeline(transaction=False)
            pipe.hset(self._key(_KEYS_BY_ID), key.key_id, key.digest)
            pipe.hset(self._key(_KEYS_BY_DIGEST), key.digest, record)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis key write failed: {exc}") from exc

    async def get_key(self, digest: str) -> StoredKey | None:
        client = await self._connect()
        try:
            raw = await _awaited(client.hget(self._key(_KEYS_BY_DIGEST), digest))
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis key read failed: {exc}") from exc
        return None if raw is None else _stored_key(raw)

    async def list_keys(self) -> tuple[StoredKey, ...]:
        client = await self._connect()
        try:
            raw = await _awaited(client.hgetall(self._key(_KEYS_BY_DIGEST)))
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis key read failed: {exc}") from exc
        return tuple(sorted((_stored_key(v) for v in raw.values()), key=lambda k: k.created))

    async def revoke_key(self, key_id: str) -> StoredKey | None:
        client = await self._connect()
        try:
            digest = await _awaited(client.hget(self._key(_KEYS_BY_ID), key_id))
            if digest is None:
                return None
            raw = await _awaited(client.hget(self._key(_KEYS_BY_DIGEST), digest))
            pipe = client.pipeline(transaction=False)
            pipe.hdel(self._key(_KEYS_BY_DIGEST), digest)  # first: lookups go by digest
            pipe.hdel(self._key(_KEYS_BY_ID), key_id)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis key revoke failed: {exc}") from exc
        return None if raw is None else _stored_key(raw)

    async def append_events(self, events: Sequence[bytes], maxlen: int) -> None:
        """The ledger's Redis stream sink: XADD each event, the stream capped near `maxlen`
        (MAXLEN ~). At least once: a batch retried after a partial failure may repeat events,
        which carry their event_id for consumers to drop duplicates."""
        client = await self._connect()
        stream = self._key(LEDGER_STREAM)
        resp = self._resp
        if resp is not None:  # the lean connection: the batch goes out in one write, replies in order
            head = ("XADD", stream, "MAXLEN", "~", maxlen, "*", "event")
            conn = await resp.connection()
            # Futures, not tasks; no per-call retry: a failed batch is retried whole by the ledger.
            replies = await asyncio.gather(*[conn.send(pack((*head, event))) for event in events],
                                           return_exceptions=True)
            failed = next((r for r in replies if isinstance(r, BaseException)), None)
            if failed is not None:
                raise StoreError(f"redis stream write failed: {failed}") from failed
            return
        try:
            pipe = client.pipeline(transaction=False)
            for event in events:
                pipe.xadd(stream, {"event": event}, maxlen=maxlen, approximate=True)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis stream write failed: {exc}") from exc

    def stream_key(self) -> str:
        return self._key(LEDGER_STREAM)

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def _read(self, plan_: Plan, now: float) -> tuple[CounterView, ...]:
        """Read-only, so a plain pipeline (one trip per node) serves the admin API."""
        client = await self._connect()
        try:
            pipe = client.pipeline(transaction=False)
            for counter in plan_.counters:
                key = self._key(counter.key)
                if counter.kind is CounterKind.WINDOW:
                    pipe.hgetall(key)
                elif counter.kind is CounterKind.PERIOD:
                    pipe.get(key)
                else:
                    pipe.zcount(key, f"({_fmt(now)}", "+inf")
            replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis usage read failed: {exc}") from exc
        return tuple(_view(c, r, now) for c, r in zip(plan_.counters, replies, strict=True))

    async def _run(self, script: _Script, keys: list[str], args: list[str | int]) -> Any:
        resp = self._resp
        if resp is None:
            client = await self._connect()
            resp = self._resp
            if resp is None:  # Redis Cluster, TLS or an unusual URL: redis-py
                if isinstance(client, Redis):
                    # Script calls made in the same event-loop turn share one pipelined round trip.
                    return await self._batch.call(client, script, keys, args)
                return await self._run_one(client, script, keys, args)
        try:
            return await resp.call(pack(("EVALSHA", script.sha, len(keys), *keys, *args)))
        except NoScript:
            # Redis restarted or failed over and lost its script cache: EVAL reloads it.
            return await resp.call(pack(("EVAL", script.source, len(keys), *keys, *args)))

    async def _run_one(self, client: Redis | RedisCluster, script: _Script, keys: list[str],
                       args: list[str | int]) -> Any:
        try:
            try:
                return await _awaited(client.evalsha(script.sha, len(keys), *keys, *args))
            except NoScriptError:
                # Redis restarted or failed over and lost its script cache: EVAL reloads it.
                return await _awaited(client.eval(script.source, len(keys), *keys, *args))
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis script failed: {exc}") from exc

    async def _connect(self) -> Redis | RedisCluster:
        if self._client is not None:
            return self._client
        async with self._connecting:
            if self._client is None:
                client = await self._open()
                try:
                    self._resp = await self._open_resp(client)
                except BaseException:
                    await client.aclose()
                    raise
                self._client = client
            return self._client

    async def _open_resp(self, client: Redis | RedisCluster) -> RespClient | None:
        """Script calls, the hot path, get a lean pipelined connection of their own when the URL
        is a plain `redis://` or `unix://` one to a single server; the rest stays on redis-py."""
        endpoint = endpoint_from_url(self._url) if isinstance(client, Redis) else None
        if endpoint is None:
            return None
        resp = RespClient(endpoint, self._timeout)
        await resp.connection()  # fail `start` now, as redis-py's script load would
        return resp

    async def _open(self) -> Redis | RedisCluster:
        options: dict[str, Any] = {
            "socket_connect_timeout": self._timeout,
            "socket_timeout": self._timeout,
        }
        try:
            if self._cluster is None:
                self._cluster = await self._detect_cluster(options)
            client: Redis | RedisCluster
            if self._cluster:
                client = RedisCluster.from_url(
                    self._url, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2), **options)
                await client.initialize()
            else:
                # One quick retry heals a pooled connection Redis closed; no backoff, no hang.
                # Retrying a script is safe: admit.lua and record.lua are idempotent.
                client = Redis.from_url(self._url, retry=Retry(NoBackoff(), 1), **options)
            try:
                await _awaited(client.script_load(self._admit.source))
                await _awaited(client.script_load(self._record.source))
            except BaseException:
                await client.aclose()
                raise
        except (RedisError, OSError) as exc:
            raise StoreError(f"cannot connect to redis: {exc}") from exc
        return client

    async def _detect_cluster(self, options: dict[str, Any]) -> bool:
        probe = Redis.from_url(self._url, retry=Retry(NoBackoff(), 0), **options)
        try:
            info = await probe.info("cluster")
        finally:
            await probe.aclose()
        return bool(int(info.get("cluster_enabled", 0)))


LEDGER_STREAM = "ledger"
# Stored virtual keys: two hashes sharing one hash tag, digest -> key record and id -> digest.
_KEYS_BY_DIGEST = "{keys}:by-digest"
_KEYS_BY_ID = "{keys}:by-id"


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _stored_key(raw: str | bytes) -> StoredKey:
    d = json.loads(raw)
    return StoredKey(str(d["key_id"]), str(d["digest"]), str(d["user"]), d.get("team"), d.get("plan"),
                     bool(d.get("trusted")), float(d.get("created") or 0.0))


class _Batcher:
    """Auto-pipelining: script calls issued while the loop runs one turn go out together, in one
    pipeline (one write, one read) instead of one round trip each, which under load cuts redis-py's
    per-call CPU. Each call still gets its own reply or error; a lone call goes out alone."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._pending: list[tuple[_Script, list[str], list[str | int], asyncio.Future[Any]]] = []
        self._client: Redis | None = None

    def call(self, client: Redis, script: _Script, keys: list[str], args: list[str | int]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._client = client
        self._pending.append((script, keys, args, fut))
        return fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        client = self._client
        assert client is not None
        task = asyncio.get_running_loop().create_task(self._send(client, batch))
        task.add_done_callback(_ignore)

    async def _send(self, client: Redis,
                    batch: list[tuple[_Script, list[str], list[str | int], asyncio.Future[Any]]]) -> None:
        if len(batch) == 1:
            script, keys, args, fut = batch[0]
            try:
                result = await self._store._run_one(client, script, keys, args)
            except StoreError as exc:
                _settle_future(fut, exc=exc)
            else:
                _settle_future(fut, result)
            return
        try:
            pipe = client.pipeline(transaction=False)
            for script, keys, args, _ in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            for *_, fut in batch:
                _settle_future(fut, exc=StoreError(f"redis script failed: {exc}"))
            return
        for (script, keys, args, fut), result in zip(batch, results, strict=True):
            if isinstance(result, NoScriptError):  # the script cache was lost: this one alone, by EVAL
                try:
                    result = await self._store._run_one(client, script, keys, args)
                except StoreError as exc:
                    _settle_future(fut, exc=exc)
                    continue
            if isinstance(result, Exception):
                _settle_future(fut, exc=StoreError(f"redis script failed: {result}"))
            else:
                _settle_future(fut, result)


def _settle_future(fut: asyncio.Future[Any], result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():  # the caller gave up (its timeout): nothing to hand over
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _ignore(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _awaited(reply: Awaitable[Any] | Any) -> Awaitable[Any]:
    """redis-py types replies as `Awaitable[T] | T` for sync and async clients alike."""
    return cast(Awaitable[Any], reply)


def _view(counter: Counter, reply: Any, now: float) -> CounterView:
    if counter.kind is CounterKind.WINDOW:
        buckets = {int(s): int(v) for s, v in (reply or {}).items()}
        return window_view(buckets, now)
    return CounterView(int(reply or 0))
