"""redis-py, for what the lean RESP connection (`resp`) does not speak: Redis Cluster, TLS and
URLs with options. redis-py itself (about 5 MiB of resident memory) is imported only when used.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from proxy.errors import StoreError
from proxy.quota.resp import Command

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster


class LuaScript(Protocol):
    source: str
    sha: str


async def open_py(url: str, cluster: bool | None, timeout: float,
                  scripts: Sequence[LuaScript]) -> tuple[PyClient, bool]:
    """A redis-py client for `url` with `scripts` loaded, and whether it is Redis Cluster (asked
    of the server when `cluster` is None). Any failure is a `StoreError`."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.exceptions import RedisError

    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
    }
    try:
        if cluster is None:
            cluster = await _detect_cluster(url, options)
        client: Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(
                url, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2), **options)
            await client.initialize()
        else:
            # One quick retry heals a pooled connection Redis closed; no backoff, no hang.
            # Retrying a script is safe: admit.lua and record.lua are idempotent.
            client = Redis.from_url(url, retry=Retry(NoBackoff(), 1), **options)
        try:
            for script in scripts:
                await awaited(client.script_load(script.source))
        except BaseException:
            await client.aclose()
            raise
    except (RedisError, OSError) as exc:
        raise StoreError(f"cannot connect to redis: {exc}") from exc
    return PyClient(client), cluster


async def _detect_cluster(url: str, options: dict[str, Any]) -> bool:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    probe = Redis.from_url(url, retry=Retry(NoBackoff(), 0), **options)
    try:
        info = await probe.info("cluster")
    finally:
        await probe.aclose()
    return bool(int(info.get("cluster_enabled", 0)))


class PyClient:
    """redis-py, for what the lean connection does not speak: Redis Cluster, TLS, URLs with
    options. Its errors come out as `StoreError`."""

    def __init__(self, client: Redis | RedisCluster) -> None:
        from redis.asyncio import Redis
        from redis.exceptions import NoScriptError, RedisError

        self.client = client
        self.errors: tuple[type[Exception], ...] = (RedisError, OSError)
        self.no_script: type[Exception] = NoScriptError
        # Plain Redis: script calls made in the same event-loop turn share one pipelined round trip.
        self._batch = _Batcher(self, client) if isinstance(client, Redis) else None

    async def run(self, commands: Sequence[Command]) -> list[Any]:
        try:
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return cast(list[Any], await pipe.execute())
        except self.errors as exc:
            raise StoreError(str(exc)) from exc

    async def script(self, script: LuaScript, keys: list[str], args: list[str | int]) -> Any:
        if self._batch is not None:
            return await self._batch.call(script, keys, args)
        return await self.script_one(script, keys, args)

    async def script_one(self, script: LuaScript, keys: list[str], args: list[str | int]) -> Any:
        client = self.client
        try:
            try:
                return await awaited(client.evalsha(script.sha, len(keys), *keys, *args))
            except self.no_script:
                # Redis restarted or failed over and lost its script cache: EVAL reloads it.
                return await awaited(client.eval(script.source, len(keys), *keys, *args))
        except self.errors as exc:
            raise StoreError(f"redis script failed: {exc}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await awaited(self.client.ping()))
        except self.errors as exc:
            raise StoreError(str(exc)) from exc

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except self.errors as exc:
            raise StoreError(f"closing redis: {exc}") from exc


class _Batcher:
    """Auto-pipelining: script calls issued while the loop runs one turn go out together, in one
    pipeline (one write, one read) instead of one round trip each, which under load cuts redis-py's
    per-call CPU. Each call still gets its own reply or error; a lone call goes out alone."""

    def __init__(self, owner: PyClient, client: Redis) -> None:
        self._owner = owner
        self._client = client
        self._pending: list[tuple[LuaScript, list[str], list[str | int], asyncio.Future[Any]]] = []

    def call(self, script: LuaScript, keys: list[str], args: list[str | int]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((script, keys, args, fut))
        return fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        task.add_done_callback(_ignore)

    async def _send(self, batch: list[tuple[LuaScript, list[str], list[str | int], asyncio.Future[Any]]]) -> None:
        owner = self._owner
        if len(batch) == 1:
            script, keys, args, fut = batch[0]
            try:
                result = await owner.script_one(script, keys, args)
            except StoreError as exc:
                _settle_future(fut, exc=exc)
            else:
                _settle_future(fut, result)
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for script, keys, args, _ in batch:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
        except owner.errors as exc:
            for *_, fut in batch:
                _settle_future(fut, exc=StoreError(f"redis script failed: {exc}"))
            return
        for (script, keys, args, fut), result in zip(batch, results, strict=True):
            if isinstance(result, owner.no_script):  # the script cache was lost: this one alone, by EVAL
                try:
                    result = await owner.script_one(script, keys, args)
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


def awaited(reply: Awaitable[Any] | Any) -> Awaitable[Any]:
    """redis-py types replies as `Awaitable[T] | T` for sync and async clients alike."""
    return cast(Awaitable[Any], reply)


