"""The lean RESP client behind the Redis store, against real redis-servers: pipelining and reply
order, error replies, NOSCRIPT, AUTH and SELECT from the URL, a killed, hung or restarted server,
callers that give up, a plain URL's store never importing redis-py, and the store falling back
to redis-py for other URLs.
"""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redisproc import RedisProc, start_redis, start_socket_redis

from proxy.errors import StoreError
from proxy.quota.redis_store import RedisStore
from proxy.quota.resp import (
    ConnectionLost,
    Endpoint,
    NoScript,
    RespClient,
    endpoint_from_url,
    pack,
)
from proxy.quota.store import Admission, Limit, LimitName

T0 = 1_900_000_000.25
LIMIT = Limit(scope="user:al", name=LimitName.RPM, value=1000)


def admission(now: float = T0) -> Admission:
    return Admission(uuid.uuid4().hex, "team-a", (LIMIT,), 10, 10, now, "2030-03-17", "2030-03")


def client_for(server: RedisProc, timeout: float = 0.5) -> RespClient:
    endpoint = endpoint_from_url(server.url)
    assert endpoint is not None
    return RespClient(endpoint, timeout)


@pytest.fixture
async def resp(redis_server: RedisProc) -> AsyncIterator[RespClient]:
    client = client_for(redis_server)
    yield client
    client.close()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisProc]:
    """A server of the test's own, to kill, pause or lock with a password."""
    server = start_redis(tmp_path, external=False)
    yield server
    server.stop()


def test_urls_that_the_lean_client_takes_and_those_left_to_redis_py() -> None:
    assert endpoint_from_url("redis://h:7000/3") == Endpoint("h", 7000, db=3)
    assert endpoint_from_url("redis://h") == Endpoint("h", 6379)
    assert endpoint_from_url("redis://:p%40ss@h:1/0") == Endpoint("h", 1, password="p@ss")
    assert endpoint_from_url("redis://u:pw@h:1?db=2") == Endpoint("h", 1, username="u",
                                                                   password="pw", db=2)
    assert endpoint_from_url("unix:///run/redis.sock?db=4") == Endpoint(path="/run/redis.sock", db=4)
    for url in ("rediss://h:1/0", "redis://h:1/0?health_check_interval=5", "redis://h:1/x",
                "redis://h:99999/0", "unix://", "valkey://h:1"):
        assert endpoint_from_url(url) is None, url


async def test_many_calls_in_flight_on_one_connection_each_get_their_own_reply(
    resp: RespClient,
) -> None:
    replies = await asyncio.gather(*(resp.call(pack(("ECHO", f"call-{i}"))) for i in range(200)),
                                   *(resp.call(pack(("CLIENT", "ID"))) for _ in range(20)))
    assert replies[:200] == [f"call-{i}".encode() for i in range(200)]
    assert len(set(replies[200:])) == 1  # one connection carried them all


async def test_error_replies_raise_and_leave_the_connection_usable(resp: RespClient) -> None:
    key = f"t:{uuid.uuid4().hex}"
    await resp.call(pack(("SET", key, "abc")))
    calls = [resp.call(pack(("INCR", key))), resp.call(pack(("EVALSHA", "0" * 40, 0))),
             resp.call(pack(("GET", key)))]
    bad_int, no_script, value = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(bad_int, StoreError) and not isinstance(bad_int, NoScript)
    assert "not an integer" in str(bad_int)
    assert isinstance(no_script, NoScript) and isinstance(no_script, StoreError)
    assert value == b"abc"
    assert await resp.call(pack(("EVAL", "return {1, ARGV[1], {KEYS[1]}}", 1, "k", 2.5))) == [
        1, b"2.5", [b"k"]]


async def test_store_reloads_scripts_the_server_forgot(redis_server: RedisProc) -> None:
    store = RedisStore(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    observer = Redis.from_url(redis_server.url)
    await store.start()
    try:
        assert store._resp is not None  # a plain URL takes the lean path
        assert (await store.admit(admission())).admitted
        await observer.script_flush()
        decisions = await asyncio.gather(*(store.admit(admission()) for _ in range(20)))
        assert all(d.admitted for d in decisions)
        assert decisions[-1].states[0].used == 21
        assert await observer.script_exists(store._admit.sha) == [True]
    finally:
        await observer.aclose()
        await store.close()


async def test_auth_and_db_come_from_the_url(own_server: RedisProc) -> None:
    admin = Redis.from_url(own_server.url)
    await admin.acl_setuser("meter", enabled=True, passwords=["+meter-pw"], keys=["*"],
                            commands=["+@all"])
    await admin.config_set("requirepass", "s3cret")  # the default user's password
    await admin.aclose()
    port = own_server.port
    admin = Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/0")
    try:
        default = RespClient(Endpoint(port=port, password="s3cret", db=3), 0.5)
        named = endpoint_from_url(f"redis://meter:meter-pw@127.0.0.1:{port}/5")
        assert named is not None
        user = RespClient(named, 0.5)
        assert await default.call(pack(("SET", "where", "db3"))) == b"OK"
        assert await user.call(pack(("SET", "where", "db5"))) == b"OK"
        assert await user.call(pack(("ACL", "WHOAMI"))) == b"meter"
        default.close()
        user.close()
        await admin.select(3)
        assert await admin.get("where") == b"db3"
        await admin.select(5)
        assert await admin.get("where") == b"db5"
        for wrong in (Endpoint(port=port, password="nope"), Endpoint(port=port)):
            client = RespClient(wrong, 0.5)
            with pytest.raises(StoreError, match="WRONGPASS|NOAUTH"):
                await client.call(pack(("SET", "k", "v")))
            client.close()
        # The whole store on that URL, every command on the lean connection.
        store = RedisStore(f"redis://:s3cret@127.0.0.1:{port}/7", prefix="auth:")
        await store.start()
        try:
            assert store._resp is not None
            res = (await store.admit(admission())).reservation
            assert res is not None and await store.settle(res, 1, 1, T0 + 1)
            assert [s.used for s in await store.usage((LIMIT,), "team-a", T0 + 1, "2030-03-17",
                                                        "2030-03")] == [1]
        finally:
            await store.close()
        await admin.select(7)
        assert await admin.keys("auth:*")
    finally:
        await admin.aclose()


async def test_unix_socket(tmp_path: Path) -> None:
    server, sock = start_socket_redis(tmp_path)
    store = RedisStore(f"unix://{sock}?db=2", prefix="unix:")
    try:
        await store.start()
        assert store._resp is not None
        assert (await store.admit(admission())).admitted
    finally:
        await store.close()
        server.stop()


async def test_unusual_urls_keep_redis_py(redis_server: RedisProc) -> None:
    store = RedisStore(redis_server.url + "?health_check_interval=30", prefix=f"t{uuid.uuid4().hex[:8]}:")
    await store.start()
    try:
        assert store._resp is None
        decisions = await asyncio.gather(*(store.admit(admission()) for _ in range(10)))
        assert [d.states[0].used for d in decisions] == list(range(1, 11))
    finally:
        await store.close()


async def test_server_killed_mid_flight_fails_every_call_then_reconnects(
    own_server: RedisProc,
) -> None:
    client = client_for(own_server, timeout=3.0)
    try:
        assert await client.call(pack(("PING",))) == b"PONG"
        own_server.pause()  # the calls below go out and wait for replies
        calls = [asyncio.ensure_future(client.call(pack(("INCR", "n")))) for _ in range(50)]
        await asyncio.sleep(0.1)
        assert not any(c.done() for c in calls)
        started = time.monotonic()
        own_server.kill()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert time.monotonic() - started < 1  # the closed connection, not the 3 s read timeout
        assert all(isinstance(r, StoreError) for r in results), results
        with pytest.raises(StoreError, match="cannot connect"):
            await client.call(pack(("PING",)))
        own_server.spawn()
        assert await client.call(pack(("INCR", "n"))) == 1  # an empty server: none went through
    finally:
        client.close()


async def test_hung_server_fails_calls_after_the_timeout_then_reconnects(
    own_server: RedisProc,
) -> None:
    client = client_for(own_server, timeout=0.3)
    try:
        first_id = await client.call(pack(("CLIENT", "ID")))
        own_server.pause()
        try:
            started = time.monotonic()
            results = await asyncio.gather(*(client.call(pack(("PING",))) for _ in range(10)),
                                           return_exceptions=True)
            assert 0.25 < time.monotonic() - started < 1
            assert all(isinstance(r, StoreError) and not isinstance(r, ConnectionLost)
                       for r in results), results
        finally:
            own_server.resume()
        assert await client.call(pack(("CLIENT", "ID"))) != first_id  # a fresh connection
    finally:
        client.close()


async def test_a_call_cut_off_by_the_server_is_retried_once(own_server: RedisProc) -> None:
    client = client_for(own_server, timeout=3.0)
    admin = Redis.from_url(own_server.url)
    try:
        await client.call(pack(("PING",)))
        blocked = asyncio.ensure_future(client.call(pack(("BLPOP", "q", 2))))
        await asyncio.sleep(0.1)
        assert await admin.client_kill_filter(_type="normal", skipme=True) == 1
        await asyncio.sleep(0.1)  # the retry now waits on a new connection
        await admin.rpush("q", "x")
        assert await blocked == [b"q", b"x"]
        blocked = asyncio.ensure_future(client.call(pack(("BLPOP", "q", 2))))
        for _ in range(2):  # cut off twice: no third try
            await asyncio.sleep(0.1)
            assert await admin.client_kill_filter(_type="normal", skipme=True) == 1
        with pytest.raises(ConnectionLost):
            await blocked
    finally:
        await admin.aclose()
        client.close()


async def test_callers_that_give_up_do_not_shift_replies(own_server: RedisProc) -> None:
    client = client_for(own_server, timeout=3.0)
    try:
        await client.call(pack(("PING",)))
        own_server.pause()
        try:
            calls = [asyncio.ensure_future(client.call(pack(("ECHO", str(i))))) for i in range(30)]
            await asyncio.sleep(0.05)  # all sent, none answered
            for i in range(0, 30, 3):
                calls[i].cancel()

            async def bounded() -> None:
                async with asyncio.timeout(0.05):
                    await client.call(pack(("ECHO", "late")))

            with pytest.raises(TimeoutError):
                await bounded()
        finally:
            own_server.resume()
        results = await asyncio.gather(*calls, return_exceptions=True)
        for i, result in enumerate(results):
            if i % 3 == 0:
                assert isinstance(result, asyncio.CancelledError)
            else:
                assert result == str(i).encode()
        assert await client.call(pack(("ECHO", "next"))) == b"next"
    finally:
        client.close()


async def test_closing_fails_calls_in_flight_without_retrying_them(own_server: RedisProc) -> None:
    store = RedisStore(own_server.url, prefix="close:")
    await store.start()
    own_server.pause()
    try:
        pending = asyncio.ensure_future(store.admit(admission()))
        await asyncio.sleep(0.05)
        resp = store._resp
        assert resp is not None
        resp.close()
        with pytest.raises(StoreError) as raised:
            await pending
        assert not isinstance(raised.value, ConnectionLost)
    finally:
        own_server.resume()
        await store.close()
    assert (await store.admit(admission())).admitted  # a closed store connects again on use
    await store.close()


async def test_batches_get_replies_in_order_and_raise_their_first_error(resp: RespClient) -> None:
    key = f"t:{uuid.uuid4().hex}"
    assert await resp.call_many([pack(("SET", key, "1")), pack(("INCR", key)), pack(("GET", key))]) == [
        b"OK", 2, b"2"]
    assert await resp.call_many([]) == []
    with pytest.raises(StoreError, match="not an integer"):
        await resp.call_many([pack(("SET", key, "x")), pack(("INCR", key)), pack(("GET", key))])
    assert await resp.call(pack(("GET", key))) == b"x"  # the batch ran whole, the connection lives


async def test_a_batch_cut_off_is_retried_once_only_if_allowed(own_server: RedisProc) -> None:
    client = client_for(own_server, timeout=3.0)
    admin = Redis.from_url(own_server.url)
    try:
        await client.call(pack(("PING",)))
        for retry in (True, False):
            batch = asyncio.ensure_future(client.call_many(
                [pack(("BLPOP", "q", 2)), pack(("ECHO", "after"))], retry=retry))
            await asyncio.sleep(0.1)
            assert await admin.client_kill_filter(_type="normal", skipme=True) == 1
            if not retry:
                with pytest.raises(ConnectionLost):
                    await batch
                break
            await asyncio.sleep(0.1)  # the retry now waits on a new connection
            await admin.rpush("q", "x")
            assert await batch == [[b"q", b"x"], b"after"]
    finally:
        await admin.aclose()
        client.close()


_NO_REDIS_PY = """
import asyncio, sys, time, uuid
import proxy.app
from proxy.quota.redis_store import RedisStore
from proxy.quota.store import AggregateDelta, Admission, Limit, LimitName, StoredKey, Totals

async def main(url):
    store = RedisStore(url, prefix=f"np{uuid.uuid4().hex[:8]}:")
    await store.start()
    now, day = time.time(), time.strftime("%Y-%m-%d")
    limit = Limit("user:al", LimitName.RPM, 10)
    decision = await store.admit(Admission(uuid.uuid4().hex, "al", (limit,), 5, 5, now, day, day[:7]))
    assert decision.reservation is not None
    delta = AggregateDelta(uuid.uuid4().hex, "al", day, "al", None, "gpt-x", Totals(requests=1))
    assert await store.settle_and_record(decision.reservation, delta, now)
    assert [s.used for s in await store.usage((limit,), "al", now, day, day[:7])] == [1]
    assert [r.totals.requests for r in await store.aggregates((day,), user="al")] == [1]
    await store.put_key(StoredKey("k1", "d1", "al", None, None, False, now))
    assert (await store.get_key("d1")).key_id == "k1"
    assert [k.key_id for k in await store.list_keys()] == ["k1"]
    assert (await store.revoke_key("k1")).key_id == "k1" and await store.get_key("d1") is None
    await store.append_events([b'{"event_id": "e1"}'], 100)
    assert await store.ping()
    await store.close()
    loaded = sorted(m for m in sys.modules if m == "redis" or m.startswith("redis."))
    assert not loaded, loaded

asyncio.run(main(sys.argv[1]))
"""


def test_a_plain_url_store_never_imports_redis_py(redis_server: RedisProc) -> None:
    """redis-py costs ~5 MiB of resident memory: a plain URL's store does everything without it."""
    done = subprocess.run([sys.executable, "-c", _NO_REDIS_PY, redis_server.url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
