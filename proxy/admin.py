"""The admin API under /admin: usage reports, a subject's limits and forecast, virtual keys, reload.

Off (404) unless the config sets `admin_key`; every call needs it as `Authorization: Bearer`,
compared in constant time. Answers are JSON; errors are `{"error": {"message", "code"}}`.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .auth import new_key
from .errors import StoreError
from .openapi import admin_openapi
from .quota.limits import LimitBook
from .quota.store import MONEY_LIMITS, LimitName, LimitState
from .records import Subject
from .services import RELOAD, SERVICES, Services
from .usage import daily_spend, forecast, forecast_days, parse_query, report, usd

log = logging.getLogger("meterproxy.admin")

Handler = Callable[[web.Request, Services], Awaitable[web.StreamResponse]]


class AdminError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def add_admin_routes(app: web.Application) -> None:
    """Register /admin/... routes on the app (before the catch-all proxy route)."""
    r = app.router
    r.add_get("/admin/usage", _guarded(usage))
    r.add_get("/admin/subjects/{user}", _guarded(subject))
    r.add_get("/admin/keys", _guarded(list_keys))
    r.add_post("/admin/keys", _guarded(create_key))
    r.add_delete("/admin/keys/{id}", _guarded(revoke_key))
    r.add_post("/admin/reload", _guarded(reload))
    r.add_get("/admin/openapi.json", _guarded(openapi))
    # Anything else under /admin is ours too: never forwarded to a provider.
    r.add_route("*", "/admin/{tail:.*}", _guarded(_unknown))
    r.add_route("*", "/admin", _guarded(_unknown))


def _guarded(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def run(request: web.Request) -> web.StreamResponse:
        svc = request.app[SERVICES].get()
        try:
            _authorize(request, svc.config.admin_key)
            return await handler(request, svc)
        except AdminError as e:
            return _error(e.status, e.code, e.message, e.headers)
        except StoreError as e:
            log.warning("admin %s %s: store failed: %s", request.method, request.path, e)
            return _error(503, "store_unavailable", f"The store did not answer: {e}", {"retry-after": "1"})

    return run


def _authorize(request: web.Request, admin_key: str | None) -> None:
    if not admin_key:
        raise AdminError(404, "not_found", "The admin API is off: set admin_key in the config to turn it on.")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else ""
    # Compare digests, so neither the key's bytes nor its length shape the comparison's timing.
    ok = hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(admin_key.encode()).digest())
    if not given or not ok:
        raise AdminError(401, "invalid_admin_key", "Send the admin key as Authorization: Bearer <admin_key>.",
                         {"www-authenticate": 'Bearer realm="meterproxy-admin"'})


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "code": code}}, status=status, headers=headers)


def _now(svc: Services) -> datetime:
    return datetime.now(svc.tz)


# ---------------------------------------------------------------- usage


async def usage(request: web.Request, svc: Services) -> web.Response:
    params: dict[str, str | None] = {k: request.query.get(k) for k in ("user", "team", "model", "since", "until")}
    params["group_by"] = ",".join(request.query.getall("group_by", [])) or None
    try:
        query = parse_query(params, _now(svc).date())
    except ValueError as e:
        raise AdminError(400, "invalid_request", str(e)) from None
    rows = await svc.gate.store.aggregates(query.days, query.user, query.team)
    return web.json_response({"since": query.since.isoformat(), "until": query.until.isoformat(),
                              "group_by": list(query.group_by), "rows": report(rows, query)})


# ---------------------------------------------------------------- subjects


async def subject(request: web.Request, svc: Services) -> web.Response:
    user = request.match_info["user"]
    who = await _subject_of(svc, user, request.query.get("team"), request.query.get("plan"))
    if who.plan not in svc.config.plans:
        raise AdminError(400, "invalid_request", f"No plan named {who.plan!r} in the config.")
    now = _now(svc)
    store = svc.gate.store
    limits = svc.gate.limits_for(who)
    day, month = now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")
    states = await store.usage(limits, LimitBook.tag_for(who), now.timestamp(), day, month)
    days = forecast_days(now.date())
    forecasts: dict[str, Any] = {}
    for scope, rows in (("user:" + user, await store.aggregates(days, user=user)),
                        *((("team:" + who.team, await store.aggregates(days, team=who.team)),) if who.team else ())):
        budgets = [lim.value for lim in limits if lim.scope == scope and lim.name is LimitName.USD_PER_MONTH
                   and lim.enforce]
        forecasts[scope] = forecast(daily_spend(rows), now, min(budgets) if budgets else None).as_json()
    return web.json_response({
        "user": who.user, "team": who.team, "plan": who.plan,
        "limits": [_state_json(st, now.timestamp()) for st in states],
        "forecast": forecasts,
    })


async def _subject_of(svc: Services, user: str, team: str | None, plan: str | None) -> Subject:
    """The user as a request would be metered: the config's users entry, else one of their keys."""
    ucfg = svc.config.users.get(user)
    key_team, key_plan = None, None
    if not (team or (ucfg and ucfg.team)) or not (plan or (ucfg and ucfg.plan)):
        for entry in svc.keys.entries().values():
            if entry.user == user:
                key_team, key_plan = key_team or entry.team, key_plan or entry.plan
        for stored in await svc.gate.store.list_keys():
            if stored.user == user:
                key_team, key_plan = key_team or stored.team, key_plan or stored.plan
    return Subject(user=user, team=team or (ucfg.team if ucfg else None) or key_team,
                   plan=plan or (ucfg.plan if ucfg else None) or key_plan or svc.config.default_plan, key_id="")


def _state_json(st: LimitState, now: float) -> dict[str, Any]:
    lim = st.limit
    out: dict[str, Any] = {"scope": lim.scope, "limit": lim.name.value, "enforced": lim.enforce,
                           "value": lim.value, "used": st.used, "remaining": st.remaining,
                           "reset_seconds": round(st.reset_seconds, 3),
                           "resets_at": _iso(now + st.reset_seconds) if st.reset_seconds else None}
    if lim.name in MONEY_LIMITS:
        out.update(value_usd=usd(lim.value), used_usd=usd(st.used), remaining_usd=usd(st.remaining))
    return out


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- keys


async def create_key(request: web.Request, svc: Services) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        raise AdminError(400, "invalid_request", "The body must be JSON: {\"user\": ..., \"plan\"?: ...}.") from None
    if not isinstance(body, dict):
        raise AdminError(400, "invalid_request", "The body must be a JSON object.")
    unknown = set(body) - {"user", "plan", "team", "trusted_user_header"}
    if unknown:
        raise AdminError(400, "invalid_request", f"Unknown fields: {', '.join(sorted(unknown))}.")
    user, plan, team = body.get("user"), body.get("plan"), body.get("team")
    trusted = body.get("trusted_user_header", False)
    if not isinstance(user, str) or not user.strip() or len(user) > 256:
        raise AdminError(400, "invalid_request", "`user` must be a non-empty string.")
    for name, v in (("plan", plan), ("team", team)):
        if v is not None and (not isinstance(v, str) or not v):
            raise AdminError(400, "invalid_request", f"`{name}` must be a non-empty string.")
    if not isinstance(trusted, bool):
        raise AdminError(400, "invalid_request", "`trusted_user_header` must be true or false.")
    if plan is not None and plan not in svc.config.plans:
        raise AdminError(400, "invalid_request", f"No plan named {plan!r}; plans: {', '.join(svc.config.plans)}.")
    key, stored = new_key(user.strip(), team, plan, trusted, time.time())
    await svc.gate.store.put_key(stored)
    log.info("admin: created key %s for user %s", stored.key_id, stored.user)
    return web.json_response({"id": stored.key_id, "key": key, "user": stored.user, "team": stored.team,
                              "plan": stored.plan, "trusted_user_header": stored.trusted,
                              "created": _iso(stored.created),
                              "note": "The key is shown only now; meterproxy keeps only its sha256."}, status=201)


async def list_keys(request: web.Request, svc: Services) -> web.Response:
    keys = await svc.gate.store.list_keys()
    return web.json_response({"keys": [
        {"id": k.key_id, "user": k.user, "team": k.team, "plan": k.plan, "trusted_user_header": k.trusted,
         "created": _iso(k.created), "source": "store"} for k in keys
    ] + [
        {"id": e.key_id, "user": e.user, "team": e.team, "plan": e.plan, "trusted_user_header": e.trusted,
         "created": None, "source": "config"} for e in svc.keys.entries().values()
    ]})


async def revoke_key(request: web.Request, svc: Services) -> web.StreamResponse:
    key_id = request.match_info["id"]
    if key_id in svc.keys.config_key_ids():
        raise AdminError(409, "config_key", f"Key {key_id} is set in the config file: remove it there and reload.")
    gone = await svc.gate.store.revoke_key(key_id)
    if gone is None:
        raise AdminError(404, "not_found", f"No key with id {key_id!r} in the store.")
    log.info("admin: revoked key %s of user %s", gone.key_id, gone.user)
    return web.Response(status=204)


# ---------------------------------------------------------------- reload, openapi, the rest


async def reload(request: web.Request, svc: Services) -> web.Response:

    error = await request.app[RELOAD]()
    if error is not None:
        raise AdminError(400, "invalid_config", f"Reload refused; the running config is kept: {error}")
    return web.json_response({"reloaded": True})


async def openapi(request: web.Request, svc: Services) -> web.Response:
    return web.json_response(admin_openapi())


async def _unknown(request: web.Request, svc: Services) -> web.Response:
    raise AdminError(404, "not_found", f"No admin route {request.method} {request.path}; see /admin/openapi.json.")
