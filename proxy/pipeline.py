"""The request's way: route → authenticate → estimate → admit → forward → relay → settle → record.

`handle` reads top to bottom in that order. Settle and record always run (errors and hang-ups
too) as one tracked task, off the response path, that shutdown waits for.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .auth import END_USER_HEADER, presented_key
from .errors import BadRequest, PayloadTooLarge, ProxyError, RequestTimeout
from .estimate import Estimate, estimate
from .providers import Adapter, Call, StreamTap
from .quota.gate import Ticket
from .records import Relayed, Subject, UsageRecord
from .relay import relay_body, relay_stream
from .resilience import Attempt, AttemptsFailed, forward
from .route import Target
from .services import HANG_UPS, REQUEST_IDS, SERVICES, TRACKER, Services, Tracker
from .settle import actual_usage

log = logging.getLogger("meterproxy.pipeline")

# Body fields whose JSON type the proxy relies on; a wrong type is the client's 400, not our 500.
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "model": str, "stream": bool, "messages": list, "max_tokens": int, "max_completion_tokens": int,
    "max_output_tokens": int, "n": int, "stream_options": dict, "tools": list, "contents": list,
    "generationConfig": dict, "input": (str, list), "prompt": (str, list), "system": (str, list),
}


@dataclass(slots=True)
class Flight:
    """What is known about one request so far; settle and record read it whatever happened."""

    request_id: str
    started: float  # unix seconds
    t0: float  # perf_counter at arrival
    subject: Subject | None = None
    adapter: Adapter | None = None
    call: Call | None = None
    est: Estimate | None = None
    ticket: Ticket | None = None
    relayed: Relayed | None = None
    status: int = 0
    error: str | None = None
    t_forward: float = 0.0
    retries: int = 0
    headers: dict[str, str] = field(default_factory=dict)


async def handle(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES].get()  # a snapshot: a reload swaps it, in-flight requests keep theirs
    f = Flight(request.app[REQUEST_IDS].new(), time.time(), time.perf_counter())
    f.headers["x-request-id"] = f.request_id
    try:
        return await _run(request, svc, f)
    except ProxyError as e:
        f.status, f.error = e.status, f.error or e.code
        return _error_response(svc, request, f, e)
    finally:
        if f.adapter is not None:
            svc.metrics.inflight_add(f.adapter.name, -1)
        if f.subject is not None:
            if f.call is None:  # refused after authentication (body, route): still one metered request
                f.adapter = f.adapter or svc.guess_adapter(request)
                f.call = f.adapter.call(request.method, "/", request.query, None)
            tracker = request.app[TRACKER]
            tracker.soon(_settle_and_record, svc, f, time.perf_counter(), tracker)


async def _run(request: web.Request, svc: Services, f: Flight) -> web.StreamResponse:
    # route (by path; the unified /v1 route needs the body's model first)
    target = svc.router.by_path(request.path)
    # authenticate
    key = presented_key(request.headers, request.query)
    end_user = request.headers.get(END_USER_HEADER)
    f.subject = svc.keys.configured_subject(key, end_user) or svc.keys.subject(await svc.keys.lookup(key), end_user)
    if request.content.is_eof():  # the whole body came with the headers (the usual case): no wait, no timer
        raw = await _read_body(request, svc.config.max_body_bytes)
    else:
        try:
            async with asyncio.timeout(svc.config.client_body_timeout):
                raw = await _read_body(request, svc.config.max_body_bytes)
        except TimeoutError:
            raise RequestTimeout(f"The request body did not arrive within {svc.config.client_body_timeout:g}s.") from None
    body = _parse_json(raw, request)
    if target is None:
        target = svc.router.by_model(request.path, body.get("model") if body else None)
    f.adapter = adapter = target.adapter
    svc.metrics.inflight_add(adapter.name, 1)
    f.call = call = adapter.call(request.method, target.path, request.query, body)
    # estimate
    f.est = est = estimate(adapter, call, body, svc.tokenizer, svc.prices, svc.today(),
                           svc.config.default_max_output_tokens)
    if not est.priced and call.model and svc.config.on_unpriced == "reject" and est.prompt_tokens:
        raise BadRequest(f"Model {est.model!r} has no price in meterproxy's price table (on_unpriced: reject).")
    # admit
    ticket = svc.gate.admit_now(f.subject, adapter, est, f.request_id)
    if ticket is None:
        ticket = await svc.gate.admit(f.subject, adapter, call, est, f.request_id)
    f.ticket = ticket
    f.headers.update(ticket.headers)
    # forward
    out = raw
    strip = False
    if body is not None:
        changed = False
        if ticket.clamp_output is not None:
            adapter.set_max_output_tokens(call, body, ticket.clamp_output)
            changed = True
        prepared, strip = adapter.prepare_body(call, body)
        if changed or prepared:
            out = orjson.dumps(body)  # only re-serialized when something in it changed
    f.t_forward = time.perf_counter()
    try:
        outcome = await forward(svc.pool, _attempts(svc, target, call, est.model, request), svc.breakers, call,
                                request, out, lambda name, kind: svc.metrics.upstream_errors.labels(name, kind).inc())
    except AttemptsFailed as e:
        f.retries = e.retries
        raise e.error from None
    upstream, f.retries = outcome.upstream, outcome.retries
    # relay (with the adapter that answered: a fallback reads its own wire format)
    answered = outcome.adapter
    if call.stream and upstream.status < 300:
        # A ticket's watch is only ever cleared after admission: without one, no per-chunk check.
        overrun = None if ticket.watch is None else (
            lambda tap: svc.gate.overrun(ticket, tap, svc.tokenizer, est.model))
        resp, f.relayed = await relay_stream(request, request.app[HANG_UPS], upstream, answered, call, strip,
                                             f.headers, f.t0, overrun)
    else:
        async with upstream:
            resp, f.relayed = await relay_body(upstream, answered, call, f.headers)
    f.status = f.relayed.status
    return resp


async def _read_body(request: web.Request, limit: int) -> bytes:
    length = request.content_length
    if length is not None:
        if length > limit:
            raise PayloadTooLarge(f"The request body is {length} bytes; the limit is {limit}.")
        if not length:
            return b""
        try:
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError:
            raise BadRequest("The request body ended before its Content-Length.") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is over the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(raw: bytes, request: web.Request) -> dict[str, Any] | None:
    if not raw or request.method not in ("POST", "PUT", "PATCH"):
        return None
    ctype = request.headers.get("content-type", "")
    if "json" not in ctype and raw[:1] not in (b"{", b"["):
        return None  # uploads (multipart, audio) pass through unparsed
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"The request body is not valid JSON: {e}.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    for name, v in body.items():  # the body's few fields, not every known one
        kind = _FIELD_TYPES.get(name)
        if kind is not None and v is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
            raise BadRequest(f"Field `{name}` has the wrong type: expected {_type_name(kind)}.")
    return body


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", bool: "a boolean", list: "an array", int: "an integer", dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _attempts(svc: Services, target: Target, call: Call, model: str, request: web.Request) -> list[Attempt]:
    """The routed provider, then other deployments of the model, then its configured fallbacks."""
    # rel_url, not raw_path: an absolute-form request line (`POST http://host/...`) keeps only its path.
    raw = request.rel_url.raw_path[target.strip:] or "/"
    primary = target.adapter
    out = [Attempt(primary, raw)]
    for name in (*target.alternates, *primary.config.fallbacks):
        alt = svc.adapters[name]
        if any(a.adapter is alt for a in out):
            continue
        path = raw if alt.config.type == primary.config.type else alt.native_path(call, model)
        if path is not None:
            out.append(Attempt(alt, path))
    return out


def _error_response(svc: Services, request: web.Request, f: Flight, e: ProxyError) -> web.Response:
    adapter = f.adapter or svc.guess_adapter(request)
    headers = {**f.headers, **e.headers, "content-type": "application/json"}
    return web.Response(status=e.status, body=adapter.error_body(e), headers=headers)


def _settle_and_record(svc: Services, f: Flight, t_end: float, tracker: Tracker) -> None:
    """Right after the response: settle at once where nothing has to wait (the embedded store),
    else with a command sent now where the store can, else in a tracked task."""
    rec, overhead = _record_of(svc, f, t_end)
    if svc.gate.settle_now(f.ticket, rec):
        _recorded(svc, f, rec, overhead)
        return
    settled = svc.gate.settle_soon(f.ticket, rec)  # Redis: sent now, recorded on its reply
    if settled is not None:
        tracker.track(settled, functools.partial(_recorded, svc, f, rec, overhead))
    else:
        tracker.spawn(_settle_later(svc, f, rec, overhead))


async def _settle_later(svc: Services, f: Flight, rec: UsageRecord, overhead: float | None) -> None:
    await svc.gate.settle(f.ticket, rec)  # one store round trip: reservation → actual, aggregates
    _recorded(svc, f, rec, overhead)


def _record_of(svc: Services, f: Flight, t_end: float) -> tuple[UsageRecord, float | None]:
    """The request's usage record, and the time the proxy itself added (None: not forwarded)."""
    assert f.subject is not None and f.call is not None and f.adapter is not None
    call, est, got = f.call, f.est, f.relayed
    if est is None:  # refused before the estimate (bad body): nothing to bill
        est = Estimate(f.adapter.pricing_model(call.model), 0, svc.tokenizer.source, 0, None, 1, 0, True)
    usage = actual_usage(call, est, got, svc.tokenizer)
    day = svc.day_of(f.started)
    model = usage.model if usage.model and svc.prices.lookup(usage.model, day) else est.model
    cost, priced = svc.prices.cost_micro_usd(model, usage.tokens, day)
    overhead = None
    if got is not None and f.t_forward:
        overhead = (f.t_forward - f.t0) + max(0.0, t_end - got.upstream_done)
    sub = f.subject
    rec = UsageRecord(  # positional, in field order: a third of the cost of keywords
        f.request_id,  # event_id
        f.request_id,  # request_id
        f.started,  # time
        sub.user, sub.team, sub.plan, sub.key_id,
        f.adapter.name,  # provider
        est.model,  # model
        call.kind.value,  # api_kind
        usage.tokens, usage.input_source, usage.output_source,
        cost,  # cost_micro_usd
        priced or not usage.tokens.total,  # priced
        f.status,  # status
        t_end - f.t0,  # latency_seconds
        got.ttft_seconds if got else None,  # ttft_seconds
        bool(got and got.streamed),  # streamed
        bool(got and (got.cut_short or got.client_gone)),  # cut_short
        f.retries,  # retries
        f.error or (got.error if got else None),  # error
    )
    return rec, overhead


def _recorded(svc: Services, f: Flight, rec: UsageRecord, overhead: float | None) -> None:
    """After settle: metrics, the ledger, the log line."""
    assert f.adapter is not None
    kind = _upstream_error_kind(f, f.relayed)
    if kind is not None:
        svc.metrics.upstream_errors.labels(f.adapter.name, kind).inc()
    svc.metrics.observe(rec, overhead)
    svc.ledger.write(rec)
    # One line per request: a warning when the upstream failed it, else debug. Only the key's short id.
    level = logging.WARNING if rec.status >= 500 or kind is not None else logging.DEBUG
    if log.isEnabledFor(level):
        log.log(level, "request %s: %s %s %s -> %d%s (user %s, key %s, %d retries, %.3fs)", rec.request_id,
                rec.provider, rec.api_kind, rec.model, rec.status, f" {rec.error}" if rec.error else "", rec.user,
                rec.key_id, rec.retries, rec.latency_seconds, extra={"request_id": rec.request_id})


def _upstream_error_kind(f: Flight, got: Relayed | None) -> str | None:
    """How a stream failed after its first byte (failed attempts are counted as they happen)."""
    if got is None:
        return None
    if got.status >= 500 or got.status == 429:
        return None  # counted by forward()
    if got.cut_short and not got.client_gone:
        return "stream_cut" if got.error != "upstream_timeout" else "stream_idle"
    if got.error:
        return "stream_error"
    return None


__all__ = ["handle", "StreamTap"]
