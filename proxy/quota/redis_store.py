"""The quota store shared by many proxy replicas: one Redis or Redis Cluster, one Lua script call
per admit and per settle, every redis error re-raised as `StoreError`.

A plain `redis://` or `unix://` URL to one server is served entirely by the lean RESP connection
(`resp`); Redis Cluster, TLS and URLs with options go through redis-py (`redis_py`).
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections.abc import Coroutine, Sequence
from datetime import UTC, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from proxy.errors import StoreError
from proxy.quota.counters import (
    AGG_TTL_SECONDS,
    SEEN_TTL_SECONDS,
    SHAPE_CACHE_MAX,
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
    reservation_of,
    seen_key,
    window_view,
)
from proxy.quota.layout import Layouts, Seen, passing_states
from proxy.quota.redis_direct import ScriptLayout, admit_args, read_admit_reply, settle_args
from proxy.quota.resp import (
    Command,
    ConnectionLost,
    Endpoint,
    NoScript,
    RespClient,
    endpoint_from_url,
    pack,
)
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

if TYPE_CHECKING:
    from proxy.quota.redis_py import PyClient

# Aggregate hashes remembered as listed, per day: as many subjects as the other per-subject caches
# hold (a bound below the active subjects would re-list, one extra round trip, on every settle).
_INDEXED_MAX = SHAPE_CACHE_MAX
_SCRIPTS = Path(__file__).with_name("scripts")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Script:
    """A Lua file, its SHA1 computed here so EVALSHA works before SCRIPT LOAD ever answered."""

    def __init__(self, name: str) -> None:
        # By path: the package ships as files (pyproject's package-data).
        self.source = (_SCRIPTS / name).read_text("utf-8")
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
    """Quota counters in Redis (`redis://`, `rediss://`, `unix://`) or Redis Cluster.

    `cluster`: True/False, or None to take `?cluster=true|false` from the URL, else to ask the
    server (`INFO cluster`) when first connecting. Every key starts with `prefix` and then the
    admission's hash tag `{tag}`, so one script's keys share a cluster slot. The scripts run on
    the proxy's clock (`now` in each call), not Redis's. Socket timeouts are short so a dead Redis
    fails a request in well under a second or two instead of hanging it. If Redis is down at
    `start`, it raises `StoreError`; later calls try to connect again. A plain URL to a single
    server takes one lean pipelined connection (`resp`) for every command; Redis Cluster, TLS and
    URLs with options use redis-py.
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
        self._resp: RespClient | None = None  # plain Redis: the one connection for everything
        self._py: PyClient | None = None  # otherwise redis-py
        self._connecting = asyncio.Lock()  # a burst before the first connect opens one client
        self._admit = Script("admit.lua")
        self._record = Script("record.lua")
        self._indexed: dict[str, set[str]] = {}  # day -> members this process put in that day's index
        self._retrying: set[asyncio.Task[Any]] = set()  # a settle's re-listing, held until done (weak refs otherwise)
        self._layouts: Layouts[ScriptLayout] = Layouts(tz, prefix, ScriptLayout)  # per subject: its keys and script arguments

    @property
    def bounds_own_calls(self) -> bool:
        # The lean connection fails every waiting call when Redis stays silent for the timeout
        # (and connects within it); redis-py (Cluster, TLS) is bounded by the gate instead.
        return self._py is None

    async def start(self) -> None:
        await self._connect()

    async def close(self) -> None:
        resp, self._resp = self._resp, None
        py, self._py = self._py, None
        if resp is not None:
            resp.close()
        if py is not None:
            await py.close()

    async def ping(self) -> bool:
        try:
            conn = await self._connect()
            if isinstance(conn, RespClient):
                return bool(await conn.call(pack(("PING",))) == b"PONG")
            return await conn.ping()
        except StoreError:
            return False

    async def admit(self, admission: Admission) -> Decision:
        layout, keys, args, added = self._admit_call(admission)
        return self._decision(admission, layout, added, await self._run(self._admit, keys, args))

    def admit_soon(self, admission: Admission) -> Coroutine[Any, Any, Decision] | None:
        """`admit` with its command sent now: await the coroutine returned for the decision. It
        fails as `admit` does (a lost script is reloaded and a lost connection reopened once, the
        same way); None, having sent nothing, unless the lean connection is open."""
        conn = self._resp.open_connection() if self._resp is not None else None
        if conn is None:
            return None
        layout, keys, args, added = self._admit_call(admission)
        sent = conn.send(pack(("EVALSHA", self._admit.sha, len(keys), *keys, *args)))
        return self._admitted(admission, layout, added, sent)

    async def _admitted(self, admission: Admission, layout: ScriptLayout, added: list[int],
                        sent: asyncio.Future[Any]) -> Decision:
        # Awaits the reply itself: a future resolved from the reply's callback would cost the
        # request one more turn of the loop.
        try:
            reply = await sent
        except (NoScript, ConnectionLost):  # the general call reloads the script, or reconnects
            return await self.admit(admission)
        return self._decision(admission, layout, added, reply)

    def _admit_call(self, admission: Admission) -> tuple[ScriptLayout, list[str], list[str | int], list[int]]:
        """admit.lua's keys and arguments (and the layout and count the reply is read with)."""
        if admission.tokens < 0 or admission.cost_micro_usd < 0:
            raise ValueError("an admission cannot reserve negative tokens or cost")
        layout = self._layouts.get(admission.limits, admission.tag, admission.day, admission.month,
                                   admission.lease_seconds, admission.slot)
        args, added = admit_args(layout, admission)
        keys = [layout.record_prefix + admission.request_id, *layout.keys]  # the record: self._key(record_key(...))
        return layout, keys, args, added

    def _decision(self, admission: Admission, layout: ScriptLayout, added: list[int], reply: Any) -> Decision:
        try:
            admitted, seen, frees, replayed = read_admit_reply(reply, added)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"admit.lua answered {reply!r}") from exc
        if admitted and not replayed:
            decision = self._admit_direct(layout, admission, seen)
            if decision is not None:
                return decision
        # Refused, shadow-refused or replayed: the general path says which and why.
        periods = Periods.of(admission.day, admission.month, self._tz)
        plan_ = admission_plan(admission)
        views = tuple(CounterView(used, oldest) for used, oldest, _ in seen)
        if replayed:
            return replayed_decision(admission, plan_, views, periods)
        decision = decide(admission, plan_, views, frees, periods)
        if decision.admitted != admitted:
            raise StoreError("admit.lua and the client disagree on the decision")
        return decision

    def _admit_direct(self, layout: ScriptLayout, admission: Admission, seen: list[Seen]) -> Decision | None:
        """The admitted decision when every limit passed, without the general path's objects."""
        states = passing_states(layout, seen, admission.now)
        if states is None:
            return None
        return Decision(True, reservation_of(admission, layout), tuple(states), None, 0.0, ())

    async def settle(self, reservation: Reservation, tokens: int, cost_micro_usd: int,
                     now: float) -> bool:
        layout = self._layouts.of_reservation(reservation)
        record = layout.record_prefix + reservation.request_id  # self._key(record_key(...))
        # record.lua with no seen marker and no aggregate fields is the plain settle; the record
        # key stands in for the two keys it then does not touch (same hash tag).
        keys = [record, record, record, *layout.keys]
        args: list[str | int] = [_fmt(now), reservation.request_id, 0, 0, len(layout.keys), 0]
        args += settle_args(layout, reservation, tokens, cost_micro_usd)
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
        layout = self._layouts.of_reservation(reservation) if reservation is not None else None
        aggregate, member = self._aggregate_of(usage, layout)
        keys, args = self._record_call(reservation, usage, now, layout, aggregate)
        listed = False if self._listed(usage.day, member) else await self._index(usage)
        recorded, created = _recorded(await self._run(self._record, keys, args))
        if created and not listed:  # the hash was gone (Redis lost data, or it expired): list it again
            await self._index(usage, force=True)
        return recorded

    def settle_and_record_soon(self, reservation: Reservation | None, usage: AggregateDelta,
                               now: float) -> asyncio.Future[bool] | None:
        """`settle_and_record` as a command sent now, its reply in the future returned: no
        coroutine, no task. Only on the open lean connection and once the day index lists the
        event's hash; None otherwise, having sent nothing. One attempt: a caller that sees it
        fail runs `settle_and_record` (record.lua applies an event once, however often sent)."""
        conn = self._resp.open_connection() if self._resp is not None else None
        if conn is None:
            return None
        layout = self._layouts.of_reservation(reservation) if reservation is not None else None
        aggregate, member = self._aggregate_of(usage, layout)
        if not self._listed(usage.day, member):
            return None
        keys, args = self._record_call(reservation, usage, now, layout, aggregate)
        sent = conn.send(pack(("EVALSHA", self._record.sha, len(keys), *keys, *args)))
        out: asyncio.Future[bool] = sent.get_loop().create_future()
        sent.add_done_callback(functools.partial(self._soon_recorded, usage, out))
        return out

    def _soon_recorded(self, usage: AggregateDelta, out: asyncio.Future[bool], sent: asyncio.Future[Any]) -> None:
        if out.done():
            return
        try:
            recorded, created = _recorded(sent.result())
        except BaseException as exc:  # StoreError, NoScript, ConnectionLost, a cancel: the caller's
            out.set_exception(exc)
            return
        if not created:
            out.set_result(recorded)
            return
        # The hash was gone (Redis lost data, or it expired): list it again before saying done.
        task = sent.get_loop().create_task(self._relisted(usage, recorded))
        self._retrying.add(task)
        task.add_done_callback(functools.partial(_chain, self._retrying, out))

    async def _relisted(self, usage: AggregateDelta, recorded: bool) -> bool:
        await self._index(usage, force=True)
        return recorded

    def _aggregate_of(self, usage: AggregateDelta, layout: ScriptLayout | None) -> tuple[str, str]:
        """The event's aggregate hash (prefixed) and its member in the day's index. A reservation's
        layout (one subject's for one day) holds its subject's, so a settle does not look them up
        among every subject's."""
        if layout is not None:
            held: tuple[str, str] | None = layout.held_aggregate(usage)
            if held is not None:
                return held
        names = (self._key(aggregate_key(usage.tag, usage.day, usage.user, usage.team)),
                 index_member(usage.tag, usage.user, usage.team))
        if layout is not None:
            layout.hold_aggregate(usage, names)
        return names

    def _record_call(self, reservation: Reservation | None, usage: AggregateDelta, now: float,
                     layout: ScriptLayout | None, aggregate: str) -> tuple[list[str], list[str | int]]:
        """record.lua's keys and arguments for one finished request (and its reservation, whose
        layout is `layout`), adding to the `aggregate` hash."""
        if reservation is not None and reservation.tag != usage.tag:
            raise ValueError("a usage event must carry its reservation's hash tag")
        request_id = reservation.request_id if reservation is not None else usage.event_id
        if layout is not None:
            keys = [layout.seen_prefix + usage.event_id, layout.record_prefix + request_id, aggregate]
        else:
            keys = [self._key(seen_key(usage.tag, usage.event_id)), self._key(record_key(usage.tag, request_id)),
                    aggregate]
        fields = aggregate_fields(usage)
        args: list[str | int] = [_fmt(now), request_id, SEEN_TTL_SECONDS, AGG_TTL_SECONDS, 0, len(fields)]
        if reservation is not None and layout is not None:
            keys += layout.keys
            args[4] = len(layout.keys)
            args += settle_args(layout, reservation, usage.totals.tokens, usage.totals.cost_micro_usd)
        for name, value in fields:
            args += [name, value]
        return keys, args

    async def _index(self, usage: AggregateDelta, force: bool = False) -> bool:
        """List the event's aggregate hash in its day's index; True if written now. The index key
        has no hash tag (it spans subjects), so it cannot join the script: a process writes it once
        per hash and day, before the script, so a hash is never left unlisted, and again whenever
        the script says it had to create the hash."""
        member = index_member(usage.tag, usage.user, usage.team)
        if not force and self._listed(usage.day, member):
            return False
        key = self._key(index_key(usage.day))
        await self._commands([("SADD", key, member), ("EXPIRE", key, AGG_TTL_SECONDS)], "index write")
        listed = self._indexed.get(usage.day)
        if listed is None:
            listed = self._indexed[usage.day] = set()
            # The two newest days (requests admitted before midnight settle after it); a late
            # event for an older day is listed but not remembered.
            for day in sorted(self._indexed)[:-2]:
                del self._indexed[day]
        elif len(listed) >= _INDEXED_MAX:
            listed.clear()  # forgetting only costs a re-listing (one SADD) per hash
        listed.add(member)
        return True

    def _listed(self, day: str, member: str) -> bool:
        """Whether this process already put an aggregate hash (its index `member`) in the day's index."""
        listed = self._indexed.get(day)
        return listed is not None and member in listed

    async def aggregates(self, days: tuple[str, ...], user: str | None = None,
                         team: str | None = None) -> tuple[AggregateRow, ...]:
        what = "aggregates read"
        indexes = await self._commands([("SMEMBERS", self._key(index_key(day))) for day in days], what)
        cells: list[tuple[str, str, str | None, str]] = []
        for day, members in zip(days, indexes, strict=True):
            for member in sorted(members):
                tag, u, t = parse_index_member(member)
                if (user is None or u == user) and (team is None or t == team):
                    cells.append((day, u, t, self._key(aggregate_key(tag, day, u, t))))
        hashes = await self._commands([("HGETALL", cell[3]) for cell in cells], what)
        rows: list[AggregateRow] = []
        for (day, u, t, _), fields in zip(cells, hashes, strict=True):
            rows += aggregate_rows(day, u, t, {_text(k): int(v) for k, v in _hash(fields).items()})
        return tuple(rows)

    async def put_key(self, key: StoredKey) -> None:
        record = json.dumps({"key_id": key.key_id, "digest": key.digest, "user": key.user,
                             "team": key.team, "plan": key.plan, "trusted": key.trusted,
                             "created": key.created})
        await self._commands([("HSET", self._key(_KEYS_BY_ID), key.key_id, key.digest),
                              ("HSET", self._key(_KEYS_BY_DIGEST), key.digest, record)], "key write")

    async def get_key(self, digest: str) -> StoredKey | None:
        [raw] = await self._commands([("HGET", self._key(_KEYS_BY_DIGEST), digest)], "key read")
        return None if raw is None else _stored_key(raw)

    async def list_keys(self) -> tuple[StoredKey, ...]:
        [raw] = await self._commands([("HGETALL", self._key(_KEYS_BY_DIGEST))], "key read")
        return tuple(sorted((_stored_key(v) for v in _hash(raw).values()), key=lambda k: k.created))

    async def revoke_key(self, key_id: str) -> StoredKey | None:
        what = "key revoke"
        [digest] = await self._commands([("HGET", self._key(_KEYS_BY_ID), key_id)], what)
        if digest is None:
            return None
        [raw] = await self._commands([("HGET", self._key(_KEYS_BY_DIGEST), digest)], what)
        await self._commands([("HDEL", self._key(_KEYS_BY_DIGEST), digest),  # first: lookups go by digest
                              ("HDEL", self._key(_KEYS_BY_ID), key_id)], what)
        return None if raw is None else _stored_key(raw)

    async def append_events(self, events: Sequence[bytes], maxlen: int) -> None:
        """The ledger's Redis stream sink: XADD each event, the stream capped near `maxlen`
        (MAXLEN ~). At least once: a batch retried after a partial failure may repeat events,
        which carry their event_id for consumers to drop duplicates. The batch goes out in one
        write, and is not retried here: the ledger retries a failed batch whole."""
        stream = self._key(LEDGER_STREAM)
        await self._commands([("XADD", stream, "MAXLEN", "~", maxlen, "*", "event", event)
                              for event in events], "stream write", retry=False)

    def stream_key(self) -> str:
        return self._key(LEDGER_STREAM)

    def _key(self, key: str) -> str:
        return self._prefix + key

    async def _read(self, plan_: Plan, now: float) -> tuple[CounterView, ...]:
        """Read-only, so a plain pipeline (one trip per node) serves the admin API."""
        commands: list[Command] = []
        for counter in plan_.counters:
            key = self._key(counter.key)
            if counter.kind is CounterKind.WINDOW:
                commands.append(("HGETALL", key))
            elif counter.kind is CounterKind.PERIOD:
                commands.append(("GET", key))
            else:
                commands.append(("ZCOUNT", key, f"({_fmt(now)}", "+inf"))
        replies = await self._commands(commands, "usage read")
        return tuple(_view(c, r, now) for c, r in zip(plan_.counters, replies, strict=True))

    async def _commands(self, commands: list[Command], what: str, *, retry: bool = True) -> list[Any]:
        """Commands sent together (one pipeline), their replies in order; any failure is a
        `StoreError` naming `what`. `retry`: once more if the connection closed under them (the
        lean connection; redis-py has its own retry policy)."""
        conn = self._resp or await self._connect()
        if not commands:
            return []
        try:
            if isinstance(conn, RespClient):
                return await conn.call_many([pack(c) for c in commands], retry=retry)
            return await conn.run(commands)
        except StoreError as exc:
            raise StoreError(f"redis {what} failed: {exc}") from exc

    async def _run(self, script: Script, keys: list[str], args: list[str | int]) -> Any:
        resp = self._resp
        if resp is None:
            conn = await self._connect()
            if not isinstance(conn, RespClient):  # Redis Cluster, TLS or an unusual URL
                return await conn.script(script, keys, args)
            resp = conn
        try:
            return await resp.call(pack(("EVALSHA", script.sha, len(keys), *keys, *args)))
        except NoScript:
            # Redis restarted or failed over and lost its script cache: EVAL reloads it.
            return await resp.call(pack(("EVAL", script.source, len(keys), *keys, *args)))

    async def _connect(self) -> RespClient | PyClient:
        conn = self._resp or self._py
        if conn is not None:
            return conn
        async with self._connecting:
            conn = self._resp or self._py
            if conn is None:
                endpoint = None if self._cluster else endpoint_from_url(self._url)
                self._resp = await self._open_resp(endpoint) if endpoint is not None else None
                if self._resp is None:  # not a plain URL, or the server is a cluster node
                    # Imported only now: a plain URL never needs it.
                    from proxy.quota.redis_py import open_py

                    self._py, self._cluster = await open_py(self._url, self._cluster, self._timeout,
                                                            (self._admit, self._record))
                conn = self._resp or self._py
            assert conn is not None
            return conn

    async def _open_resp(self, endpoint: Endpoint) -> RespClient | None:
        """The lean connection, scripts loaded; None if the server turns out to be in cluster
        mode (asked only when neither the caller nor the URL said)."""
        resp = RespClient(endpoint, self._timeout)
        try:
            if self._cluster is None:
                self._cluster = _cluster_enabled(await resp.call(pack(("INFO", "cluster"))))
                if self._cluster:
                    resp.close()
                    return None
            await resp.call_many([pack(("SCRIPT", "LOAD", s.source)) for s in (self._admit, self._record)])
        except BaseException:  # StoreError for a failed connect, AUTH, SELECT or reply
            resp.close()
            raise
        return resp

def _cluster_enabled(info: bytes) -> bool:
    """`cluster_enabled:N` from an `INFO cluster` reply."""
    for line in info.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition(":")
        if name == "cluster_enabled":
            return bool(int(value))
    return False


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


def _chain(held: set[asyncio.Task[Any]], out: asyncio.Future[Any], task: asyncio.Task[Any]) -> None:
    """A follow-up task's outcome becomes `out`'s (unless its caller gave up on it)."""
    held.discard(task)
    if out.done():
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning
        return
    if task.cancelled():
        out.set_exception(StoreError("redis call cancelled"))
    elif (exc := task.exception()) is not None:
        out.set_exception(exc)
    else:
        out.set_result(task.result())


def _recorded(reply: Any) -> tuple[bool, bool]:
    """record.lua's reply: (the event was recorded now, its aggregate hash had to be created)."""
    try:
        return bool(int(reply[0])), bool(int(reply[2]))
    except (TypeError, ValueError, IndexError) as exc:
        raise StoreError(f"record.lua answered {reply!r}") from exc


def _hash(reply: Any) -> dict[Any, Any]:
    """A hash reply as a dict: redis-py makes one, the lean connection gives the flat
    field, value, ... list of RESP2."""
    if isinstance(reply, dict):
        return reply
    pairs = iter(reply or ())
    return dict(zip(pairs, pairs, strict=True))


def _view(counter: Counter, reply: Any, now: float) -> CounterView:
    if counter.kind is CounterKind.WINDOW:
        buckets = {int(s): int(v) for s, v in _hash(reply).items() if s.isdigit()}  # not 't' or 'o'
        return window_view(buckets, now)
    return CounterView(int(reply or 0))
