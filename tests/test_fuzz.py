"""Fuzzing: hypothesis drives thousands of generated requests (bodies, headers, paths, odd auth) at one
proxy, and a misbehaving upstream answers streams with random and malformed SSE. The proxy never
answers 500 or a traceback, stays healthy, and meters every request it authenticated.

Hypothesis runs in a worker thread with a plain blocking HTTP client, so the proxy keeps running on
the test's event loop between examples; the ledger is checked once at the end against the request
ids of every authenticated response.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import logging
import re
import socket
import struct
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pytest
from conftest import ALICE_KEY, BACKEND_KEY, BOB_KEY, Proxy, StartProxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PROVIDERS = ("openai", "azure", "anthropic", "gemini")
CHAOS = ("chaos", "chaos_anthropic", "chaos_gemini")
VALID = (ALICE_KEY, BOB_KEY, BACKEND_KEY)
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=list(HealthCheck))

# ---------------------------------------------------------------- a misbehaving upstream


@dataclass(frozen=True)
class Plan:
    """What the chaos upstream answers one request with."""

    status: int
    content_type: str
    pieces: tuple[bytes, ...]  # each written as its own chunk of a chunked body
    end: str  # "clean" | "reset" (TCP RST) | "close" (FIN without the chunked terminator)


@dataclass
class Chaos:
    plans: dict[str, Plan] = field(default_factory=dict)  # x-chaos-id -> plan (set from the fuzz thread)
    url: str = ""
    served: int = 0


async def _serve_chaos(chaos: Chaos, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:  # the proxy may keep the connection alive across requests
            head = await reader.readuntil(b"\r\n\r\n")
            headers = dict(re.findall(rb"(?m)^([^:\r\n]+):\s*([^\r\n]*)", head))
            lower = {k.lower(): v for k, v in headers.items()}
            length = int(lower.get(b"content-length", b"0"))
            if length:
                await reader.readexactly(length)
            plan = chaos.plans.get(lower.get(b"x-chaos-id", b"").decode())
            chaos.served += 1
            if plan is None:
                plan = Plan(404, "application/json", (b'{"error": {"message": "no plan"}}',), "clean")
            writer.write(f"HTTP/1.1 {plan.status} X\r\nContent-Type: {plan.content_type}\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n".encode())
            for piece in plan.pieces:
                if piece:
                    writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    await writer.drain()
            if plan.end == "reset":
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                           struct.pack("ii", 1, 0))
                break
            if plan.end == "close":
                break
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.transport.abort()


@asynccontextmanager
async def chaos_upstream() -> AsyncIterator[Chaos]:
    chaos = Chaos()
    server = await asyncio.start_server(lambda r, w: _serve_chaos(chaos, r, w), "127.0.0.1", 0)
    chaos.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield chaos
    finally:
        server.close()


# ---------------------------------------------------------------- a blocking client that sends anything


@dataclass(frozen=True)
class Sent:
    method: str
    target: str  # path and query, as sent
    headers: tuple[tuple[str, str], ...]
    body: bytes | None


@dataclass
class Tally:
    authenticated: set[str] = field(default_factory=set)  # request ids the ledger must hold
    statuses: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def send(port: int, req: Sent) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.putrequest(req.method, req.target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", "fuzz")
        conn.putheader("Connection", "close")
        for name, value in req.headers:
            conn.putheader(name, value)
        if req.body is not None:
            conn.putheader("Content-Length", str(len(req.body)))
        conn.endheaders(req.body)
        resp = conn.getresponse()
        body = resp.read()  # IncompleteRead if the proxy broke off a body: a failure
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def routable(target: str) -> bool:
    """Whether the path alone lets the request reach authentication (else a 404 comes first)."""
    path = unquote(target.split("?", 1)[0])
    first = path.split("/")[1] if path.count("/") else ""
    return first in (*PROVIDERS, *CHAOS, "v1", "v1beta") and (first != "v1" or path.startswith("/v1/")
                                                              or path == "/v1")


def check(port: int, req: Sent, key_ok: bool, tally: Tally) -> tuple[int, bytes]:
    status, headers, body = send(port, req)
    assert status != 500 and status < 600, (req, status, body[:300])
    assert b"Traceback" not in body, (req, body[:300])
    authenticated = key_ok and routable(req.target)
    rid = headers.get("x-request-id")
    with tally.lock:
        tally.statuses[status] = tally.statuses.get(status, 0) + 1
        if authenticated:
            assert rid, (req, status, body[:300])
            tally.authenticated.add(rid)
    return status, body


# ---------------------------------------------------------------- strategies

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)), max_leaves=12)
models = st.sampled_from(["gpt-4o-mini", "gpt-4o", "claude-sonnet-4-6", "gemini-2.5-flash",
                          "text-embedding-3-small", "my-gpt4o", "unknown-model", "", "gpt-*"])
messages = st.one_of(
    st.just([{"role": "user", "content": "hello fuzz"}]),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                     "content": st.one_of(st.text(max_size=30), json_values)}), max_size=3),
    json_values)
# Known fields with values of any type: the proxy must answer 400 for a wrong type, not fail.
known_fields = st.fixed_dictionaries({}, optional={
    "model": st.one_of(models, json_values), "messages": messages, "stream": st.one_of(st.booleans(), json_values),
    "max_tokens": st.one_of(st.integers(-5, 10**9), json_values), "max_completion_tokens": json_values,
    "max_output_tokens": st.one_of(st.integers(-5, 100), json_values), "n": st.one_of(st.integers(-3, 200), json_values),
    "stream_options": json_values, "input": st.one_of(st.text(max_size=20), json_values), "prompt": json_values,
    "system": json_values, "tools": json_values, "contents": json_values, "generationConfig": json_values,
})
bodies = st.one_of(
    st.none(),
    known_fields.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.text(max_size=100).map(lambda t: ("{" + t).encode("utf-8", "surrogatepass")),
    st.sampled_from([b"{", b"[]", b"null", b'{"model": "gpt-4o-mini", "messages": [', b"\xff\xfe{}",
                     b'{"a": 1e999999}', b'{"model": "x"' + b" " * 3000 + b"}", b"{" * 5000]),
)
endpoints = st.sampled_from([
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/responses/input_tokens",
    "/v1/messages", "/v1/messages/count_tokens", "/v1/models", "/v1beta/models/gemini-2.5-flash:generateContent",
    "/v1beta/models/gemini-2.5-flash:streamGenerateContent", "/v1beta/models/x:countTokens",
    "/openai/deployments/my-gpt4o/chat/completions", "/openai/deployments/nope/embeddings", "/", ""])
segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCXYZ0123456789-_~:@!$&'()*+,;=", min_size=1, max_size=12)
random_tail = st.lists(st.one_of(segment, st.sampled_from(["%20", "%41", "v1", "models"])), max_size=4).map(
    lambda parts: "/" + "/".join(parts))
prefixes = st.sampled_from(["/openai", "/azure", "/anthropic", "/gemini", "", "/nosuch", "/admin", "/metrics",
                            "/OPENAI", "/openai%2F"])
queries = st.lists(st.one_of(
    st.sampled_from(["alt=sse", "api-version=2024-10-21", f"key={ALICE_KEY}", "key=nope", "key=", "beta=true"]),
    st.tuples(segment, segment).map("=".join)), max_size=3).map(lambda q: "?" + "&".join(q) if q else "")
# (headers, verdict): "valid" / "invalid" key presented in a header, or "none" (then ?key= decides), as
# the design documents: Bearer first, then x-api-key, api-key, x-goog-api-key, then the query.
Auth = tuple[tuple[tuple[str, str], ...], str]
auth: st.SearchStrategy[Auth] = st.one_of(
    st.just(((), "none")),
    st.sampled_from(VALID).map(lambda k: ((("Authorization", f"Bearer {k}"),), "valid")),
    st.sampled_from(VALID).map(lambda k: ((("x-api-key", k),), "valid")),
    st.sampled_from(VALID).map(lambda k: ((("api-key", k),), "valid")),
    st.sampled_from(VALID).map(lambda k: ((("x-goog-api-key", k),), "valid")),
    st.sampled_from(VALID).map(lambda k: ((("Authorization", f"bearer    {k}  "),), "valid")),
    st.sampled_from(VALID).map(lambda k: ((("Authorization", f"Basic {k}"), ("x-api-key", k)), "valid")),
    st.sampled_from(VALID).map(lambda k: ((("Authorization", f"Bearer {k}x"),), "invalid")),
    st.sampled_from(VALID).map(lambda k: ((("Authorization", "Bearer nope"), ("x-api-key", k)), "invalid")),
    st.sampled_from(["Bearer", "Bearer ", "Basic", "", "Bearer \t", "Token abc"]).map(
        lambda v: ((("Authorization", v),), "none")),
    st.just(((("Authorization", "Bearer " + "k" * 5000),), "invalid")),
)
header_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40).map(str.strip)
extra_headers = st.lists(st.one_of(
    st.tuples(st.sampled_from(["anthropic-version", "content-type", "x-meterproxy-user", "accept", "x-stainless-os",
                               "openai-organization", "anthropic-beta", "x-fake-chunks", "x-fake-cut-after",
                               "x-fake-malformed", "x-fake-no-usage", "x-fake-error-after", "accept-encoding",
                               "connection", "te", "transfer-encoding", "expect", "upgrade", "x-forwarded-host",
                               "x-request-id"]),
              header_value),
    st.tuples(st.sampled_from(["content-type"]),
              st.sampled_from(["application/json", "text/plain", "multipart/form-data; boundary=x",
                               "application/json; charset=latin-1", ""])),
    st.tuples(st.just("x-fake-status"), st.sampled_from(["400", "403", "404", "413", "429"])),
    st.tuples(st.just("x-fake-chunks"), st.integers(0, 4).map(str)),
), max_size=5)

_SAFE_FAKE = {"x-fake-chunks", "x-fake-cut-after", "x-fake-error-after"}  # int() in the fake: keep them ints


def _clean(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    out = []
    names: set[str] = set()
    for name, value in headers:
        if name.lower() in names:
            continue  # aiohttp's parser refuses some repeated headers (Content-Type) before the proxy sees them
        names.add(name.lower())
        if name in _SAFE_FAKE and not value.isdigit():
            continue
        if name in ("transfer-encoding", "connection", "expect", "upgrade", "te"):
            continue  # framing is the client library's job here; the raw-socket tests cover these
        out.append((name, value))
    return tuple(out)


def _verdict(header_verdict: str, query: str) -> bool:
    if header_verdict != "none":
        return header_verdict == "valid"
    keys = [p[4:] for p in query.lstrip("?").split("&") if p.startswith("key=")]
    return bool(keys) and keys[0] in VALID


def _request(method: str, prefix: str, tail: str, query: str, body: bytes | None, a: Auth,
             extra: list[tuple[str, str]]) -> tuple[Sent, bool]:
    path = prefix + tail if (prefix + tail).startswith("/") else "/" + prefix + tail
    sent = Sent(method, path + query, _clean(a[0] + tuple(extra)), body if method not in ("GET", "HEAD") else None)
    return sent, _verdict(a[1], query)


requests = st.builds(
    _request, st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    prefixes, st.one_of(endpoints, random_tail), queries, bodies, auth, extra_headers)

# Misbehaving SSE: random bytes, missing blank lines, huge lines, invalid UTF-8, broken JSON, usage
# objects with negative, huge, fractional or non-numeric counts.
counts = st.one_of(st.integers(-10, 10**6), st.just(2**70), st.floats(allow_nan=False), st.text(max_size=3),
                   st.none())


def _event(obj: Any, event: str | None = None) -> bytes:
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + json.dumps(obj).encode() + b"\n\n"


usage_events = st.one_of(
    st.builds(lambda p, c, text: _event({"choices": [{"index": 0, "delta": {"content": text}}],
                                         "usage": {"prompt_tokens": p, "completion_tokens": c}}),
              counts, counts, st.text(max_size=10)),
    st.builds(lambda i, o: _event({"type": "message_start", "message": {"usage": {"input_tokens": i,
                                                                               "output_tokens": o}}},
                                  "message_start"), counts, counts),
    st.builds(lambda o: _event({"type": "message_delta", "usage": {"output_tokens": o}}, "message_delta"), counts),
    st.builds(lambda t: _event({"type": "content_block_delta", "delta": {"type": "text_delta", "text": t}},
                               "content_block_delta"), st.text(max_size=10)),
    st.builds(lambda p, c: _event({"candidates": [{"content": {"parts": [{"text": "hi"}]}}],
                                   "usageMetadata": {"promptTokenCount": p, "candidatesTokenCount": c}}),
              counts, counts),
    st.builds(lambda u: _event({"type": "response.completed", "response": {"usage": u}}, "response.completed"),
              json_values),
)
sse_pieces = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=100).map(lambda d: b"data: " + d + b"\n\n"),
    json_values.map(lambda v: b"data: " + json.dumps(v).encode() + b"\n\n"),
    usage_events,
    st.sampled_from([b"data: [DONE]\n\n", b"\n", b"\r\n", b"\r", b"\n\n\n", b"event: error\n", b": ping\n\n",
                     b"data: {\"choices\": [{\"delta\": {\"content\": \"cut", b"data: \xff\xfe\xc3\x28\n\n",
                     b"data:" + b"y" * 200_000 + b"\n\n", b"z" * 100_000, b"[", b"{\"candidates\": [", b"]"]),
)
plans = st.builds(Plan, st.sampled_from([200] * 8 + [400, 429, 503]),
                  st.sampled_from(["text/event-stream", "text/event-stream", "application/json", "text/plain", ""]),
                  st.lists(sse_pieces, max_size=12).map(tuple), st.sampled_from(["clean", "clean", "reset", "close"]))
chaos_targets = st.sampled_from([
    ("/chaos/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],
                                    "stream": True}),
    ("/chaos/v1/responses", {"model": "gpt-4o-mini", "input": "x", "stream": True}),
    ("/chaos/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}),
    ("/chaos_anthropic/v1/messages", {"model": "claude-sonnet-4-6", "max_tokens": 50, "stream": True,
                                      "messages": [{"role": "user", "content": "x"}]}),
    ("/chaos_gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
     {"contents": [{"role": "user", "parts": [{"text": "x"}]}]}),
    ("/chaos_gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent",
     {"contents": [{"role": "user", "parts": [{"text": "x"}]}]}),
])


# ---------------------------------------------------------------- the test


# No retries (one upstream request per example) and a breaker that never opens: a chaos upstream fails
# on purpose, and an open circuit would answer for it without asking.
_CHAOS_RESILIENCE: dict[str, Any] = {"retries": {"attempts": 0}, "timeouts": {"idle": 2},
                                     "circuit_breaker": {"failures": 10**9}}


async def _fuzz_proxy(start_proxy: StartProxy, chaos: Chaos) -> Proxy:
    return await start_proxy({
        "providers": {
            **{name: {"retries": {"attempts": 0}} for name in PROVIDERS},
            "chaos": {"type": "openai", "base_url": chaos.url, "api_key": "sk-chaos",
                      **_CHAOS_RESILIENCE},
            "chaos_anthropic": {"type": "anthropic", "base_url": chaos.url, "api_key": "sk-chaos",
                                **_CHAOS_RESILIENCE},
            "chaos_gemini": {"type": "gemini", "base_url": chaos.url, "api_key": "sk-chaos",
                             **_CHAOS_RESILIENCE}},
        "users": {"fuzzer": {"plan": "free"}},
        "max_body_bytes": 64 * 1024,
        "client_body_timeout": 5,
    })


async def test_fuzzed_requests_and_upstream_streams(start_proxy: StartProxy, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with chaos_upstream() as chaos:
        proxy = await _fuzz_proxy(start_proxy, chaos)
        port = int(proxy.url.rsplit(":", 1)[1])
        tally = Tally()

        @settings(FUZZ, max_examples=2200)
        @given(requests)
        def fuzz_requests(case: tuple[Sent, bool]) -> None:
            check(port, *case, tally)

        counter = iter(range(1, 10**9))
        calls = [0]

        @settings(FUZZ, max_examples=500)
        @given(chaos_targets, plans, st.sampled_from(VALID))
        def fuzz_upstream(target: tuple[str, dict[str, Any]], plan: Plan, key: str) -> None:
            calls[0] = next(counter)
            cid = str(calls[0])
            chaos.plans[cid] = plan
            status, _ = check(port, Sent("POST", target[0], (("Authorization", f"Bearer {key}"),
                                                             ("content-type", "application/json"),
                                                             ("x-chaos-id", cid),
                                                             ("anthropic-version", "2023-06-01")),
                                         json.dumps(target[1]).encode()), True, tally)
            assert status == plan.status or status in (502, 504), (plan, status)

        await asyncio.to_thread(fuzz_requests)
        await asyncio.to_thread(fuzz_upstream)
        await proxy.settled()
        assert chaos.served == calls[0] > 400  # every chaos example reached the chaos upstream

        # Still healthy, and every authenticated request is in the ledger exactly once.
        status, _, _ = await asyncio.to_thread(send, port, Sent("GET", "/healthz", (), None))
        assert status == 200
        events = [json.loads(line) for line in proxy.svc.ledger.path.read_text().splitlines()]  # type: ignore[union-attr]
        ids = [e["request_id"] for e in events]
        assert len(ids) == len(set(ids)) == len(tally.authenticated)
        assert set(ids) == tally.authenticated
        assert all(e[f] >= 0 for e in events for f in ("input_tokens", "output_tokens", "cost_micro_usd"))
        # The fuzz reached every kind of answer, not just one refusal.
        assert {200, 400, 401, 404} <= set(tally.statuses), tally.statuses
        assert len(tally.authenticated) > 1000
        assert proxy.metric("meterproxy_inflight_requests", {"provider": "chaos"}) == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors[:5]]
