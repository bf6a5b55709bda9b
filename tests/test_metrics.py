"""A live /metrics scrape after traffic carries every contract metric with its labels."""
from __future__ import annotations

import asyncio

import aiohttp
from conftest import ALICE_KEY, BACKEND_KEY, BOB_KEY, Proxy, StartProxy
from prometheus_client.parser import text_string_to_metric_families

CONTRACT = {
    "meterproxy_requests": ("counter", {"provider", "model", "user", "team", "code"}),
    "meterproxy_tokens": ("counter", {"provider", "model", "user", "team", "type"}),
    "meterproxy_cost_usd": ("counter", {"provider", "model", "user", "team"}),
    "meterproxy_limit_rejections": ("counter", {"user", "team", "limit"}),
    "meterproxy_request_duration_seconds": ("histogram", {"provider", "model"}),
    "meterproxy_time_to_first_token_seconds": ("histogram", {"provider", "model"}),
    "meterproxy_overhead_seconds": ("histogram", {"provider"}),
    "meterproxy_inflight_requests": ("gauge", {"provider"}),
    "meterproxy_upstream_errors": ("counter", {"provider", "kind"}),
    "meterproxy_store_errors": ("counter", {"op"}),
    "meterproxy_token_count_source": ("counter", {"source"}),
    "meterproxy_budget_remaining_usd": ("gauge", {"subject", "period"}),
}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello metrics"}]}


async def scrape(proxy: Proxy) -> dict[str, object]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/metrics") as r:
            assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
            text = await r.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


async def test_every_contract_metric_after_traffic(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"plans": {"free": {"rpm": 3, "usd_per_month": 5}},
                               "providers": {"openai": {"max_concurrent": 50}}})
    async with aiohttp.ClientSession() as s:
        auth = {"Authorization": f"Bearer {ALICE_KEY}"}
        for _ in range(2):
            async with s.post(f"{proxy.url}/openai/v1/chat/completions", json=CHAT, headers=auth) as r:
                assert r.status == 200
        async with s.post(f"{proxy.url}/openai/v1/chat/completions", json={**CHAT, "stream": True},
                          headers=auth) as r:
            assert r.status == 200
            await r.read()
        async with s.post(f"{proxy.url}/openai/v1/chat/completions", json=CHAT, headers=auth) as r:
            assert r.status == 429  # rpm 3 reached
        async with s.post(f"{proxy.url}/openai/v1/chat/completions", json=CHAT,
                          headers={"Authorization": f"Bearer {BOB_KEY}", "x-fake-status": "503"}) as r:
            assert r.status == 503
    await proxy.settled()
    # Upstream and store failures are counted too (the contract metrics exist before any happen).
    families = await scrape(proxy)
    for name, (kind, labels) in CONTRACT.items():
        fam = families.get(name)
        assert fam is not None, f"{name} missing from /metrics"
        assert fam.type == kind, (name, fam.type)
        for sample in fam.samples:
            if sample.name.endswith(("_created", "_bucket")):
                continue
            assert set(sample.labels) == labels, (name, sample.labels)
    req = {(s.labels["user"], s.labels["team"], s.labels["code"]): s.value
           for s in families["meterproxy_requests"].samples if s.name == "meterproxy_requests_total"}
    assert req[("alice", "research", "200")] == 3 and req[("alice", "research", "429")] == 1
    rej = [s for s in families["meterproxy_limit_rejections"].samples if s.name.endswith("_total")]
    assert [(s.labels["limit"], s.value) for s in rej] == [("rpm", 1.0)]
    tokens = {s.labels["type"]: s.value for s in families["meterproxy_tokens"].samples
              if s.name.endswith("_total") and s.labels["user"] == "alice"}
    assert tokens["output"] == 36 and tokens["input"] > 0
    budget = {(s.labels["subject"], s.labels["period"]): s.value for s in families["meterproxy_budget_remaining_usd"].samples}
    assert 0 < budget[("user:alice", "month")] < 5
    ttft = [s for s in families["meterproxy_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert sum(s.value for s in ttft) == 1
    errors = [(s.labels["provider"], s.labels["kind"], s.value)
              for s in families["meterproxy_upstream_errors"].samples if s.name.endswith("_total")]
    assert errors == [("openai", "status_503", 3.0)]  # the first try and two retries
    # Keys are never labels.
    text = str([f.samples for f in families.values()])
    assert ALICE_KEY not in text


async def test_user_label_cap_under_5000_users(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"metrics": {"max_user_labels": 1000}})
    sem = asyncio.Semaphore(64)

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        async with sem:
            async with s.post(f"{proxy.url}/openai/v1/chat/completions", json=CHAT,
                              headers={"Authorization": f"Bearer {BACKEND_KEY}", "x-meterproxy-user": f"u{i}"}) as r:
                assert r.status == 200

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as s:
        await asyncio.gather(*(one(s, i) for i in range(5000)))
    await proxy.settled()
    families = await scrape(proxy)
    users = {s.labels["user"] for s in families["meterproxy_requests"].samples}
    assert len(users) == 1001 and "other" in users
    total = sum(s.value for s in families["meterproxy_requests"].samples if s.name == "meterproxy_requests_total")
    assert total == 5000
    other = sum(s.value for s in families["meterproxy_requests"].samples
                if s.name == "meterproxy_requests_total" and s.labels["user"] == "other")
    assert other == 4000
