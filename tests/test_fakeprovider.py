"""Checks that the fake upstream speaks each provider's wire format well enough for the official
SDKs to parse it, and that its misbehaviour controls do what the proxy tests rely on.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from fakeprovider import PROMPT_OVERHEAD, FakeProvider, reply_text, start_fake_provider

PROMPT = "count these five words"
PROMPT_TOKENS = 4 + PROMPT_OVERHEAD


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    async with start_fake_provider() as f:
        yield f


@pytest.fixture
async def oai(fake: FakeProvider) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{fake.url}/v1", api_key="sk-real", max_retries=0) as c:
        yield c


@pytest.fixture
async def claude(fake: FakeProvider) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=fake.url, api_key="sk-ant-real", max_retries=0) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


MESSAGES: Any = [{"role": "user", "content": PROMPT}]


async def test_chat_plain_reports_deterministic_usage(fake: FakeProvider, oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    assert resp.choices[0].message.content == reply_text(5)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (PROMPT_TOKENS, 5)
    rec = fake.last
    assert rec.reported_usage == resp.usage.model_dump(exclude_none=True)
    assert rec.api_key == "sk-real" and rec.path == "/v1/chat/completions"
    assert rec.json()["messages"] == MESSAGES and rec.completed


async def test_chat_stream_has_usage_only_when_asked(fake: FakeProvider, oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"x-fake-chunks": "4"})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply_text(4)
    assert all(c.usage is None for c in chunks)
    assert fake.last.reported_usage is None

    stream = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-fake-chunks": "4"})
    chunks = [c async for c in stream]
    *body, tail = chunks
    assert tail.choices == [] and tail.usage is not None
    assert (tail.usage.prompt_tokens, tail.usage.completion_tokens) == (PROMPT_TOKENS, 4)
    assert all(c.usage is None for c in body)
    assert fake.last.reported_usage == tail.usage.model_dump(exclude_none=True)
    assert fake.last.chunks_sent == 4 and fake.last.completed


async def test_chat_usage_controls(fake: FakeProvider, oai: openai.AsyncOpenAI,
                                   http: aiohttp.ClientSession) -> None:
    resp = await oai.chat.completions.create(
        model="o3", messages=MESSAGES, extra_headers={
            "x-fake-chunks": "3", "x-fake-cached": "10", "x-fake-reasoning": "7",
            "x-fake-cache-write": "2"})
    u = resp.usage
    assert u is not None and u.prompt_tokens_details and u.completion_tokens_details
    assert u.prompt_tokens == PROMPT_TOKENS + 10 + 2
    assert u.prompt_tokens_details.cached_tokens == 10
    assert u.completion_tokens == 3 + 7 and u.completion_tokens_details.reasoning_tokens == 7

    resp = await oai.chat.completions.create(model="m", messages=MESSAGES,
                                             extra_headers={"x-fake-no-usage": "1"})
    assert resp.usage is None and fake.last.reported_usage is None

    stream = await oai.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-fake-chunks": "3", "x-fake-usage-every-chunk": "1"})
    outputs = [c.usage.completion_tokens async for c in stream if c.usage is not None]
    assert outputs == [0, 1, 2, 3, 3, 3]  # role chunk, 3 content, finish, final usage chunk
    async with http.post(f"{fake.url}/v1/chat/completions", json=json.loads(fake.last.body),
                         headers={"Authorization": "Bearer k", "x-fake-chunks": "3",
                                  "x-fake-usage-every-chunk": "1"}) as r:
        events = (await r.text()).split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])  # plain data events, no event: lines


async def test_completions_stream(fake: FakeProvider, oai: openai.AsyncOpenAI) -> None:
    stream = await oai.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT, stream=True,
                                          stream_options={"include_usage": True}, max_tokens=3)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply_text(3)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == PROMPT_TOKENS


async def test_responses_plain_and_stream(fake: FakeProvider, oai: openai.AsyncOpenAI) -> None:
    resp = await oai.responses.create(model="gpt-4.1", input=PROMPT, max_output_tokens=6,
                                      extra_headers={"x-fake-cached": "3", "x-fake-reasoning": "2"})
    assert resp.output_text == reply_text(6)
    assert resp.usage is not None
    assert resp.usage.input_tokens == PROMPT_TOKENS + 3
    assert resp.usage.input_tokens_details.cached_tokens == 3
    assert resp.usage.output_tokens == 6 + 2 and resp.usage.output_tokens_details.reasoning_tokens == 2

    stream = await oai.responses.create(model="gpt-4.1", input=PROMPT, stream=True,
                                        extra_headers={"x-fake-chunks": "3"})
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 3,
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1]
    assert done.type == "response.completed" and done.response.usage is not None
    assert done.response.usage.output_tokens == 3 and done.response.output_text == reply_text(3)
    assert fake.last.reported_usage == done.response.usage.model_dump(exclude_none=True)

    count = await oai.responses.input_tokens.count(model="gpt-4.1", input=PROMPT)
    assert count.input_tokens == PROMPT_TOKENS


async def test_embeddings_base64_decoded_by_sdk(fake: FakeProvider, oai: openai.AsyncOpenAI) -> None:
    resp = await oai.embeddings.create(model="text-embedding-3-small", input=["a b", "c"], dimensions=4)
    assert json.loads(fake.last.body)["encoding_format"] == "base64"
    assert [d.embedding for d in resp.data] == [[0.0, 0.25, 0.5, 0.75], [1.0, 1.25, 1.5, 1.75]]
    assert resp.usage.prompt_tokens == 3 + PROMPT_OVERHEAD


async def test_azure_chat(fake: FakeProvider, http: aiohttp.ClientSession) -> None:
    async with openai.AsyncAzureOpenAI(azure_endpoint=fake.url, api_version="2024-10-21",
                                       api_key="azure-real", max_retries=0) as az:
        resp = await az.chat.completions.create(model="my-deployment", messages=MESSAGES)
        assert resp.model == fake.azure_model and resp.usage is not None
        assert fake.last.path == "/openai/deployments/my-deployment/chat/completions"
        assert fake.last.api_key == "azure-real" and "api-version=2024-10-21" in fake.last.query_string

        stream = await az.chat.completions.create(
            model="my-deployment", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True}, extra_headers={"x-fake-chunks": "2"})
        chunks = [c async for c in stream]
    first = chunks[0].model_dump()
    assert first["choices"] == [] and first["prompt_filter_results"] and first.get("usage") is None
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2

    async with http.post(f"{fake.url}/openai/deployments/d/chat/completions",
                         json={"messages": MESSAGES}, headers={"api-key": "k"}) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "missing_api_version"


async def test_anthropic_messages(fake: FakeProvider, claude: anthropic.AsyncAnthropic) -> None:
    msg = await claude.messages.create(model="claude-x", max_tokens=4, messages=MESSAGES,
                                       extra_headers={"x-fake-cache-write": "5", "x-fake-cached": "9"})
    assert msg.content[0].type == "text" and msg.content[0].text == reply_text(4)
    assert msg.stop_reason == "max_tokens"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (PROMPT_TOKENS, 4)
    assert msg.usage.cache_creation_input_tokens == 5 and msg.usage.cache_read_input_tokens == 9
    assert fake.last.api_key == "sk-ant-real" and fake.last.headers["anthropic-version"]

    async with claude.messages.stream(model="claude-x", max_tokens=100, messages=MESSAGES,
                                      extra_headers={"x-fake-chunks": "5", "x-fake-reasoning": "2"}) as s:
        kinds = [e.type async for e in s]
        final = await s.get_final_message()
    assert kinds.count("text") == 5 and kinds[-1] == "message_stop"
    assert final.content[0].type == "text" and final.content[0].text == reply_text(5)
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, 5 + 2)
    assert fake.last.reported_usage is not None and fake.last.reported_usage["output_tokens"] == 7

    count = await claude.messages.count_tokens(model="claude-x", messages=MESSAGES)
    assert count.input_tokens == PROMPT_TOKENS


async def test_anthropic_stream_raw_sequence(fake: FakeProvider, http: aiohttp.ClientSession) -> None:
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01", "x-fake-chunks": "2"}
    body = {"model": "claude-x", "max_tokens": 10, "messages": MESSAGES, "stream": True}
    async with http.post(f"{fake.url}/v1/messages", json=body, headers=headers) as r:
        text = await r.text()
    events = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert events == ["message_start", "content_block_start", "ping", "content_block_delta",
                      "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    datas = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert datas[0]["message"]["usage"]["output_tokens"] == 1
    assert datas[-2]["usage"] == {"output_tokens": 2}

    async with http.post(f"{fake.url}/v1/messages", json=body, headers={"x-api-key": "k"}) as r:
        assert r.status == 400 and (await r.json())["type"] == "error"
    async with http.post(f"{fake.url}/v1/messages", json=body,
                         headers={"anthropic-version": "2023-06-01"}) as r:
        assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"


async def test_gemini_generate_and_stream(fake: FakeProvider, http: aiohttp.ClientSession) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
            "generationConfig": {"maxOutputTokens": 3}}
    base = f"{fake.url}/v1beta/models/gemini-2.0-flash-thinking"
    async with http.post(f"{base}:generateContent", json=body,
                         headers={"x-goog-api-key": "g-real", "x-fake-cached": "2"}) as r:
        data = await r.json()
    assert data["candidates"][0]["content"]["parts"][0]["text"] == reply_text(3)
    u = data["usageMetadata"]
    assert (u["promptTokenCount"], u["candidatesTokenCount"], u["cachedContentTokenCount"]) == (
        PROMPT_TOKENS + 2, 3, 2)
    assert u["totalTokenCount"] == u["promptTokenCount"] + 3 + u["thoughtsTokenCount"] > 0
    assert fake.last.api_key == "g-real"

    async with http.post(f"{base}:streamGenerateContent?alt=sse&key=q", json=body) as r:
        raw = await r.text()
    chunks = [json.loads(e[6:]) for e in raw.split("\r\n\r\n") if e]
    assert [c["usageMetadata"]["candidatesTokenCount"] for c in chunks] == [1, 2, 3]
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == reply_text(3)
    assert chunks[-1]["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert fake.last.reported_usage == chunks[-1]["usageMetadata"] and fake.last.api_key == "q"

    async with http.post(f"{base}:countTokens", json=body, headers={"x-goog-api-key": "k"}) as r:
        assert (await r.json())["totalTokens"] == PROMPT_TOKENS
    async with http.post(f"{base}:generateContent", json=body) as r:
        assert r.status == 401 and (await r.json())["error"]["status"] == "UNAUTHENTICATED"


async def test_cut_after_aborts_without_terminator(fake: FakeProvider, oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-fake-cut-after": "2"})
    got: list[str] = []
    with pytest.raises(openai.APIError):
        async for c in stream:
            got.extend(ch.delta.content or "" for ch in c.choices)
    assert "".join(got) == reply_text(2)
    rec = fake.last
    assert rec.chunks_sent == 2 and not rec.completed and rec.reported_usage is None


async def test_status_control_uses_provider_error_shapes(
        fake: FakeProvider, oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic,
        http: aiohttp.ClientSession) -> None:
    with pytest.raises(openai.RateLimitError) as oe:
        await oai.chat.completions.create(model="m", messages=MESSAGES,
                                          extra_headers={"x-fake-status": "429"})
    assert isinstance(oe.value.body, dict) and oe.value.body["message"] == "fake error 429"

    fake.controls["x-fake-status"] = "529"  # provider-wide default, no header needed
    with pytest.raises(anthropic.APIStatusError) as ae:
        await claude.messages.create(model="claude-x", max_tokens=4, messages=MESSAGES)
    assert ae.value.status_code == 529 and isinstance(ae.value.body, dict)
    assert ae.value.body["error"]["type"] == "overloaded_error"
    fake.controls.clear()

    async with http.post(f"{fake.url}/v1beta/models/g:generateContent", json={},
                         headers={"x-goog-api-key": "k", "x-fake-status": "503"}) as r:
        assert r.status == 503 and (await r.json())["error"]["status"] == "UNAVAILABLE"
    async with http.post(f"{fake.url}/v2/unknown") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "unknown_url"
    async with http.post(f"{fake.url}/v1/chat/completions", json={}) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"


async def test_client_disconnect_is_recorded(fake: FakeProvider, http: aiohttp.ClientSession) -> None:
    headers = {"Authorization": "Bearer k", "x-fake-chunks": "50", "x-fake-chunk-delay": "0.02",
               "x-fake-malformed": "1"}
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    async with http.post(f"{fake.url}/v1/chat/completions", json=body, headers=headers) as r:
        first = await r.content.readuntil(b"tok0")
        garbage = await r.content.readuntil(b"\n\n")
        garbage = await r.content.readuntil(b"\n\n")
        assert fake.open_streams == 1
        r.close()  # hang up mid-stream
    closed_at = time.monotonic()
    await fake.wait_until(lambda: bool(fake.disconnects), timeout=2)
    rec = fake.disconnects[0]
    assert b"tok0" in first and b"this is not json" in garbage
    assert rec.disconnected and rec.disconnected_at is not None
    assert rec.disconnected_at - closed_at < 0.5 and not rec.completed
    assert rec.chunks_sent < 50
    await fake.wait_until(lambda: fake.open_streams == 0, timeout=2)
