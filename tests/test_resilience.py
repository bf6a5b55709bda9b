"""Upstream resilience: retries before the first byte, circuit breaker, fallbacks, weighted routing."""
from __future__ import annotations

import asyncio

import aiohttp
from conftest import ALICE_KEY, StartProxy
from fakeprovider import FakeProvider, start_fake_provider

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "resilient"}]}
AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}


async def chat(url: str, path: str = "/openai/v1/chat/completions", headers: dict[str, str] | None = None,
               body: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body or CHAT, headers={**AUTH, **(headers or {})}) as r:
            return r.status, await r.json(content_type=None)


async def test_retries_until_success_and_records_retry_count(start_proxy: StartProxy, fake: FakeProvider) -> None:
    proxy = await start_proxy({"providers": {"openai": {"retries": {"attempts": 3, "backoff": 0.01}}}})
    fake.fail_next = 2
    status, body = await chat(proxy.url)
    assert status == 200 and body["choices"][0]["message"]["content"]
    assert len(fake.requests) == 3
    await proxy.settled()
    assert proxy.metric("meterproxy_upstream_errors_total", {"provider": "openai", "kind": "status_503"}) == 2
    events = proxy.svc.ledger.path.read_text().splitlines()  # type: ignore[union-attr]
    assert '"retries":2' in events[-1] and '"status":200' in events[-1]


async def test_retries_bounded_then_provider_answer_passes(start_proxy: StartProxy, fake: FakeProvider) -> None:
    proxy = await start_proxy({"providers": {"openai": {"retries": {"attempts": 2, "backoff": 0.01}}}})
    status, body = await chat(proxy.url, headers={"x-fake-status": "500"})
    assert status == 500 and body["error"]["message"] == "fake error 500"
    assert len(fake.requests) == 3


async def test_no_retry_on_client_errors(start_proxy: StartProxy, fake: FakeProvider) -> None:
    proxy = await start_proxy({"providers": {"openai": {"retries": {"attempts": 3, "backoff": 0.01}}}})
    status, _ = await chat(proxy.url, headers={"x-fake-status": "400"})
    assert status == 400 and len(fake.requests) == 1


async def test_circuit_opens_and_recovers(start_proxy: StartProxy, fake: FakeProvider) -> None:
    proxy = await start_proxy({"providers": {"openai": {
        "retries": {"attempts": 0}, "circuit_breaker": {"failures": 3, "reset": 0.3}}}})
    for _ in range(3):
        status, _ = await chat(proxy.url, headers={"x-fake-status": "503"})
        assert status == 503
    n = len(fake.requests)
    status, body = await chat(proxy.url)  # open: refused without reaching the upstream
    assert status == 502 and "circuit is open" in body["error"]["message"] and len(fake.requests) == n
    await asyncio.sleep(0.35)
    status, _ = await chat(proxy.url)  # half-open trial succeeds, circuit closes
    assert status == 200
    status, _ = await chat(proxy.url)
    assert status == 200


async def test_fallback_to_azure_when_openai_fails(start_proxy: StartProxy, fake: FakeProvider) -> None:
    async with start_fake_provider() as broken:
        broken.controls["x-fake-status"] = "503"
        proxy = await start_proxy({"providers": {
            "openai": {"base_url": broken.url, "fallbacks": ["azure"], "retries": {"attempts": 1, "backoff": 0.01}},
            "azure": {"deployments": {"my-mini": "gpt-4o-mini"}}}})
        status, body = await chat(proxy.url)
        assert status == 200
        assert len(broken.requests) == 2
    rec = fake.last
    assert rec.path == "/openai/deployments/my-mini/chat/completions" and "api-version=" in rec.query_string
    assert rec.headers["api-key"] == "azure-real-upstream-key"


async def test_weighted_deployments_spread_load(start_proxy: StartProxy, fake: FakeProvider) -> None:
    async with start_fake_provider() as second:
        proxy = await start_proxy({
            "providers": {"openai2": {"type": "openai", "base_url": second.url, "api_key": "sk-second"}},
            "models": {"gpt-*": [{"provider": "openai", "weight": 3}, {"provider": "openai2", "weight": 1}]}})
        for _ in range(80):
            status, _ = await chat(proxy.url, path="/v1/chat/completions")
            assert status == 200
        a, b = len(fake.requests), len(second.requests)
    assert a + b == 80 and 40 <= a <= 75 and b >= 5


async def test_unreachable_primary_falls_back(start_proxy: StartProxy, fake: FakeProvider, unused_tcp_port: int) -> None:
    proxy = await start_proxy({"providers": {
        "openai": {"base_url": f"http://127.0.0.1:{unused_tcp_port}", "fallbacks": ["openai2"],
                   "retries": {"attempts": 0}},
        "openai2": {"type": "openai", "base_url": fake.url, "api_key": "sk-second"}}})
    status, _ = await chat(proxy.url)
    assert status == 200 and fake.last.api_key == "sk-second"
    await proxy.settled()
    assert proxy.metric("meterproxy_upstream_errors_total", {"provider": "openai", "kind": "unreachable"}) == 1


async def test_a_half_open_trial_whose_client_hangs_up_does_not_keep_the_circuit_open(
        start_proxy: StartProxy, fake: FakeProvider) -> None:
    proxy = await start_proxy({"providers": {"openai": {
        "retries": {"attempts": 0}, "circuit_breaker": {"failures": 3, "reset": 0.3}}}})
    for _ in range(3):
        assert (await chat(proxy.url, headers={"x-fake-status": "503"}))[0] == 503
    await asyncio.sleep(0.35)
    # The one trial request of the half-open circuit: its client gives up before the answer.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.1)) as s:
        try:
            async with s.post(proxy.url + "/openai/v1/chat/completions", json=CHAT,
                              headers={**AUTH, "x-fake-delay": "0.5"}) as r:
                await r.read()
        except TimeoutError:
            pass
    await asyncio.sleep(0.8)  # the trial's upstream answer has come (or been abandoned) by now
    statuses = [(await chat(proxy.url))[0] for _ in range(2)]
    assert statuses == [200, 200]  # not 502 "circuit is open" for good
