"""The OpenAPI 3.1 document of the admin API, served at /admin/openapi.json (kept beside the routes
in `admin.py`; a test checks every route is described)."""
from __future__ import annotations

from typing import Any


def _error_ref() -> dict[str, Any]:
    return {"$ref": "#/components/schemas/Error"}


def _date() -> dict[str, Any]:
    return {"type": "string", "format": "date", "pattern": r"^\d{4}-\d{2}-\d{2}$"}


def _usd() -> dict[str, Any]:
    return {"type": "string", "description": "US dollars as an exact decimal string (from integer micro-dollars)",
            "examples": ["12.345678"]}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Bad request", 401: "Missing or wrong admin key", 404: "Not found (or the admin API is off)",
            409: "Conflict", 503: "The store did not answer"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": _error_ref()}}} for c in codes}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


def admin_openapi() -> dict[str, Any]:
    """Built on each call: no shared mutable document."""
    date_s, usd_s = _date(), _usd()
    usage_row = {
        "type": "object",
        "description": "One group: its group keys (user, team, model, day, as asked) and its totals.",
        "properties": {
            "user": {"type": "string"}, "team": {"type": ["string", "null"]}, "model": {"type": "string"},
            "day": date_s,
            "requests": {"type": "integer"}, "input_tokens": {"type": "integer"},
            "output_tokens": {"type": "integer"}, "cached_input_tokens": {"type": "integer"},
            "cache_write_tokens": {"type": "integer"},
            "reasoning_tokens": {"type": "integer", "description": "part of output_tokens, not added again"},
            "cost_usd": usd_s, "cost_micro_usd": {"type": "integer"},
        },
        "required": ["requests", "input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens",
                     "reasoning_tokens", "cost_usd", "cost_micro_usd"],
    }

    forecast_s = {
        "type": "object",
        "description": "Month-end spend = month-to-date + (average daily spend of the 7 days before today) x "
                       "days left; runs_out_on is the day the budget is reached at that rate (null: not this month).",
        "properties": {
            "month": {"type": "string"}, "month_to_date_usd": usd_s, "burn_usd_per_day": usd_s,
            "month_end_usd": usd_s, "budget_usd": {"type": ["string", "null"]},
            "runs_out_on": {"type": ["string", "null"], "format": "date"},
            "month_to_date_micro_usd": {"type": "integer"}, "month_end_micro_usd": {"type": "integer"},
        },
    }

    limit_state = {
        "type": "object",
        "properties": {
            "scope": {"type": "string", "examples": ["user:alice", "team:research"]},
            "limit": {"type": "string", "enum": ["rpm", "tpm", "tokens_per_day", "usd_per_day", "usd_per_month",
                                                 "max_concurrent"]},
            "enforced": {"type": "boolean"},
            "value": {"type": "integer", "description": "requests, tokens, slots or micro-dollars"},
            "used": {"type": "integer"}, "remaining": {"type": "integer"},
            "reset_seconds": {"type": "number"}, "resets_at": {"type": ["string", "null"], "format": "date-time"},
            "value_usd": usd_s, "used_usd": usd_s, "remaining_usd": usd_s,
        },
    }

    key_s: dict[str, Any] = {
        "type": "object",
        "properties": {
            "id": {"type": "string"}, "user": {"type": "string"}, "team": {"type": ["string", "null"]},
            "plan": {"type": ["string", "null"]}, "trusted_user_header": {"type": "boolean"},
            "created": {"type": ["string", "null"], "format": "date-time"},
            "source": {"type": "string", "enum": ["store", "config"]},
        },
    }

    return {
        "openapi": "3.1.0",
        "info": {"title": "meterproxy admin API", "version": "1",
                 "description": "Usage and cost reports, limits and forecasts, virtual keys and config reload. "
                                "Off (404) unless the config sets admin_key."},
        "security": [{"adminKey": []}],
        "paths": {
            "/admin/usage": {"get": {
                "summary": "Usage and cost, filtered and grouped",
                "parameters": [
                    _query("user", "only this user"), _query("team", "only this team"), _query("model", "only this model"),
                    _query("since", "first day (default: the 1st of this month)", date_s),
                    _query("until", "last day, inclusive (default: today)", date_s),
                    _query("group_by", "comma-separated: user, team, model, day (default: user)"),
                ],
                "responses": {"200": _json({"type": "object", "properties": {
                    "since": date_s, "until": date_s, "group_by": {"type": "array", "items": {"type": "string"}},
                    "rows": {"type": "array", "items": usage_row}}}, "Usage rows"), **_errors(400, 401, 404, 503)},
            }},
            "/admin/subjects/{user}": {"get": {
                "summary": "A user's limits (used, remaining, reset) and month-end forecasts",
                "parameters": [{"name": "user", "in": "path", "required": True, "schema": {"type": "string"}},
                               _query("team", "meter as a member of this team (default: from the config or keys)"),
                               _query("plan", "meter on this plan (default: from the config or keys)")],
                "responses": {"200": _json({"type": "object", "properties": {
                    "user": {"type": "string"}, "team": {"type": ["string", "null"]}, "plan": {"type": "string"},
                    "limits": {"type": "array", "items": limit_state},
                    "forecast": {"type": "object", "additionalProperties": forecast_s,
                                 "description": "by scope: user:<user>, and team:<team> when in a team"}}},
                    "The subject"), **_errors(400, 401, 404, 503)},
            }},
            "/admin/keys": {
                "get": {"summary": "List virtual keys (never the keys themselves)",
                        "responses": {"200": _json({"type": "object", "properties": {
                            "keys": {"type": "array", "items": key_s}}}, "Keys"), **_errors(401, 404, 503)}},
                "post": {
                    "summary": "Create a virtual key; the key is returned once and stored only as sha256",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["user"], "additionalProperties": False,
                        "properties": {"user": {"type": "string"}, "plan": {"type": "string"},
                                       "team": {"type": "string"}, "trusted_user_header": {"type": "boolean"}}}}}},
                    "responses": {"201": _json({**key_s, "properties": {**key_s["properties"], "key": {"type": "string"}}},
                                               "The new key (shown once)"), **_errors(400, 401, 404, 503)},
                },
            },
            "/admin/keys/{id}": {"delete": {
                "summary": "Revoke a store-created key; effective on every replica at once",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"204": {"description": "Revoked"}, **_errors(401, 404, 409, 503)},
            }},
            "/admin/reload": {"post": {
                "summary": "Reload the config file (as SIGHUP); a bad file is refused and the old config kept",
                "responses": {"200": _json({"type": "object", "properties": {"reloaded": {"type": "boolean"}}},
                                           "Reloaded"), **_errors(400, 401, 404)},
            }},
            "/admin/openapi.json": {"get": {"summary": "This document",
                                            "responses": {"200": {"description": "OpenAPI 3.1"}, **_errors(401, 404)}}},
        },
        "components": {
            "securitySchemes": {"adminKey": {"type": "http", "scheme": "bearer",
                                             "description": "the config's admin_key"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "message": {"type": "string"}, "code": {"type": "string"}}}}}},
        },
    }
