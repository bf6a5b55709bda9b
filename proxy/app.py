"""Composition: the one place that builds concrete backends and wires them into the aiohttp app."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from zoneinfo import ZoneInfo

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prom_multiprocess

from .admin import add_admin_routes
from .auth import KeyRing
from .config import Config, load_config, resolve_path
from .errors import ConfigError, StoreError
from .ledger import EventStream, Ledger
from .metrics import FLUSH_SECONDS, Metrics
from .pipeline import handle
from .pricing import PriceTable
from .providers import build_adapter
from .quota.gate import Gate
from .quota.memory import MemoryStore
from .quota.store import QuotaStore
from .relay import HangUps
from .resilience import Breaker
from .route import Router
from .services import (
    HANG_UPS,
    RELOAD,
    REQUEST_IDS,
    SERVICES,
    TRACKER,
    Live,
    RequestIds,
    Services,
    Tracker,
)
from .tokens import Tokenizer
from .upstream import UpstreamPool

log = logging.getLogger("meterproxy")

CONFIG = web.AppKey("config", Config)
CONFIG_PATH = web.AppKey("config_path", str)
REGISTRY = web.AppKey("registry", CollectorRegistry)
DRAINING = web.AppKey("draining", asyncio.Event)
_SHIPPED_PRICING = Path(__file__).resolve().parent.parent / "config" / "pricing.yaml"


def pricing_path(config: Config, config_path: str) -> Path | None:
    if not config.pricing_file:
        return None
    p = resolve_path(config_path, config.pricing_file)
    if not p.exists() and config.pricing_file == "config/pricing.yaml" and _SHIPPED_PRICING.exists():
        return _SHIPPED_PRICING
    return p


def load_prices(config: Config, config_path: str) -> PriceTable:
    path = pricing_path(config, config_path)
    if path is None:
        return PriceTable.from_overrides(config.prices)
    return PriceTable.load(path, config.prices)


def build_store(config: Config) -> QuotaStore:
    tz = ZoneInfo(config.timezone)
    if config.store == "memory":
        return MemoryStore(tz=tz)
    from .quota.redis_store import RedisStore  # imported only when used: redis-py costs memory

    return RedisStore(config.store, tz=tz, timeout_seconds=config.store_timeout)


def create_app(config: Config, config_path: str = "config.yaml", *, registry: CollectorRegistry | None = None,
               tokenizer: Tokenizer | None = None) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes + 1)
    app[CONFIG] = config
    app[CONFIG_PATH] = config_path
    app[REGISTRY] = registry or CollectorRegistry()
    app[TRACKER] = Tracker()
    app[HANG_UPS] = HangUps()
    app[REQUEST_IDS] = RequestIds()
    app[DRAINING] = asyncio.Event()
    app[SERVICES] = Live()
    app[RELOAD] = lambda: reload(app)
    app.cleanup_ctx.append(_services_ctx(tokenizer))
    app.on_shutdown.append(_start_drain)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    add_admin_routes(app)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def build_services(config: Config, config_path: str, old: Services) -> Services:
    """Services for a (re)loaded config, keeping what outlives a reload: session, metrics, ledger,
    tokenizer, store (when its URL is unchanged) and the fail-open replay queue."""
    prices = load_prices(config, config_path)
    if config.store != old.config.store:
        raise ConfigError(f"{config_path}: store: changing the store needs a restart (was {old.config.store!r})")
    if config.ledger.path != old.config.ledger.path:
        raise ConfigError(f"{config_path}: ledger.path: changing the ledger file needs a restart")
    tok = old.tokenizer
    if config.tokenizer != old.config.tokenizer:
        tok = Tokenizer(config.tokenizer.encodings, config.tokenizer.default_encoding, lazy=True)
        tok.load()
    gate = Gate(config, old.gate.store, prices, old.metrics, ZoneInfo(config.timezone))
    gate.adopt(old.gate)
    adapters = {name: build_adapter(name, p) for name, p in config.providers.items()}
    keys = KeyRing(config, old.gate.store)
    keys.adopt(old.keys)
    breakers = {name: old.breakers.get(name) or Breaker(p.circuit_breaker) for name, p in config.providers.items()}
    return Services(config, adapters, Router(config, adapters), keys, tok, prices, gate, old.pool,
                    old.metrics, old.ledger, ZoneInfo(config.timezone), breakers)


async def reload(app: web.Application) -> str | None:
    """Reload the config file: None on success, else the error (the old config keeps serving).

    In-flight requests hold the Services they started with and finish under the old config.
    """
    live = app[SERVICES]
    path = app[CONFIG_PATH]
    try:
        config = await asyncio.to_thread(load_config, path)
        new = await asyncio.to_thread(build_services, config, path, live.get())
    except ConfigError as e:
        log.error("reload refused, keeping the running config: %s", e)
        return str(e)
    live.services = new
    log.info("config reloaded from %s", path)
    return None


def _services_ctx(tokenizer: Tokenizer | None):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        metrics = Metrics(app[REGISTRY], config.metrics.max_user_labels, config.metrics.max_team_labels, multiprocess)
        tok = tokenizer or Tokenizer(config.tokenizer.encodings, config.tokenizer.default_encoding, lazy=True)
        await asyncio.to_thread(tok.load)  # encodings load once, off the event loop
        metrics.tokenizer_fallback.set(1 if tok.fallback else 0)
        prices = load_prices(config, app[CONFIG_PATH])
        store = build_store(config)
        try:
            await store.start()
        except StoreError as e:  # a store down at start is served per on_store_failure
            log.warning("quota store not reachable at start: %s", e)
        tz = ZoneInfo(config.timezone)
        gate = Gate(config, store, prices, metrics, tz)
        # No Accept-Encoding: answers come back plain, so metering reads them without inflating.
        pool = UpstreamPool(keepalive_timeout=30)
        ledger = Ledger(config.ledger.path, metrics, fsync_interval=config.ledger.fsync_interval,
                        rotate_bytes=config.ledger.rotate_bytes, queue_size=config.ledger.queue_size,
                        stream=store if config.ledger.redis_stream and isinstance(store, EventStream) else None,
                        stream_maxlen=config.ledger.stream_maxlen)
        await ledger.start()
        adapters = {name: build_adapter(name, p) for name, p in config.providers.items()}
        live = app[SERVICES]
        breakers = {name: Breaker(p.circuit_breaker) for name, p in config.providers.items()}
        live.services = Services(config, adapters, Router(config, adapters), KeyRing(config, store), tok, prices, gate,
                                 pool, metrics, ledger, tz, breakers)
        replay = asyncio.get_running_loop().create_task(_replay_loop(live))
        # Other workers' scrapes read this one's values from files: fold observations in often.
        flusher = asyncio.get_running_loop().create_task(_flush_loop(metrics)) if multiprocess else None
        log.info("meterproxy ready: %d providers, store %s", len(adapters),
                 "memory" if config.store == "memory" else "redis")
        yield
        # Shutdown: in-flight handlers are done; finish their settle/record, then flush the ledger.
        await app[TRACKER].drain()
        await live.get().gate.replay_pending()
        replay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await replay
        if flusher is not None:
            flusher.cancel()
        metrics.flush()
        await ledger.close()
        await pool.close()
        await store.close()

    return ctx


async def _replay_loop(live: Live) -> None:
    """Push usage kept during a store outage back to the store once it answers again."""
    while True:
        await asyncio.sleep(0.5)
        gate = live.get().gate
        if gate.pending_replays:
            await gate.replay_pending()


async def _flush_loop(metrics: Metrics) -> None:
    while True:
        await asyncio.sleep(FLUSH_SECONDS)
        metrics.flush()


async def _start_drain(app: web.Application) -> None:
    app[DRAINING].set()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[DRAINING].is_set():
        return web.json_response({"status": "draining"}, status=503)
    svc = request.app[SERVICES].get()
    store_ok = await svc.gate.store.ping()
    body = {"status": "ok" if store_ok else "store_unreachable", "store": store_ok,
            "on_store_failure": svc.config.on_store_failure, "tokenizer_fallback": svc.tokenizer.fallback}
    # Fail-open still serves: ready. Closed mode cannot serve without the store.
    ready = store_ok or svc.config.on_store_failure == "open"
    return web.json_response(body, status=200 if ready else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    request.app[SERVICES].get().metrics.flush()  # here, on the loop: rendering runs in a thread
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)
    data = await asyncio.to_thread(generate_latest, registry)
    return web.Response(body=data, headers={"content-type": CONTENT_TYPE_LATEST})
