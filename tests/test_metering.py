"""Metering through the real proxy: tokens equal the provider's usage, cost equals the price table,
and streams without usage, hang-ups, cuts and unpriced models are still metered right.

What was metered is read where users read it: the JSONL usage ledger and the Prometheus registry.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import yaml
from conftest import ALICE_KEY, ROOT, Proxy, StartProxy
from fakeprovider import FakeProvider, reply_text

from proxy.providers.anthropic import MessagesTap
from proxy.providers.gemini import GenerateTap
from proxy.providers.openai import ChatTap
from proxy.providers.sse import SSESplitter
from proxy.records import ApiKind, TokenCounts
from proxy.tokens import Tokenizer

CHAT = [{"role": "user", "content": "Say hello to the proxy"}]
ALICE = {"user": "alice", "team": "research"}
OAI_AUTH = {"Authorization": f"Bearer {ALICE_KEY}"}
PRICES: dict[str, Any] = yaml.safe_load((ROOT / "config" / "pricing.yaml").read_text())["models"]
TYPES = ("input", "cached_input", "cache_write", "output", "reasoning")


# -- what the provider reported, normalized by hand (DESIGN.md "Token counting and cost") -----------


def from_openai(u: dict[str, Any]) -> TokenCounts:
    """OpenAI: prompt_tokens = input + cached_input; reasoning is a part of completion_tokens."""
    if "input_tokens" in u:  # Responses API names
        prompt, out = u["input_tokens"], u["output_tokens"]
        cached = u.get("input_tokens_details", {}).get("cached_tokens", 0)
        reasoning = u.get("output_tokens_details", {}).get("reasoning_tokens", 0)
    else:
        prompt, out = u["prompt_tokens"], u.get("completion_tokens", 0)
        cached = u.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        reasoning = u.get("completion_tokens_details", {}).get("reasoning_tokens", 0)
    return TokenCounts(input=prompt - cached, cached_input=cached, output=out, reasoning=reasoning)


def from_anthropic(u: dict[str, Any]) -> TokenCounts:
    """Anthropic: input_tokens excludes cache reads and writes, which are their own types."""
    return TokenCounts(input=u["input_tokens"], cached_input=u["cache_read_input_tokens"],
                       cache_write=u["cache_creation_input_tokens"], output=u["output_tokens"])


def from_gemini(u: dict[str, Any]) -> TokenCounts:
    """Gemini: promptTokenCount includes cached content; thoughts are output on top of candidates."""
    cached = u.get("cachedContentTokenCount", 0)
    thoughts = u.get("thoughtsTokenCount", 0)
    return TokenCounts(input=u["promptTokenCount"] - cached, cached_input=cached,
                       output=u["candidatesTokenCount"] + thoughts, reasoning=thoughts)


def expected_cost(model: str, t: TokenCounts) -> int:
    """Micro-USD from config/pricing.yaml: USD per 1M tokens x tokens = micro-USD, rounded once."""
    p = {k: Decimal(str(v)) for k, v in PRICES[model].items()}
    micro = (t.input * p["input"] + t.cached_input * p.get("cached_input", p["input"])
             + t.cache_write * p.get("cache_write", p["input"])
             + (t.output - t.reasoning) * p["output"] + t.reasoning * p.get("reasoning", p["output"]))
    return int(micro.to_integral_value(ROUND_HALF_UP))


async def ledger(proxy: Proxy) -> list[dict[str, Any]]:
    await proxy.settled()
    path = proxy.svc.config.ledger.path
    assert path is not None
    file = Path(path)
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


async def only_event(proxy: Proxy) -> dict[str, Any]:
    events = await ledger(proxy)
    assert len(events) == 1, events
    return events[0]


def tokens_of(ev: dict[str, Any]) -> TokenCounts:
    return TokenCounts(*(ev[f"{t}_tokens"] for t in TYPES))


def oai(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{proxy.url}/openai/v1", api_key=ALICE_KEY, max_retries=0)


def claude(proxy: Proxy) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=f"{proxy.url}/anthropic", api_key=ALICE_KEY, max_retries=0)


def gemini_url(proxy: Proxy, model: str, stream: bool) -> str:
    verb = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return f"{proxy.url}/gemini/v1beta/models/{model}:{verb}"


GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "Hello Gemini, think hard"}]}]}


# -- per provider and mode: tokens equal the provider's report, cost equals the price table ---------


@dataclass(frozen=True)
class Case:
    name: str
    provider: str
    model: str  # the model label the request is metered under
    price_model: str  # the pricing.yaml entry it is priced by
    normalize: Callable[[dict[str, Any]], TokenCounts]
    streamed: bool
    run: Callable[[Proxy], Awaitable[None]]


async def _chat_plain(p: Proxy) -> None:
    async with oai(p) as c:
        r = await c.chat.completions.create(model="gpt-4o-mini", messages=CHAT, extra_headers={"x-fake-cached": "5"})
    assert r.choices[0].message.content == reply_text(12)


async def _chat_stream(p: Proxy) -> None:
    async with oai(p) as c:
        s = await c.chat.completions.create(model="gpt-5-mini", messages=CHAT, stream=True,
                                            extra_headers={"x-fake-cached": "6", "x-fake-reasoning": "7"})
        chunks = [ch async for ch in s]
    assert all(ch.usage is None for ch in chunks)  # the usage the proxy asked for is not shown


async def _chat_stream_usage_every_chunk(p: Proxy) -> None:
    async with oai(p) as c:
        s = await c.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True,
                                            extra_headers={"x-fake-usage-every-chunk": "1", "x-fake-cached": "2"})
        usages = [ch.usage.completion_tokens async for ch in s if ch.usage]
    assert len(usages) > 12  # cumulative usage on every chunk: summing them would be way off


async def _completions_plain(p: Proxy) -> None:
    async with oai(p) as c:
        r = await c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say this is a test please")
    assert r.choices[0].text == reply_text(12)


async def _completions_stream(p: Proxy) -> None:
    async with oai(p) as c:
        s = await c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say this is a test", stream=True)
        text = "".join([ch.choices[0].text async for ch in s if ch.choices])
    assert text == reply_text(12)


async def _embeddings(p: Proxy) -> None:
    async with oai(p) as c:
        # Enough words to cost more than half a micro-dollar at $0.02 per 1M tokens.
        await c.embeddings.create(model="text-embedding-3-small", input=["one two three " * 30, "four five"])


async def _responses_plain(p: Proxy) -> None:
    async with oai(p) as c:
        r = await c.responses.create(model="gpt-4o", input="Tell me a story", extra_headers={"x-fake-cached": "4"})
    assert r.output_text == reply_text(12)


async def _responses_stream(p: Proxy) -> None:
    async with oai(p) as c:
        async with c.responses.stream(model="gpt-5-mini", input="Tell me a story",
                                      extra_headers={"x-fake-cached": "3", "x-fake-reasoning": "9"}) as s:
            async for _ in s:
                pass


async def _azure_stream(p: Proxy) -> None:
    client = openai.AsyncAzureOpenAI(azure_endpoint=f"{p.url}/azure", api_key=ALICE_KEY,
                                     api_version="2024-10-21", max_retries=0)
    async with client:
        s = await client.chat.completions.create(model="my-gpt4o", messages=CHAT, stream=True,
                                                 extra_headers={"x-fake-cached": "2"})
        chunks = [ch async for ch in s]
    assert chunks[0].choices == []  # Azure's prompt-filter chunk came first, with empty choices


async def _anthropic_plain(p: Proxy) -> None:
    async with claude(p) as c:
        await c.messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=CHAT,  # type: ignore[arg-type]
                                extra_headers={"x-fake-cache-write": "30", "x-fake-cached": "40"})


async def _anthropic_stream(p: Proxy) -> None:
    async with claude(p) as c:
        async with c.messages.stream(model="claude-sonnet-4-6", max_tokens=100, messages=CHAT,  # type: ignore[arg-type]
                                     extra_headers={"x-fake-cache-write": "17", "x-fake-cached": "23",
                                                    "x-fake-reasoning": "5"}) as s:
            await s.get_final_message()


async def _gemini(p: Proxy, stream: bool) -> None:
    headers = {"x-goog-api-key": ALICE_KEY, "x-fake-cached": "4", "x-fake-reasoning": "9"}
    async with aiohttp.ClientSession() as s:
        async with s.post(gemini_url(p, "gemini-2.5-flash", stream), json=GEMINI_BODY, headers=headers) as r:
            assert r.status == 200
            await r.read()


async def _gemini_plain(p: Proxy) -> None:
    await _gemini(p, False)


async def _gemini_stream(p: Proxy) -> None:
    await _gemini(p, True)


CASES = [
    Case("openai-chat", "openai", "gpt-4o-mini", "gpt-4o-mini", from_openai, False, _chat_plain),
    Case("openai-chat-stream", "openai", "gpt-5-mini", "gpt-5-mini", from_openai, True, _chat_stream),
    Case("openai-compatible-usage-every-chunk", "openai", "gpt-4o-mini", "gpt-4o-mini", from_openai, True,
         _chat_stream_usage_every_chunk),
    Case("openai-completions", "openai", "gpt-3.5-turbo-instruct", "gpt-3.5-turbo-instruct", from_openai, False,
         _completions_plain),
    Case("openai-completions-stream", "openai", "gpt-3.5-turbo-instruct", "gpt-3.5-turbo-instruct", from_openai,
         True, _completions_stream),
    Case("openai-embeddings", "openai", "text-embedding-3-small", "text-embedding-3-small", from_openai, False,
         _embeddings),
    Case("openai-responses", "openai", "gpt-4o", "gpt-4o", from_openai, False, _responses_plain),
    Case("openai-responses-stream", "openai", "gpt-5-mini", "gpt-5-mini", from_openai, True, _responses_stream),
    # The deployment maps to gpt-4o; the reply names the snapshot gpt-4o-2024-08-06, priced as gpt-4o.
    Case("azure-stream", "azure", "gpt-4o", "gpt-4o", from_openai, True, _azure_stream),
    Case("anthropic", "anthropic", "claude-sonnet-4-6", "claude-sonnet-4-6", from_anthropic, False, _anthropic_plain),
    Case("anthropic-stream", "anthropic", "claude-sonnet-4-6", "claude-sonnet-4-6", from_anthropic, True,
         _anthropic_stream),
    Case("gemini-thinking", "gemini", "gemini-2.5-flash", "gemini-2.5-flash", from_gemini, False, _gemini_plain),
    Case("gemini-thinking-stream", "gemini", "gemini-2.5-flash", "gemini-2.5-flash", from_gemini, True,
         _gemini_stream),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_metered_tokens_and_cost_equal_the_providers_report(case: Case, proxy: Proxy,
                                                                 fake: FakeProvider) -> None:
    await case.run(proxy)
    reported = fake.last.reported_usage
    assert reported is not None
    want = case.normalize(reported)
    assert want.input > 0 and (want.output > 0 or case.name == "openai-embeddings")

    ev = await only_event(proxy)
    assert tokens_of(ev) == want
    assert (ev["input_source"], ev["output_source"]) == ("provider", "provider")
    assert (ev["provider"], ev["model"], ev["user"], ev["team"]) == (case.provider, case.model, "alice", "research")
    assert (ev["status"], ev["streamed"], ev["cut_short"], ev["priced"]) == (200, case.streamed, False, True)
    cost = expected_cost(case.price_model, want)
    assert cost > 0 and ev["cost_micro_usd"] == cost

    labels = {"provider": case.provider, "model": case.model, **ALICE}
    for t in TYPES:
        assert proxy.metric("meterproxy_tokens_total", {**labels, "type": t}) == getattr(want, t), t
    assert proxy.metric("meterproxy_cost_usd_total", labels) == pytest.approx(cost / 1_000_000, rel=1e-12)


async def test_cost_is_rounded_half_up_once_per_request(proxy: Proxy, fake: FakeProvider) -> None:
    """8 input, 4 cached, 5 output of gpt-4o-mini = 1.2 + 0.3 + 3.0 = 4.5 micro-USD: one rounding gives 5;
    rounding each type gives 1 + 0 + 3 = 4, and banker's rounding gives 4."""
    async with oai(proxy) as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=CHAT,
                                        extra_headers={"x-fake-cached": "4", "x-fake-chunks": "5"})
    ev = await only_event(proxy)
    assert tokens_of(ev) == TokenCounts(input=8, cached_input=4, output=5)
    assert expected_cost("gpt-4o-mini", tokens_of(ev)) == 5
    assert ev["cost_micro_usd"] == 5


async def test_anthropic_cumulative_output_is_assigned_not_added(proxy: Proxy, fake: FakeProvider) -> None:
    """message_start says output_tokens 1, message_delta says the cumulative 12: the answer is 12."""
    async with claude(proxy) as c:
        async with c.messages.stream(model="claude-sonnet-4-6", max_tokens=100, messages=CHAT) as s:  # type: ignore[arg-type]
            final = await s.get_final_message()
    assert final.usage.output_tokens == 12
    ev = await only_event(proxy)
    assert ev["output_tokens"] == 12 and ev["output_source"] == "provider"


async def test_gemini_thinking_model_reports_thoughts_by_default(start_proxy: StartProxy, fake: FakeProvider) -> None:
    """A '-thinking' model's thoughtsTokenCount (the fake sends 8 unasked) is output and reasoning."""
    proxy = await start_proxy({"prices": {"gemini-*-thinking-*": {"input": 0.1, "output": 3.5, "cached_input": 0.025}}})
    model = "gemini-2.0-flash-thinking-exp"
    async with aiohttp.ClientSession() as s:
        async with s.post(gemini_url(proxy, model, True), json=GEMINI_BODY, headers={"x-goog-api-key": ALICE_KEY}) as r:
            await r.read()
    reported = fake.last.reported_usage
    assert reported is not None and reported["thoughtsTokenCount"] == 8
    ev = await only_event(proxy)
    assert tokens_of(ev) == from_gemini(reported) and ev["reasoning_tokens"] == 8 and ev["output_tokens"] == 20
    micro = Decimal("0.1") * ev["input_tokens"] + Decimal("3.5") * 20
    assert ev["cost_micro_usd"] == int(micro.to_integral_value(ROUND_HALF_UP))


# -- streams the provider did not report usage for ------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """One streamed request sent as raw JSON, so the test knows the exact body the proxy estimated."""

    name: str
    kind: ApiKind
    model: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


RAW = [
    Raw("openai-chat", ApiKind.CHAT, "gpt-4o-mini", "/openai/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be brief."}, *CHAT],
         "stream": True}, OAI_AUTH),
    Raw("openai-completions", ApiKind.COMPLETIONS, "gpt-3.5-turbo-instruct", "/openai/v1/completions",
        {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test", "stream": True}, OAI_AUTH),
    Raw("openai-responses", ApiKind.RESPONSES, "gpt-4o", "/openai/v1/responses",
        {"model": "gpt-4o", "input": "Tell me a story", "stream": True}, OAI_AUTH),
    Raw("anthropic", ApiKind.MESSAGES, "claude-sonnet-4-6", "/anthropic/v1/messages",
        {"model": "claude-sonnet-4-6", "max_tokens": 100, "messages": CHAT, "stream": True},
        {"x-api-key": ALICE_KEY, "anthropic-version": "2023-06-01"}),
    Raw("gemini", ApiKind.GENERATE, "gemini-2.5-flash",
        "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", GEMINI_BODY,
        {"x-goog-api-key": ALICE_KEY}),
]


async def post_raw(proxy: Proxy, raw: Raw, **headers: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + raw.path, json=raw.body,
                          headers={**raw.headers, **{k.replace("_", "-"): v for k, v in headers.items()}}) as r:
            return r.status, await r.read()


@pytest.mark.parametrize("raw", RAW, ids=[r.name for r in RAW])
async def test_stream_without_usage_counts_the_streamed_text(raw: Raw, proxy: Proxy, fake: FakeProvider,
                                                             tokenizer: Tokenizer) -> None:
    status, body = await post_raw(proxy, raw, x_fake_no_usage="1")
    assert status == 200 and fake.last.reported_usage is None and fake.last.completed
    ev = await only_event(proxy)
    counted = tokenizer.count_text(raw.model, reply_text(12))
    assert counted != 12  # a tokenizer count, not the fake's word count
    assert ev["output_tokens"] == counted
    assert ev["input_tokens"] == tokenizer.estimate_prompt(raw.kind, raw.model, raw.body)
    assert ev["cached_input_tokens"] == ev["cache_write_tokens"] == ev["reasoning_tokens"] == 0
    source = tokenizer.source_for(raw.model)
    assert ev["output_source"] == ev["input_source"] == source
    if raw.model.startswith("gpt-"):
        assert source == "tokenizer"  # OpenAI models have a known encoding: a real count
    assert ev["cost_micro_usd"] == expected_cost(raw.model, tokens_of(ev))
    assert ev["streamed"] is True and ev["cut_short"] is False


async def test_prompt_estimate_through_the_proxy(proxy: Proxy, fake: FakeProvider, tokenizer: Tokenizer) -> None:
    """A non-streamed answer without usage: prompt from the estimate, output from the answer's text."""
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "name": "alice", "content": [{"type": "text", "text": "Count these words"}]}]
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Find a thing",
                                               "parameters": {"type": "object", "properties": {
                                                   "q": {"type": "string", "description": "query"}}}}}]
    for model in ("gpt-4o", "gpt-4"):  # o200k_base and cl100k_base
        async with oai(proxy) as c:
            await c.chat.completions.create(model=model, messages=messages, tools=tools,  # type: ignore[arg-type]
                                            extra_headers={"x-fake-no-usage": "1"})
    events = await ledger(proxy)
    assert [e["model"] for e in events] == ["gpt-4o", "gpt-4"]
    for ev in events:
        want = tokenizer.estimate_prompt(ApiKind.CHAT, ev["model"], {"messages": messages, "tools": tools})
        assert ev["input_tokens"] == want and ev["input_source"] == "tokenizer"
        assert ev["output_tokens"] == tokenizer.count_text(ev["model"], reply_text(12))
        assert ev["output_source"] == "tokenizer" and ev["streamed"] is False
    assert events[0]["input_tokens"] != events[1]["input_tokens"]  # the encoding follows the model


async def test_embeddings_without_usage_bill_the_estimate(proxy: Proxy, fake: FakeProvider,
                                                          tokenizer: Tokenizer) -> None:
    inputs = ["one two three", "four five"]
    async with oai(proxy) as c:
        await c.embeddings.create(model="text-embedding-3-small", input=inputs, extra_headers={"x-fake-no-usage": "1"})
    ev = await only_event(proxy)
    want = tokenizer.estimate_prompt(ApiKind.EMBEDDINGS, "text-embedding-3-small", {"input": inputs})
    assert want > 0 and (ev["input_tokens"], ev["output_tokens"], ev["input_source"]) == (want, 0, "tokenizer")


# -- hang-ups and cuts ------------------------------------------------------------------------------


async def _hang_up_after(proxy: Proxy, raw: Raw, events_wanted: int, delay: str) -> float:
    """Read `events_wanted` SSE events, then drop the connection; returns when it was dropped."""
    async with aiohttp.ClientSession() as s:
        resp = await s.post(proxy.url + raw.path, json=raw.body,
                            headers={**raw.headers, "x-fake-chunks": "40", "x-fake-chunk-delay": delay})
        assert resp.status == 200
        seen = b""
        while seen.count(b"\n\n") < events_wanted:
            seen += await resp.content.readany()
        resp.close()  # drops the connection mid-body
        return time.monotonic()


@pytest.mark.parametrize(("delay", "events"), [("0.05", 4), ("3", 2)], ids=["between-chunks", "upstream-silent"])
async def test_client_hang_up_closes_upstream_and_meters_what_was_generated(
        delay: str, events: int, proxy: Proxy, fake: FakeProvider, tokenizer: Tokenizer) -> None:
    """With 3 s between chunks the proxy cannot wait for its next write to notice the hang-up."""
    raw = RAW[0]
    closed_at = await _hang_up_after(proxy, raw, events, delay)  # the role chunk, then content chunks
    await fake.wait_until(lambda: fake.last.disconnected, timeout=2)
    rec = fake.last
    assert rec.disconnected_at is not None and rec.disconnected_at - closed_at < 1.0
    assert not rec.completed and events - 1 <= rec.chunks_sent <= events + 1
    ev = await only_event(proxy)
    # Every chunk the provider put on the wire is billed by it, delivered to the client or not.
    assert ev["output_tokens"] == tokenizer.count_text(raw.model, reply_text(rec.chunks_sent))
    assert ev["output_source"] == "tokenizer"
    assert ev["input_tokens"] == tokenizer.estimate_prompt(raw.kind, raw.model, raw.body)
    assert (ev["status"], ev["streamed"], ev["cut_short"]) == (200, True, True)


async def test_anthropic_hang_up_keeps_the_reported_prompt(proxy: Proxy, fake: FakeProvider,
                                                           tokenizer: Tokenizer) -> None:
    raw = RAW[3]
    await _hang_up_after(proxy, raw, 6, "0.05")  # message_start, block start, ping, 3 deltas
    await fake.wait_until(lambda: fake.last.disconnected, timeout=2)
    rec = fake.last
    started = rec.reported_usage
    assert started is not None
    ev = await only_event(proxy)
    assert (ev["input_tokens"], ev["input_source"]) == (started["input_tokens"], "provider")
    assert ev["output_tokens"] == tokenizer.count_text(raw.model, reply_text(rec.chunks_sent))
    assert ev["cut_short"] is True


async def test_upstream_cut_gives_the_openai_client_a_clean_api_error(proxy: Proxy, fake: FakeProvider,
                                                                      tokenizer: Tokenizer) -> None:
    text = ""
    async with oai(proxy) as c:
        stream = await c.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True,
                                                 extra_headers={"x-fake-cut-after": "4"})
        with pytest.raises(openai.APIError) as raised:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
    # A plain APIError from the error event, not APIConnectionError from a broken chunked body.
    assert type(raised.value) is openai.APIError
    assert "cut the stream" in raised.value.message
    assert text == reply_text(4)
    ev = await only_event(proxy)
    assert (ev["status"], ev["cut_short"], ev["error"]) == (200, True, "upstream_unreachable")
    assert ev["output_tokens"] == tokenizer.count_text("gpt-4o-mini", reply_text(4))
    assert ev["input_tokens"] == tokenizer.estimate_prompt(ApiKind.CHAT, "gpt-4o-mini", {"messages": CHAT})
    assert ev["cost_micro_usd"] == expected_cost("gpt-4o-mini", tokens_of(ev)) > 0


async def test_upstream_cut_gives_the_anthropic_client_a_clean_error(proxy: Proxy, fake: FakeProvider,
                                                                     tokenizer: Tokenizer) -> None:
    async with claude(proxy) as c:
        with pytest.raises(anthropic.APIStatusError) as raised:
            async with c.messages.stream(model="claude-sonnet-4-6", max_tokens=100, messages=CHAT,  # type: ignore[arg-type]
                                         extra_headers={"x-fake-cut-after": "3"}) as s:
                async for _ in s:
                    pass
    assert not isinstance(raised.value, anthropic.APIConnectionError)
    assert "cut the stream" in str(raised.value)
    started = fake.last.reported_usage
    assert started is not None
    ev = await only_event(proxy)
    assert (ev["status"], ev["cut_short"], ev["error"]) == (200, True, "upstream_unreachable")
    assert ev["input_tokens"] == started["input_tokens"]
    assert ev["output_tokens"] == tokenizer.count_text("claude-sonnet-4-6", reply_text(3))


@pytest.mark.parametrize("raw", [RAW[0], RAW[2], RAW[4]], ids=["openai-chat", "openai-responses", "gemini"])
async def test_upstream_cut_ends_the_body_cleanly_with_an_error_event(raw: Raw, proxy: Proxy,
                                                                      fake: FakeProvider) -> None:
    status, body = await post_raw(proxy, raw, x_fake_cut_after="4")  # read() raises on a broken body
    assert status == 200
    events = [e for e in re.split(rb"\r?\n\r?\n", body) if e.strip()]
    if raw.kind == ApiKind.CHAT:
        assert events[-1] == b"data: [DONE]"
        events.pop()
    last = json.loads(events[-1].split(b"data: ", 1)[1])
    assert "cut the stream" in json.dumps(last)
    ev = await only_event(proxy)
    assert (ev["status"], ev["cut_short"], ev["error"]) == (200, True, "upstream_unreachable")


async def test_cut_stream_with_cumulative_usage_meters_the_last_report(proxy: Proxy, fake: FakeProvider) -> None:
    """Gemini (and servers repeating usage per chunk) count what arrived: the last report is exact."""
    for raw, headers, normalize in ((RAW[4], {}, from_gemini),
                                    (RAW[0], {"x_fake_usage_every_chunk": "1"}, from_openai)):
        await post_raw(proxy, raw, x_fake_cut_after="5", **headers)
        reported = fake.last.reported_usage
        assert reported is not None
        [*_, ev] = await ledger(proxy)
        assert tokens_of(ev) == normalize(reported) and ev["output_tokens"] >= 5
        assert (ev["output_source"], ev["cut_short"]) == ("provider", True)


@pytest.mark.parametrize("raw", [RAW[0], RAW[3]], ids=["openai-chat", "anthropic"])
async def test_provider_error_event_mid_stream_is_metered_and_recorded(raw: Raw, proxy: Proxy, fake: FakeProvider,
                                                                      tokenizer: Tokenizer) -> None:
    status, body = await post_raw(proxy, raw, x_fake_error_after="3")
    assert status == 200 and (b"fake mid-stream error" in body or b"Overloaded" in body)
    ev = await only_event(proxy)
    # Anthropic's message_start said output_tokens 1: the text that followed is the better count.
    assert ev["output_tokens"] == tokenizer.count_text(raw.model, reply_text(3))
    assert ev["error"] and ev["status"] == 200


def test_settle_adds_text_after_cumulative_usage_and_takes_the_larger_otherwise(tokenizer: Tokenizer) -> None:
    from proxy.estimate import Estimate
    from proxy.providers import Call
    from proxy.records import CountSource, Usage
    from proxy.relay import Relayed
    from proxy.settle import actual_usage

    call = Call(ApiKind.GENERATE, "/v1beta/models/gemini-2.5-flash:streamGenerateContent", "gemini-2.5-flash", True)
    est = Estimate("gemini-2.5-flash", 9, CountSource.ESTIMATE, 100, None, 1, 0, True)
    reported = Usage(TokenCounts(input=7, output=5, reasoning=2), model="gemini-2.5-flash")
    tail = " and then some more words"
    n = tokenizer.count_text("gemini-2.5-flash", tail)
    got = Relayed(200, reported, output_final=False, text=lambda: tail, streamed=True, text_beyond_usage=True)
    usage = actual_usage(call, est, got, tokenizer)
    assert usage.tokens == TokenCounts(input=7, output=5 + n, reasoning=2)
    assert usage.input_source == CountSource.PROVIDER
    got = Relayed(200, reported, output_final=False, text=lambda: tail, streamed=True, text_beyond_usage=False)
    assert actual_usage(call, est, got, tokenizer).tokens.output == max(5, n)
    got = Relayed(200, reported, output_final=True, text=lambda: tail, streamed=True, text_beyond_usage=True)
    assert actual_usage(call, est, got, tokenizer) == reported  # final usage is the truth


async def test_malformed_sse_line_is_relayed_and_metering_holds(proxy: Proxy, fake: FakeProvider,
                                                                tokenizer: Tokenizer) -> None:
    body = {"model": "gpt-4o-mini", "messages": CHAT, "stream": True, "stream_options": {"include_usage": True}}
    headers = {**OAI_AUTH, "x-fake-malformed": "1"}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{fake.url}/v1/chat/completions", json=body, headers=headers) as r:
            direct = await r.read()
        async with s.post(f"{proxy.url}/openai/v1/chat/completions", json=body, headers=headers) as r:
            via = await r.read()
        reported = fake.last.reported_usage
        async with s.post(f"{proxy.url}/openai/v1/chat/completions", json=body,
                          headers={**headers, "x-fake-no-usage": "1"}) as r:
            await r.read()

    def norm(b: bytes) -> bytes:
        return re.sub(rb'"id":"[^"]*"|"created":\d+', b"", b)

    assert b"data: {this is not json" in via and norm(via) == norm(direct)
    assert reported is not None
    with_usage, without = await ledger(proxy)
    assert tokens_of(with_usage) == from_openai(reported) and with_usage["output_source"] == "provider"
    assert without["output_tokens"] == tokenizer.count_text("gpt-4o-mini", reply_text(12))
    assert without["error"] is None and without["cut_short"] is False


# -- unpriced models ------------------------------------------------------------------------------


async def test_unpriced_model_is_metered_at_zero_and_flagged_once_per_model(
        proxy: Proxy, fake: FakeProvider, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with oai(proxy) as c:
        for model in ("gpt-unpriced-one", "gpt-unpriced-one", "gpt-unpriced-two"):
            await c.chat.completions.create(model=model, messages=CHAT)
    events = await ledger(proxy)
    assert len(events) == 3
    for ev in events:
        assert ev["cost_micro_usd"] == 0 and ev["priced"] is False and ev["output_tokens"] == 12
    assert proxy.metric("meterproxy_unpriced_requests_total", {"model": "gpt-unpriced-one"}) == 2
    assert proxy.metric("meterproxy_unpriced_requests_total", {"model": "gpt-unpriced-two"}) == 1
    assert proxy.metric("meterproxy_tokens_total", {"provider": "openai", "model": "gpt-unpriced-one",
                                                    **ALICE, "type": "output"}) == 24
    lines = [r.getMessage() for r in caplog.records if "no price" in r.getMessage()]
    assert len([m for m in lines if "gpt-unpriced-one" in m]) == 1
    assert len([m for m in lines if "gpt-unpriced-two" in m]) == 1
    # A priced model is not flagged.
    async with oai(proxy) as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
    await proxy.settled()
    assert proxy.metric("meterproxy_unpriced_requests_total", {"model": "gpt-4o-mini"}) == 0


async def test_on_unpriced_reject_gives_400_in_the_providers_shape(start_proxy: StartProxy,
                                                                  fake: FakeProvider) -> None:
    proxy = await start_proxy({"on_unpriced": "reject"})
    async with oai(proxy) as c:
        with pytest.raises(openai.BadRequestError) as oe:
            await c.chat.completions.create(model="gpt-unpriced-one", messages=CHAT)
    assert oe.value.status_code == 400 and "no price" in oe.value.message
    assert isinstance(oe.value.body, dict) and oe.value.body["type"] == "invalid_request_error"
    async with claude(proxy) as ac:
        with pytest.raises(anthropic.BadRequestError) as ae:
            await ac.messages.create(model="claude-unpriced-9", max_tokens=10, messages=CHAT)  # type: ignore[arg-type]
    body = ae.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and "no price" in body["error"]["message"]
    async with aiohttp.ClientSession() as s:
        async with s.post(gemini_url(proxy, "gemini-unpriced-9", False), json=GEMINI_BODY,
                          headers={"x-goog-api-key": ALICE_KEY}) as r:
            assert r.status == 400
            err = (await r.json())["error"]
    assert (err["code"], err["status"]) == (400, "INVALID_ARGUMENT") and "no price" in err["message"]
    assert fake.requests == []  # nothing reached the provider
    async with oai(proxy) as c:  # priced models still go through
        await c.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
    assert len(fake.requests) == 1


# -- the usage record and the count-source metric -------------------------------------------------


async def test_usage_record_fields_and_count_sources(proxy: Proxy, fake: FakeProvider) -> None:
    async with oai(proxy) as c:
        s = await c.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True,
                                            extra_headers={"x-fake-chunk-delay": "0.01"})
        [_ async for _ in s]
    await proxy.settled()
    assert proxy.metric("meterproxy_token_count_source_total", {"source": "provider"}) == 2  # input and output
    assert proxy.metric("meterproxy_token_count_source_total", {"source": "tokenizer"}) == 0
    async with oai(proxy) as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=CHAT, extra_headers={"x-fake-no-usage": "1"})
    streamed, plain = await ledger(proxy)
    assert proxy.metric("meterproxy_token_count_source_total", {"source": "tokenizer"}) == 2
    assert proxy.metric("meterproxy_token_count_source_total", {"source": "provider"}) == 2

    assert streamed["request_id"] and streamed["event_id"] and streamed["key_id"]
    assert (streamed["status"], streamed["streamed"], streamed["cut_short"], streamed["error"]) == (200, True, False, None)
    assert streamed["api"] == "chat" and streamed["plan"] == "free"
    # 12 chunks 10 ms apart: the first token comes well before the end.
    assert 0 < streamed["ttft_ms"] < streamed["latency_ms"] and streamed["latency_ms"] >= 100
    assert abs(streamed["time"] - time.time()) < 30
    assert (plain["streamed"], plain["ttft_ms"], plain["status"]) == (False, None, 200)
    assert proxy.metric("meterproxy_time_to_first_token_seconds_count",
                        {"provider": "openai", "model": "gpt-4o-mini"}) == 1


# -- the tokenizer runs once, at the end, and only without final usage ------------------------------


class CountingTokenizer(Tokenizer):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def count_text(self, model: str, text: str) -> int:
        self.calls += 1
        return super().count_text(model, text)


@pytest.mark.parametrize("tokenizer", [CountingTokenizer()], ids=["counting"])
async def test_no_per_chunk_tokenizing(tokenizer: CountingTokenizer, proxy: Proxy, fake: FakeProvider) -> None:
    chat = RAW[0]
    await post_raw(proxy, chat, x_fake_chunks="60")  # reports usage: the tokenizer is not needed
    await post_raw(proxy, RAW[4], x_fake_chunks="60")  # Gemini: cumulative usage on every chunk
    await proxy.settled()
    assert tokenizer.calls == 0
    await post_raw(proxy, chat, x_fake_chunks="60", x_fake_no_usage="1")
    await proxy.settled()
    assert tokenizer.calls == 1  # once for the whole stream, not per chunk


def _feed(tap: Any, stream: bytes) -> list[bytes]:
    splitter = SSESplitter()
    out = [tap.on_event(ev) for ev in splitter.feed(stream)]
    tap.finish()
    return [b for b in out if b]


def _sse(*objs: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return b"".join(head + b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs)


def test_taps_drop_kept_text_once_usage_is_final() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "hello there"}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    tap = ChatTap(strip=True)
    relayed = _feed(tap, _sse(chunk, chunk) + b"data: [DONE]\n\n")
    assert tap.output_text() == "hello therehello there" and tap.kept_bytes > 0  # a fallback may be needed
    tap = ChatTap(strip=True)
    relayed = _feed(tap, _sse(chunk, chunk, usage) + b"data: [DONE]\n\n")
    assert tap.output_final and tap.output_text() == "" and tap.usage is not None
    assert len(relayed) == 3  # the usage-only chunk the client did not ask for was dropped

    tap2 = MessagesTap()
    _feed(tap2, _sse({"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1}}},
                     event="message_start")
          + _sse({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}},
                 event="content_block_delta"))
    assert not tap2.output_final and tap2.output_text() == "hi"  # cut before message_delta: keep it
    _feed(tap2, _sse({"type": "message_delta", "usage": {"output_tokens": 2}}, event="message_delta")
          + _sse({"type": "message_stop"}, event="message_stop"))
    assert tap2.output_final and tap2.output_text() == ""


def test_anthropic_stream_without_usage_keeps_its_text() -> None:
    """A message_delta without usage must not mark the output final (the text is all there is)."""
    tap = MessagesTap()
    _feed(tap, _sse({"type": "message_start", "message": {"usage": None}}, event="message_start")
          + _sse({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}},
                 event="content_block_delta")
          + _sse({"type": "message_delta", "usage": None}, event="message_delta")
          + _sse({"type": "message_stop"}, event="message_stop"))
    assert tap.usage is None and not tap.output_final and tap.output_text() == "hi"


def test_cumulative_usage_taps_report_only_text_after_the_last_usage() -> None:
    def gem(text: str, usage: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"candidates": [{"content": {"parts": [{"text": text}]}}]}
        if usage:
            out["usageMetadata"] = {"promptTokenCount": 4, "candidatesTokenCount": 2}
        return out

    tap = GenerateTap()
    _feed(tap, _sse(gem("a", True), gem("b", True), gem("c", False)))
    assert tap.usage is not None and tap.usage.tokens.output == 2
    assert tap.text_beyond_usage and tap.unreported_text() == "c" and tap.output_text() == "abc"


async def test_non_sse_gemini_array_stream_is_metered_even_when_cut() -> None:
    """streamGenerateContent without alt=sse is one JSON array; a cut one keeps its whole elements."""
    from proxy.relay import _json_items

    items = [{"usageMetadata": {"candidatesTokenCount": i}, "candidates": []} for i in range(1, 4)]
    whole = json.dumps(items, indent=1).encode()
    assert _json_items(whole) == items
    assert _json_items(whole[: whole.rindex(b"candidatesTokenCount") + 5]) == items[:2]
    assert _json_items(b"[{") == []
