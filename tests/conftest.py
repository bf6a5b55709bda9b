"""Shared test seams: the fake provider, and meterproxy itself served on a real loopback port."""
from __future__ import annotations

import asyncio
import copy
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

_SHARED_CACHE = Path(__file__).resolve().parents[2] / "shared" / "tiktoken-cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _SHARED_CACHE.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_SHARED_CACHE)

from fakeprovider import FakeProvider, start_fake_provider  # noqa: E402
from redisproc import ClusterProc, RedisProc, start_cluster, start_redis  # noqa: E402

from proxy.app import create_app  # noqa: E402
from proxy.config import Config  # noqa: E402
from proxy.quota.memory import MemoryStore  # noqa: E402
from proxy.quota.redis_store import RedisStore  # noqa: E402
from proxy.quota.store import QuotaStore  # noqa: E402
from proxy.services import SERVICES, TRACKER, Services  # noqa: E402
from proxy.tokens import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Virtual keys the tests use; the upstream must never see them.
ALICE_KEY = "sk-test-alice-virtual-0001"
BOB_KEY = "sk-test-bob-virtual-0002"
BACKEND_KEY = "sk-test-backend-trusted-0003"
UPSTREAM_KEYS = {"openai": "sk-real-openai-upstream", "azure": "azure-real-upstream-key",
                 "anthropic": "sk-ant-real-upstream", "gemini": "gemini-real-upstream-key"}


def base_config(fake_url: str, tmp_path: Path) -> dict[str, Any]:
    return {
        "store": "memory",
        "providers": {
            "openai": {"type": "openai", "base_url": fake_url, "api_key": UPSTREAM_KEYS["openai"]},
            "azure": {"type": "azure", "base_url": fake_url, "api_key": UPSTREAM_KEYS["azure"],
                      "api_version": "2024-10-21", "deployments": {"my-gpt4o": "gpt-4o"}},
            "anthropic": {"type": "anthropic", "base_url": fake_url, "api_key": UPSTREAM_KEYS["anthropic"]},
            "gemini": {"type": "gemini", "base_url": fake_url, "api_key": UPSTREAM_KEYS["gemini"]},
        },
        "models": {"gpt-*": "openai", "text-embedding-*": "openai", "claude-*": "anthropic", "gemini-*": "gemini"},
        "pricing_file": str(ROOT / "config" / "pricing.yaml"),
        "default_plan": "free",
        "plans": {"free": {}, "pro": {"priority": 5}},
        "users": {"alice": {"plan": "free", "team": "research"}, "bob": {"plan": "free"}},
        "keys": [
            {"key": ALICE_KEY, "user": "alice"},
            {"key": BOB_KEY, "user": "bob"},
            {"key": BACKEND_KEY, "user": "backend", "trusted_user_header": True},
        ],
        "ledger": {"path": str(tmp_path / "usage.jsonl"), "fsync_interval": 0.05},
    }


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


@dataclass
class Proxy:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def svc(self) -> Services:
        return self.app[SERVICES].get()

    async def settled(self) -> None:
        """Wait until every finished request is settled, recorded and written to the ledger."""
        for _ in range(200):
            await self.app[TRACKER].drain()
            if not len(self.app[TRACKER]) and not self.svc.ledger.pending:
                return
            await asyncio.sleep(0.01)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.svc.metrics.registry.get_sample_value(name, labels or {})
        return value or 0.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProc]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterProc]:
    cluster = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[QuotaStore]:
    """One quota store per backend: the contract suites run against all three."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"  # a fresh key prefix per test keeps tests apart
    built: QuotaStore
    if request.param == "memory":
        built = MemoryStore()
    else:
        server = request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster")
        built = RedisStore(server.url, prefix=prefix)  # cluster mode is detected
    await built.start()
    yield built
    await built.close()


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    tok = Tokenizer()
    tok.load()
    return tok


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with start_fake_provider() as f:
        yield f


StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_proxy(fake: FakeProvider, tmp_path: Path, tokenizer: Tokenizer) -> AsyncIterator[StartProxy]:
    runners: list[web.AppRunner] = []

    async def start(extra: dict[str, Any] | None = None, *, raw: dict[str, Any] | None = None) -> Proxy:
        data = raw if raw is not None else merge(base_config(fake.url, tmp_path), extra or {})
        config = Config.model_validate(data)
        app = create_app(config, str(tmp_path / "config.yaml"), registry=CollectorRegistry(), tokenizer=tokenizer)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return Proxy(f"http://127.0.0.1:{port}", app, runner)

    yield start
    for r in reversed(runners):
        await r.cleanup()


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> Proxy:
    return await start_proxy()
