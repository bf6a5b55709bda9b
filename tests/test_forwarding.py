"""Forwarding core through the official SDKs: every provider, plain and streamed, key swap, routing."""
from __future__ import annotations

import aiohttp
import anthropic
import openai
import pytest
from conftest import ALICE_KEY, UPSTREAM_KEYS, Proxy, StartProxy
from fakeprovider import FakeProvider, reply_text

CHAT = [{"role": "user", "content": "Say hello to the proxy"}]


def oai(base: str, key: str = ALICE_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0)


def assert_key_swapped(fake: FakeProvider, provider: str) -> None:
    rec = fake.last
    assert rec.api_key == UPSTREAM_KEYS[provider]
    flat = " ".join(f"{k}: {v}" for k, v in rec.headers.items()) + rec.query_string
    assert ALICE_KEY not in flat and ALICE_KEY.encode() not in rec.body


async def stream_chat(client: openai.AsyncOpenAI, **kw: object) -> tuple[str, int]:
    chunks = 0
    text = ""
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True, **kw)
    async for chunk in stream:
        chunks += 1
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return text, chunks


async def test_chat_plain(proxy: Proxy, fake: FakeProvider) -> None:
    async with oai(f"{proxy.url}/openai/v1") as client:
        resp = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT)
    completion = resp.parse()
    assert completion.choices[0].message.content == reply_text(12)
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    assert resp.headers["x-request-id"]
    assert fake.last.path == "/v1/chat/completions"
    assert_key_swapped(fake, "openai")


async def test_chat_stream_identical_to_direct(proxy: Proxy, fake: FakeProvider) -> None:
    async with oai(f"{fake.url}/v1", key="direct") as direct:
        want = await stream_chat(direct)
    async with oai(f"{proxy.url}/openai/v1") as client:
        got = await stream_chat(client)
    assert got == want and got[0] == reply_text(12)
    # The proxy asked upstream for usage even though the client did not...
    assert fake.last.json()["stream_options"] == {"include_usage": True}
    assert_key_swapped(fake, "openai")


async def test_chat_stream_bytes_identical_except_ids(proxy: Proxy, fake: FakeProvider) -> None:
    """Without include_usage the client gets exactly the bytes it would have got: no usage chunk."""
    body = {"model": "gpt-4o-mini", "messages": CHAT, "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{fake.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer x"}) as r:
            direct = await r.read()
        async with s.post(f"{proxy.url}/openai/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {ALICE_KEY}"}) as r:
            via = await r.read()
    def norm(b: bytes) -> bytes:
        import re
        return re.sub(rb'"id":"[^"]*"|"created":\d+', b"", b)
    assert b'"usage"' not in via
    assert norm(via) == norm(direct)


async def test_chat_stream_client_asked_for_usage(proxy: Proxy, fake: FakeProvider) -> None:
    async with oai(f"{proxy.url}/openai/v1") as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=CHAT, stream=True, stream_options={"include_usage": True})
        usage = [c.usage async for c in stream if c.usage]
    assert len(usage) == 1 and usage[0].completion_tokens == 12


async def test_embeddings(proxy: Proxy, fake: FakeProvider) -> None:
    async with oai(f"{proxy.url}/openai/v1") as client:
        resp = await client.embeddings.create(model="text-embedding-3-small", input=["one two", "three"])
    assert len(resp.data) == 2 and len(resp.data[0].embedding) > 0
    assert resp.usage.prompt_tokens > 0
    assert_key_swapped(fake, "openai")


async def test_responses_plain_and_stream(proxy: Proxy, fake: FakeProvider) -> None:
    async with oai(f"{proxy.url}/openai/v1") as client:
        r = await client.responses.create(model="gpt-4o", input="Tell me a story")
        assert r.output_text == reply_text(12)
        assert r.usage is not None and r.usage.output_tokens == 12
        text = ""
        completed = None
        async with client.responses.stream(model="gpt-4o", input="Tell me a story") as stream:
            async for event in stream:
                if event.type == "response.output_text.delta":
                    text += event.delta
                elif event.type == "response.completed":
                    completed = event.response
    assert text == reply_text(12)
    assert completed is not None and completed.usage is not None and completed.usage.output_tokens == 12
    assert_key_swapped(fake, "openai")


async def test_anthropic_messages_plain_stream_and_count(proxy: Proxy, fake: FakeProvider) -> None:
    client = anthropic.AsyncAnthropic(base_url=f"{proxy.url}/anthropic", api_key=ALICE_KEY, max_retries=0)
    async with client:
        msg = await client.messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=CHAT,
                                           extra_headers={"anthropic-version": "2023-06-01"})
        assert msg.content[0].text == reply_text(12)  # type: ignore[union-attr]
        assert fake.last.headers["anthropic-version"] == "2023-06-01"
        assert_key_swapped(fake, "anthropic")
        async with client.messages.stream(model="claude-sonnet-4-6", max_tokens=5, messages=CHAT) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == reply_text(5)
        assert final.usage.output_tokens == 5
        count = await client.messages.count_tokens(model="claude-sonnet-4-6", messages=CHAT)
        assert count.input_tokens > 0
        assert fake.last.path == "/v1/messages/count_tokens"


async def test_gemini_generate_and_stream(proxy: Proxy, fake: FakeProvider) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "Hello Gemini"}]}]}
    async with aiohttp.ClientSession() as s:
        url = f"{proxy.url}/gemini/v1beta/models/gemini-2.5-flash:generateContent"
        async with s.post(url, json=body, headers={"x-goog-api-key": ALICE_KEY}) as r:
            assert r.status == 200
            data = await r.json()
        assert data["candidates"][0]["content"]["parts"][0]["text"] == reply_text(12)
        assert_key_swapped(fake, "gemini")
        # ?key= works too, and is never forwarded
        url = f"{proxy.url}/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key={ALICE_KEY}"
        async with s.post(url, json=body) as r:
            assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
            raw = await r.read()
    assert raw.count(b"data: ") == 12
    assert fake.last.query_string == "alt=sse"
    assert_key_swapped(fake, "gemini")


async def test_gemini_unified_v1beta_route(proxy: Proxy, fake: FakeProvider) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}
    async with aiohttp.ClientSession() as s:
        url = f"{proxy.url}/v1beta/models/gemini-2.5-flash:generateContent"
        async with s.post(url, json=body, headers={"x-goog-api-key": ALICE_KEY}) as r:
            assert r.status == 200
    assert fake.last.path == "/v1beta/models/gemini-2.5-flash:generateContent"


async def test_azure_deployment_path(proxy: Proxy, fake: FakeProvider) -> None:
    client = openai.AsyncAzureOpenAI(azure_endpoint=f"{proxy.url}/azure", api_key=ALICE_KEY,
                                     api_version="2024-10-21", max_retries=0)
    async with client:
        r = await client.chat.completions.create(model="my-gpt4o", messages=CHAT)
        assert r.choices[0].message.content == reply_text(12)
        rec = fake.last
        assert rec.path == "/openai/deployments/my-gpt4o/chat/completions"
        assert "api-version=2024-10-21" in rec.query_string
        assert rec.headers["api-key"] == UPSTREAM_KEYS["azure"]
        assert "authorization" not in {k.lower() for k in rec.headers}
        stream = await client.chat.completions.create(model="my-gpt4o", messages=CHAT, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == reply_text(12)


async def test_v1_routes_by_model(proxy: Proxy, fake: FakeProvider) -> None:
    async with oai(f"{proxy.url}/v1") as client:
        await client.chat.completions.create(model="gpt-4o", messages=CHAT)
        assert fake.last.api_key == UPSTREAM_KEYS["openai"] and fake.last.path == "/v1/chat/completions"
    client2 = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=ALICE_KEY, max_retries=0)
    async with client2:
        await client2.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=CHAT)
    assert fake.last.api_key == UPSTREAM_KEYS["anthropic"] and fake.last.path == "/v1/messages"


async def test_other_paths_pass_through(proxy: Proxy, fake: FakeProvider) -> None:
    async with oai(f"{proxy.url}/openai/v1") as client:
        models = await client.models.list()
    assert [m.id async for m in models]
    assert fake.last.method == "GET" and fake.last.path == "/v1/models"
    assert_key_swapped(fake, "openai")


async def test_hop_by_hop_dropped_other_headers_pass(proxy: Proxy, fake: FakeProvider) -> None:
    async with aiohttp.ClientSession() as s:
        headers = {"Authorization": f"Bearer {ALICE_KEY}", "OpenAI-Organization": "org-1", "X-Custom": "yes",
                   "Proxy-Authorization": "secret", "TE": "trailers", "x-meterproxy-user": "mallory"}
        async with s.post(f"{proxy.url}/openai/v1/chat/completions", headers=headers,
                          json={"model": "gpt-4o-mini", "messages": CHAT}) as r:
            assert r.status == 200
            assert "x-ratelimit-limit-requests" not in r.headers or r.headers["x-ratelimit-limit-requests"] != "fake"
    h = {k.lower(): v for k, v in fake.last.headers.items()}
    assert h["openai-organization"] == "org-1" and h["x-custom"] == "yes"
    assert "proxy-authorization" not in h and "te" not in h and "x-meterproxy-user" not in h


# ---------------------------------------------------------------- errors, each in the provider's shape


async def post(url: str, body: object = None, *, data: bytes | None = None, headers: dict[str, str] | None = None
               ) -> tuple[int, dict, dict[str, str]]:
    async with aiohttp.ClientSession() as s:
        kw: dict = {"json": body} if data is None else {"data": data}
        async with s.post(url, headers=headers or {}, **kw) as r:
            return r.status, await r.json(content_type=None), dict(r.headers)


def openai_error(body: dict) -> dict:
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def anthropic_error(body: dict) -> dict:
    assert body["type"] == "error" and {"type", "message"} <= set(body["error"])
    return body["error"]


async def test_missing_and_unknown_key_401(proxy: Proxy) -> None:
    url = f"{proxy.url}/openai/v1/chat/completions"
    status, body, _ = await post(url, {"model": "gpt-4o", "messages": CHAT})
    assert status == 401 and openai_error(body)["code"] == "invalid_api_key"
    status, body, _ = await post(url, {"model": "gpt-4o", "messages": CHAT}, headers={"Authorization": "Bearer nope"})
    assert status == 401 and "not known" in openai_error(body)["message"]
    status, body, _ = await post(f"{proxy.url}/anthropic/v1/messages", {"model": "claude-x", "messages": CHAT},
                                 headers={"x-api-key": "nope", "anthropic-version": "2023-06-01"})
    assert status == 401 and anthropic_error(body)["type"] == "authentication_error"
    status, body, _ = await post(f"{proxy.url}/gemini/v1beta/models/gemini-2.5-flash:generateContent", {},
                                 headers={"x-goog-api-key": "nope"})
    assert status == 401 and body["error"]["status"] == "UNAUTHENTICATED"
    # and the SDK sees it as an AuthenticationError
    async with oai(f"{proxy.url}/openai/v1", key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="gpt-4o", messages=CHAT)


async def test_unknown_provider_404(proxy: Proxy) -> None:
    status, body, _ = await post(f"{proxy.url}/nosuch/v1/chat/completions", {"model": "gpt-4o"},
                                 headers={"Authorization": f"Bearer {ALICE_KEY}"})
    assert status == 404 and openai_error(body)["code"] == "not_found"
    status, body, _ = await post(f"{proxy.url}/v1/chat/completions", {"model": "llama-unrouted", "messages": CHAT},
                                 headers={"Authorization": f"Bearer {ALICE_KEY}"})
    assert status == 404 and "llama-unrouted" in openai_error(body)["message"]


async def test_unknown_path_passes_upstream_404(proxy: Proxy, fake: FakeProvider) -> None:
    status, body, _ = await post(f"{proxy.url}/openai/v1/no/such/path", {"x": 1},
                                 headers={"Authorization": f"Bearer {ALICE_KEY}"})
    assert status == 404 and "error" in body


async def test_malformed_json_and_wrong_types_400(proxy: Proxy) -> None:
    url = f"{proxy.url}/openai/v1/chat/completions"
    auth = {"Authorization": f"Bearer {ALICE_KEY}", "content-type": "application/json"}
    status, body, _ = await post(url, data=b'{"model": "gpt-4o", "messages": [', headers=auth)
    assert status == 400 and "not valid JSON" in openai_error(body)["message"]
    status, body, _ = await post(url, {"model": "gpt-4o", "messages": "hi"}, headers=auth)
    assert status == 400 and "messages" in openai_error(body)["message"]
    status, body, _ = await post(url, {"model": "gpt-4o", "messages": CHAT, "max_tokens": "ten"}, headers=auth)
    assert status == 400 and "max_tokens" in openai_error(body)["message"]
    status, body, _ = await post(url, data=b"[1,2]", headers=auth)
    assert status == 400
    status, body, _ = await post(f"{proxy.url}/anthropic/v1/messages", {"model": 5},
                                 headers={"x-api-key": ALICE_KEY, "content-type": "application/json"})
    assert status == 400 and anthropic_error(body)["type"] == "invalid_request_error"


async def test_body_too_large_413(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"max_body_bytes": 4096})
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 10_000}]}
    status, body, _ = await post(f"{proxy.url}/openai/v1/chat/completions", big,
                                 headers={"Authorization": f"Bearer {ALICE_KEY}"})
    assert status == 413 and openai_error(body)["code"] == "request_too_large"
    status, body, _ = await post(f"{proxy.url}/anthropic/v1/messages", big,
                                 headers={"x-api-key": ALICE_KEY})
    assert status == 413 and anthropic_error(body)["type"] == "request_too_large"


async def test_upstream_unreachable_502(start_proxy: StartProxy, unused_tcp_port: int) -> None:
    proxy = await start_proxy({"providers": {"openai": {"base_url": f"http://127.0.0.1:{unused_tcp_port}"}}})
    status, body, _ = await post(f"{proxy.url}/openai/v1/chat/completions", {"model": "gpt-4o", "messages": CHAT},
                                 headers={"Authorization": f"Bearer {ALICE_KEY}"})
    assert status == 502 and openai_error(body)["code"] == "upstream_unreachable"


async def test_upstream_timeout_504(start_proxy: StartProxy) -> None:
    proxy = await start_proxy({"providers": {"openai": {"timeouts": {"read": 0.3}}}})
    status, body, _ = await post(f"{proxy.url}/openai/v1/chat/completions", {"model": "gpt-4o", "messages": CHAT},
                                 headers={"Authorization": f"Bearer {ALICE_KEY}", "x-fake-delay": "2"})
    assert status == 504 and openai_error(body)["code"] == "upstream_timeout"


async def test_stream_idle_timeout_not_total(start_proxy: StartProxy) -> None:
    """A stream slower in total than the idle timeout, but never idle that long, completes."""
    proxy = await start_proxy({"providers": {"openai": {"timeouts": {"idle": 0.5, "read": 0.2}}}})
    async with oai(f"{proxy.url}/openai/v1") as client:
        text, _ = await stream_chat(client, extra_headers={"x-fake-chunks": "8", "x-fake-chunk-delay": "0.1"})
    assert text == reply_text(8)


async def test_upstream_errors_pass_through(proxy: Proxy, fake: FakeProvider) -> None:
    for status in (429, 500, 503):
        s, body, headers = await post(f"{proxy.url}/openai/v1/chat/completions", {"model": "gpt-4o", "messages": CHAT},
                                      headers={"Authorization": f"Bearer {ALICE_KEY}", "x-fake-status": str(status)})
        assert s == status and body["error"]["message"] == f"fake error {status}"
    s, body, _ = await post(f"{proxy.url}/anthropic/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": CHAT},
                            headers={"x-api-key": ALICE_KEY, "anthropic-version": "2023-06-01", "x-fake-status": "529"})
    assert s == 529 and anthropic_error(body)["message"] == "fake error 529"


async def test_health_and_ready(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{proxy.url}/healthz") as r:
            assert r.status == 200
        async with s.get(f"{proxy.url}/readyz") as r:
            assert r.status == 200 and (await r.json())["store"] is True
