"""The admin API: usage totals that agree exactly with the ledger and Prometheus, subjects with
limits and forecasts, virtual keys (across two proxy processes sharing Redis), reload, OpenAPI,
and the store-reading CLI commands."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import ALICE_KEY, BOB_KEY, ROOT, Proxy, StartProxy, base_config, merge
from fakeprovider import FakeProvider
from procs import ProxyProcess
from redis.asyncio import Redis
from redisproc import RedisProc, start_redis

from proxy.quota.store import AggregateDelta, Totals
from proxy.usage import forecast

ADMIN = "admin-secret-0123456789"
M = 1_000_000
TOKEN_TYPES = ("input", "output", "cached_input", "cache_write", "reasoning")
LIMITS = {
    "admin_key": ADMIN,
    "plans": {"free": {"usd_per_month": 5}},
    "teams": {"research": {"usd_per_month": 100}},
    "users": {"bob": {"plan": "free", "rpm": 4}},
}


def admin(key: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def call(method: str, url: str, *, headers: dict[str, str] | None = None, body: Any = None
               ) -> tuple[int, Any, dict[str, str]]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, headers=headers if headers is not None else admin(), json=body) as r:
            text = await r.text()
            return r.status, json.loads(text) if text else None, dict(r.headers)


async def chat(url: str, key: str, stream: bool = False, **headers: str) -> int:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count me in"}]}
    if stream:
        body["stream"] = True
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/openai/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {key}", **headers}) as r:
            await r.read()
            return r.status


async def mixed_traffic(url: str) -> list[int]:
    """Plain, streamed, cached and reasoning tokens, Anthropic cache writes, an upstream failure,
    a stream cut short, a Gemini stream, and requests refused by a limit."""
    statuses = [
        await chat(url, ALICE_KEY),
        await chat(url, ALICE_KEY, stream=True),
        await chat(url, ALICE_KEY, **{"x-fake-cached": "5", "x-fake-reasoning": "3"}),
        await chat(url, ALICE_KEY, stream=True, **{"x-fake-cut-after": "4"}),
        await chat(url, ALICE_KEY, **{"x-fake-status": "500"}),
    ]
    body = {"model": "claude-sonnet-4-6", "max_tokens": 50, "messages": [{"role": "user", "content": "hi there"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/anthropic/v1/messages", json=body,
                          headers={"x-api-key": BOB_KEY, "anthropic-version": "2023-06-01",
                                   "x-fake-cache-write": "6", "x-fake-cached": "2"}) as r:
            await r.read()
            statuses.append(r.status)
        gbody = {"contents": [{"role": "user", "parts": [{"text": "Hello Gemini"}]}]}
        async with s.post(f"{url}/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                          json=gbody, headers={"x-goog-api-key": BOB_KEY}) as r:
            await r.read()
            statuses.append(r.status)
    for _ in range(4):  # bob's rpm is 4: two of these are refused
        statuses.append(await chat(url, BOB_KEY))
    return statuses


def ledger_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def prom_sum(proxy: Proxy, sample: str, **match: str) -> float:
    total = 0.0
    for family in proxy.svc.metrics.registry.collect():
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in match.items()):
                total += s.value
    return total


async def test_usage_totals_agree_with_ledger_and_prometheus(start_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = await start_proxy(LIMITS)
    statuses = await mixed_traffic(proxy.url)
    assert statuses.count(429) == 2 and 500 in statuses and statuses.count(200) == 8, statuses
    await proxy.settled()
    events = ledger_events(tmp_path / "usage.jsonl")
    assert len(events) == len(statuses) == len({e["event_id"] for e in events})
    assert any(e["cut_short"] for e in events) and any(e["streamed"] for e in events)

    status, body, _ = await call("GET", f"{proxy.url}/admin/usage?group_by=user,team,model,day")
    assert status == 200, body
    rows = body["rows"]
    today = datetime.now(UTC).date().isoformat()
    assert {r["day"] for r in rows} == {today} and {r["user"] for r in rows} == {"alice", "bob"}

    def total(items: list[dict[str, Any]], field: str) -> int:
        return sum(int(i[field]) for i in items)

    # requests
    assert total(rows, "requests") == len(events) == prom_sum(proxy, "meterproxy_requests_total")
    # tokens, type by type
    for t in TOKEN_TYPES:
        field = f"{t}_tokens"
        assert total(rows, field) == total(events, field) == prom_sum(proxy, "meterproxy_tokens_total", type=t), t
    assert total(events, "cache_write_tokens") > 0 and total(events, "reasoning_tokens") > 0
    assert total(events, "cached_input_tokens") > 0
    # cost: exact micro-dollars; Prometheus holds float dollars, exact to the micro-dollar
    cost = total(events, "cost_micro_usd")
    assert cost > 0 and total(rows, "cost_micro_usd") == cost
    assert round(prom_sum(proxy, "meterproxy_cost_usd_total") * M) == cost
    assert sum(Decimal(r["cost_usd"]) for r in rows) * M == cost  # the decimal strings are exact too
    # and per user and model, not just in total
    for r in rows:
        mine = [e for e in events if e["user"] == r["user"] and e["model"] == r["model"]]
        assert r["requests"] == len(mine) and r["cost_micro_usd"] == total(mine, "cost_micro_usd"), r
        assert r["requests"] == prom_sum(proxy, "meterproxy_requests_total", user=r["user"], model=r["model"])
    # filters
    status, body, _ = await call("GET", f"{proxy.url}/admin/usage?team=research&group_by=model")
    alice = [e for e in events if e["user"] == "alice"]
    assert total(body["rows"], "requests") == len(alice) and total(body["rows"], "cost_micro_usd") == \
        total(alice, "cost_micro_usd")
    status, body, _ = await call("GET", f"{proxy.url}/admin/usage?since=2001-01-01&until=2001-01-31")
    assert status == 200 and body["rows"] == []
    status, body, _ = await call("GET", f"{proxy.url}/admin/usage?group_by=provider")
    assert status == 400 and "group_by" in body["error"]["message"]


async def test_subject_limits_used_and_forecast(start_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = await start_proxy(LIMITS)
    await mixed_traffic(proxy.url)
    await proxy.settled()
    events = ledger_events(tmp_path / "usage.jsonl")
    alice_cost = sum(e["cost_micro_usd"] for e in events if e["user"] == "alice")
    # A known spend history for the forecast: $0.70 on each of the 7 days before today.
    store = proxy.svc.gate.store
    now = datetime.now(UTC)
    history = {}
    for back in range(1, 8):
        day = (now.date() - timedelta(days=back)).isoformat()
        history[day] = 700_000
        await store.settle_and_record(None, AggregateDelta(f"old-{back}", "t:research", day, "alice", "research",
                                                          "gpt-4o", Totals(1, 0, 0, 0, 0, 0, 700_000)), time.time())
    status, body, _ = await call("GET", f"{proxy.url}/admin/subjects/alice")
    assert status == 200, body
    assert (body["user"], body["team"], body["plan"]) == ("alice", "research", "free")
    limits = {(x["scope"], x["limit"]): x for x in body["limits"]}
    month = limits[("user:alice", "usd_per_month")]
    # used is the budget counter: this month's settled spend (today's traffic), exact
    assert month["value"] == 5 * M and month["used"] == alice_cost and month["remaining"] == 5 * M - alice_cost
    assert month["value_usd"] == "5" and month["resets_at"] is not None
    assert datetime.fromisoformat(month["resets_at"]).day == 1  # the month's end
    assert limits[("team:research", "usd_per_month")]["used"] == alice_cost
    # the forecast: the same history, read back through the store
    daily = dict(history)
    daily[now.date().isoformat()] = daily.get(now.date().isoformat(), 0) + alice_cost
    want = forecast(daily, datetime.now(UTC), 5 * M)
    got = body["forecast"]["user:alice"]
    assert got["month_to_date_micro_usd"] == want.month_to_date_micro_usd
    assert got["burn_usd_per_day"] == "0.7"
    assert abs(got["month_end_micro_usd"] - want.month_end_micro_usd) <= 100  # moments apart
    assert got["runs_out_on"] == (want.runs_out_on.isoformat() if want.runs_out_on else None)
    assert got["budget_usd"] == "5" and body["forecast"]["team:research"]["budget_usd"] == "100"
    # bob: not in a team, rpm 4 from his user entry
    status, body, _ = await call("GET", f"{proxy.url}/admin/subjects/bob")
    limits = {(x["scope"], x["limit"]): x for x in body["limits"]}
    assert body["team"] is None and limits[("user:bob", "rpm")]["value"] == 4
    assert limits[("user:bob", "rpm")]["used"] == 4 and limits[("user:bob", "rpm")]["reset_seconds"] > 0
    assert list(body["forecast"]) == ["user:bob"]


async def test_admin_key_required_and_api_off_without_one(start_proxy: StartProxy, fake: FakeProvider) -> None:
    proxy = await start_proxy(LIMITS)
    for headers in ({}, admin("wrong"), {"Authorization": ADMIN}, admin(ADMIN + "x")):
        status, body, h = await call("GET", f"{proxy.url}/admin/usage", headers=headers)
        assert status == 401 and body["error"]["code"] == "invalid_admin_key" and "bearer" in h["WWW-Authenticate"].lower()
    status, _, _ = await call("POST", f"{proxy.url}/admin/keys", headers=admin("nope"), body={"user": "x"})
    assert status == 401
    status, body, _ = await call("GET", f"{proxy.url}/admin/nothing-here")
    assert status == 404 and "openapi" in body["error"]["message"]
    off = await start_proxy()  # no admin_key: the admin API does not exist
    for path in ("/admin/usage", "/admin/subjects/alice", "/admin/openapi.json"):
        status, body, _ = await call("GET", f"{off.url}{path}")
        assert status == 404 and "admin_key" in body["error"]["message"]
    assert not fake.requests, "admin paths are never forwarded upstream"


async def test_openapi_describes_every_admin_route(start_proxy: StartProxy) -> None:
    proxy = await start_proxy(LIMITS)
    status, doc, _ = await call("GET", f"{proxy.url}/admin/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    routes = {(r.method.lower(), r.resource.canonical) for r in proxy.app.router.routes()
              if r.resource is not None and r.resource.canonical.startswith("/admin") and "tail" not in
              r.resource.canonical and r.method not in ("HEAD", "*")}
    described = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routes and routes == described
    assert doc["components"]["securitySchemes"]["adminKey"]["scheme"] == "bearer"


async def test_keys_create_use_revoke_in_one_process(start_proxy: StartProxy, tmp_path: Path) -> None:
    proxy = await start_proxy(LIMITS)
    status, made, _ = await call("POST", f"{proxy.url}/admin/keys", body={"user": "carol", "plan": "pro"})
    assert status == 201 and made["key"].startswith("mp-") and made["plan"] == "pro"
    assert await chat(proxy.url, made["key"]) == 200
    await proxy.settled()
    last = ledger_events(tmp_path / "usage.jsonl")[-1]
    assert (last["user"], last["plan"], last["key_id"]) == ("carol", "pro", made["id"])
    status, listed, _ = await call("GET", f"{proxy.url}/admin/keys")
    mine = [k for k in listed["keys"] if k["id"] == made["id"]]
    assert mine and mine[0]["source"] == "store" and "key" not in mine[0]
    assert made["key"] not in json.dumps(listed)
    config_id = next(k["id"] for k in listed["keys"] if k["source"] == "config")
    status, body, _ = await call("DELETE", f"{proxy.url}/admin/keys/{config_id}")
    assert status == 409
    status, _, _ = await call("DELETE", f"{proxy.url}/admin/keys/{made['id']}")
    assert status == 204
    assert await chat(proxy.url, made["key"]) == 401
    status, _, _ = await call("DELETE", f"{proxy.url}/admin/keys/{made['id']}")
    assert status == 404
    for bad in ({}, {"user": ""}, {"user": "x", "plan": "platinum"}, {"user": "x", "trusted_user_header": "yes"},
                {"user": "x", "colour": "red"}):
        status, body, _ = await call("POST", f"{proxy.url}/admin/keys", body=bad)
        assert status == 400, bad


async def test_reload_route(start_proxy: StartProxy, fake: FakeProvider, tmp_path: Path) -> None:
    config = merge(base_config(fake.url, tmp_path), LIMITS)
    path = tmp_path / "config.yaml"  # where start_proxy's app reads its config from on reload
    proxy = await start_proxy(LIMITS)
    path.write_text(yaml.safe_dump(merge(config, {"users": {"bob": {"rpm": 9}}})))
    status, body, _ = await call("POST", f"{proxy.url}/admin/reload")
    assert status == 200 and body == {"reloaded": True}
    assert proxy.svc.config.users["bob"].rpm == 9
    path.write_text("providers: [\n")
    status, body, _ = await call("POST", f"{proxy.url}/admin/reload")
    assert status == 400 and "not valid YAML" in body["error"]["message"]
    assert proxy.svc.config.users["bob"].rpm == 9  # the old config keeps serving
    status, _, _ = await call("POST", f"{proxy.url}/admin/reload", headers={})
    assert status == 401


# ---------------------------------------------------------------- redis: restarts, two processes, CLI


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProc]:
    server = start_redis(tmp_path)
    yield server
    server.stop()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


async def usage_rows(url: str, query: str = "group_by=user,model") -> list[dict[str, Any]]:
    status, body, _ = await call("GET", f"{url}/admin/usage?{query}")
    assert status == 200, body
    return sorted(body["rows"], key=lambda r: (r["user"], r["model"]))


async def test_aggregates_and_ledger_survive_a_restart_with_redis(fake: FakeProvider, tmp_path: Path,
                                                                  redis: RedisProc) -> None:
    config = merge(base_config(fake.url, tmp_path), {**LIMITS, "store": redis.url})
    first = await ProxyProcess(config, tmp_path / "config.yaml").start()
    try:
        statuses = await mixed_traffic(first.url)
    finally:
        await first.stop()  # SIGTERM: drains, settles, flushes the ledger
    second = await ProxyProcess(config, tmp_path / "config.yaml").start()
    try:
        rows = await usage_rows(second.url)
        assert sum(r["requests"] for r in rows) == len(statuses)
        assert await chat(second.url, ALICE_KEY) == 200
        await _until(lambda: len(ledger_events(tmp_path / "usage.jsonl")) == len(statuses) + 1)
        await _until_async(second.url, len(statuses) + 1)
        rows = await usage_rows(second.url)
    finally:
        await second.stop()
    events = ledger_events(tmp_path / "usage.jsonl")
    assert len(events) == len(statuses) + 1  # appended across the restart, never truncated
    for r in rows:
        mine = [e for e in events if e["user"] == r["user"] and e["model"] == r["model"]]
        assert r["requests"] == len(mine) and r["cost_micro_usd"] == sum(e["cost_micro_usd"] for e in mine)
        for t in TOKEN_TYPES:
            assert r[f"{t}_tokens"] == sum(e[f"{t}_tokens"] for e in mine)
    # the Redis stream sink has every event too
    client = Redis.from_url(redis.url)
    try:
        stream = [json.loads(f[b"event"])["event_id"] for _, f in await client.xrange("mp:ledger")]
    finally:
        await client.aclose()
    assert sorted(stream) == sorted(e["event_id"] for e in events)
    # and the CLI reads the same aggregates from the store
    out = cli("usage", "--config", str(tmp_path / "config.yaml"), "--group-by", "user", "--group-by", "model",
              "--format", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert sorted(report["rows"], key=lambda r: (r["user"], r["model"])) == rows
    assert report["forecast"]["month_to_date_micro_usd"] == sum(e["cost_micro_usd"] for e in events)
    table = cli("usage", "--config", str(tmp_path / "config.yaml"), "--user", "alice")
    assert table.returncode == 0 and "alice" in table.stdout and "forecast for user alice" in table.stdout
    assert "budget $5 runs out" in table.stdout


async def test_keys_across_two_processes_sharing_redis(fake: FakeProvider, tmp_path: Path, redis: RedisProc) -> None:
    config = merge(base_config(fake.url, tmp_path), {**LIMITS, "store": redis.url})
    a = await ProxyProcess(config, tmp_path / "a.yaml").start()
    b = await ProxyProcess(merge(config, {"ledger": {"path": str(tmp_path / "b.jsonl")}}), tmp_path / "b.yaml").start()
    try:
        status, made, _ = await call("POST", f"{a.url}/admin/keys", body={"user": "dave", "team": "research"})
        assert status == 201
        assert await chat(b.url, made["key"]) == 200  # created on A, known on B at once
        assert await chat(a.url, made["key"]) == 200
        status, _, _ = await call("DELETE", f"{b.url}/admin/keys/{made['id']}")  # revoked on B...
        assert status == 204
        assert await chat(a.url, made["key"]) == 401  # ...refused on A at once
        assert await chat(b.url, made["key"]) == 401
        # the CLI manages the same keys
        out = cli("keys", "create", "--config", str(tmp_path / "a.yaml"), "--user", "erin", "--plan", "pro")
        assert out.returncode == 0, out.stderr
        key = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("key:"))
        key_id = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("id:"))
        assert await chat(b.url, key) == 200
        listed = cli("keys", "list", "--config", str(tmp_path / "a.yaml"), "--format", "csv")
        assert key_id in listed.stdout and "erin" in listed.stdout and key not in listed.stdout
        assert made["id"] not in listed.stdout
        out = cli("keys", "revoke", "--config", str(tmp_path / "a.yaml"), key_id)
        assert out.returncode == 0, out.stderr
        assert await chat(a.url, key) == 401 and await chat(b.url, key) == 401
        assert cli("keys", "revoke", "--config", str(tmp_path / "a.yaml"), key_id).returncode == 1
    finally:
        await a.stop()
        await b.stop()


def test_cli_with_memory_store_says_there_is_nothing_persisted() -> None:
    for args in (("usage",), ("keys", "list")):
        out = cli(*args, "--config", "config/example.yaml")
        assert out.returncode == 1 and "store: memory" in out.stderr and "redis" in out.stderr
        assert "Traceback" not in out.stderr


async def _until(predicate: Any, timeout: float = 10.0) -> None:
    import asyncio

    for _ in range(int(timeout / 0.05)):
        try:
            if predicate():
                return
        except (OSError, ValueError):
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def _until_async(url: str, requests: int, timeout: float = 10.0) -> None:
    import asyncio

    for _ in range(int(timeout / 0.05)):
        if sum(r["requests"] for r in await usage_rows(url)) == requests:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("aggregates did not reach the request count")
