"""Tests for proxy.tokens: cookbook-checked chat counts, the encoding table, image tiles, fallback
mode and prompt estimates for every API kind. Needs TIKTOKEN_CACHE_DIR with the encodings."""

from __future__ import annotations

import base64
import logging
import math
import struct
import zlib
from collections.abc import Callable
from typing import Any

import pytest
import tiktoken

from proxy.image_size import image_size, image_size_from_data_url
from proxy.prompt_tokens import AUDIO_PART_TOKENS, IMAGE_UNKNOWN_SIZE_TOKENS
from proxy.records import ApiKind, CountSource
from proxy.tokens import Encoding, Tokenizer

# OpenAI cookbook, How_to_count_tokens_with_tiktoken.ipynb, section 6: the API reported 129
# prompt tokens on gpt-3.5-turbo/gpt-4 and 124 on gpt-4o/gpt-4o-mini for these messages.
COOKBOOK_MESSAGES: list[dict[str, str]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]

# Same notebook, section 7: 105 prompt tokens on gpt-3.5-turbo/gpt-4, 101 on the gpt-4o family.
COOKBOOK_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES: list[dict[str, str]] = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tokenizer = Tokenizer()
    tokenizer.load()
    assert not tokenizer.fallback, "tiktoken encodings missing: set TIKTOKEN_CACHE_DIR"
    return tokenizer


def failing_loader(name: str) -> Encoding:
    raise OSError(f"no network to fetch {name}")


def ceil_bytes_over_4(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / 4)


# -- cookbook examples -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-3.5-turbo", 129),
        ("gpt-4-0613", 129),
        ("gpt-4", 129),
        ("gpt-4o", 124),
        ("gpt-4o-mini", 124),
    ],
)
def test_cookbook_chat_messages(tok: Tokenizer, model: str, expected: int) -> None:
    assert tok.count_chat(model, COOKBOOK_MESSAGES) == expected
    assert tok.estimate_prompt(ApiKind.CHAT, model, {"messages": COOKBOOK_MESSAGES}) == expected


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-3.5-turbo", 105), ("gpt-4", 105), ("gpt-4o", 101), ("gpt-4o-mini", 101)],
)
def test_cookbook_tools(tok: Tokenizer, model: str, expected: int) -> None:
    assert tok.count_chat(model, COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS) == expected
    body = {"messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
    assert tok.estimate_prompt(ApiKind.CHAT, model, body) == expected


def test_deprecated_functions_count_like_tools(tok: Tokenizer) -> None:
    functions = [COOKBOOK_TOOLS[0]["function"]]
    assert tok.count_chat("gpt-4o", COOKBOOK_TOOL_MESSAGES, functions=functions) == 101


def test_tool_definition_without_description_or_type_does_not_raise(tok: Tokenizer) -> None:
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {}}}}},
        {"type": "function", "function": {"name": "g", "parameters": {"properties": {"y": 3}}}},
        {"type": "function", "function": {"name": "h"}},
        {
            "type": "function",
            "function": {
                "name": "i",
                "parameters": {
                    "properties": {
                        "z": {"type": ["string", "null"], "enum": [1, None]},
                    }
                },
            },
        },
    ]
    without = tok.count_chat("gpt-4o", COOKBOOK_TOOL_MESSAGES)
    assert tok.count_chat("gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=tools) > without + 4 * 7


def test_nested_schema_counts_more_than_flat(tok: Tokenizer) -> None:
    flat = {"type": "object", "properties": {"a": {"type": "object", "description": "d"}}}
    nested = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "description": "d", "properties": {"inner": {"type": "string"}}}
        },
    }

    def count(params: dict[str, Any]) -> int:
        tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
        return tok.count_chat("gpt-4o", [], tools=tools)

    assert count(nested) > count(flat)


# -- message shapes beyond the cookbook --------------------------------------------------------


def test_name_adds_one_token_plus_its_text(tok: Tokenizer) -> None:
    plain = tok.count_chat("gpt-4o", [{"role": "user", "content": "hi"}])
    named = tok.count_chat("gpt-4o", [{"role": "user", "content": "hi", "name": "bob"}])
    assert named == plain + 1 + tok.count_text("gpt-4o", "bob")


def test_content_parts_count_each_text_part(tok: Tokenizer) -> None:
    parts = [{"type": "text", "text": "hello there"}, {"type": "text", "text": "general kenobi"}]
    got = tok.count_chat("gpt-4o", [{"role": "user", "content": parts}])
    expected = 3 + tok.count_text("gpt-4o", "user") + 3
    expected += tok.count_text("gpt-4o", "hello there") + tok.count_text("gpt-4o", "general kenobi")
    assert got == expected


def test_assistant_tool_calls_count_name_and_arguments(tok: Tokenizer) -> None:
    args = '{"location": "Paris, France", "unit": "celsius"}'
    message = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_current_weather", "arguments": args},
            }
        ],
    }
    got = tok.count_chat("gpt-4o", [message])
    expected = 3 + tok.count_text("gpt-4o", "assistant") + 3
    expected += tok.count_text("gpt-4o", "get_current_weather") + tok.count_text("gpt-4o", args)
    assert got == expected


def test_audio_and_file_parts_use_constants(tok: Tokenizer) -> None:
    audio = [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]
    base = tok.count_chat("gpt-4o", [{"role": "user", "content": []}])
    assert (
        tok.count_chat("gpt-4o", [{"role": "user", "content": audio}]) == base + AUDIO_PART_TOKENS
    )
    file_part = [{"type": "file", "file": {"file_id": "file-1"}}]
    assert tok.count_chat("gpt-4o", [{"role": "user", "content": file_part}]) > base


def test_special_token_text_is_plain_text(tok: Tokenizer) -> None:
    # A user may type "<|endoftext|>": it must be counted, never rejected.
    assert tok.count_text("gpt-4o", "<|endoftext|>") > 1


# -- encoding table ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5.1-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini-2025-04-16", "o200k_base"),
        ("ft:gpt-4o-mini:org::abc", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-4-32k-0613", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("ft:gpt-3.5-turbo:org::x", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("davinci-002", "cl100k_base"),
        ("babbage-002", "cl100k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("azure/gpt-35-turbo", "cl100k_base"),
        ("GPT-4", "cl100k_base"),
        ("claude-sonnet-4-5", "o200k_base"),
        ("gemini-2.5-flash", "o200k_base"),
        ("models/gemini-2.0-flash", "o200k_base"),
        ("my-azure-deployment", "o200k_base"),
    ],
)
def test_encoding_name_table(model: str, encoding: str) -> None:
    assert Tokenizer().encoding_name(model) == encoding


def test_encoding_name_agrees_with_tiktoken_where_it_knows() -> None:
    tokenizer = Tokenizer()
    for model in [
        "gpt-4o",
        "gpt-4",
        "gpt-3.5-turbo",
        "o1-mini",
        "gpt-4.1",
        "text-embedding-3-large",
    ]:
        assert tokenizer.encoding_name(model) == tiktoken.encoding_name_for_model(model)


def test_config_globs_win_over_builtin_table_and_default() -> None:
    tokenizer = Tokenizer(
        {"gpt-4o-legacy*": "cl100k_base", "prod-chat": "cl100k_base"},
        default_encoding="cl100k_base",
    )
    assert tokenizer.encoding_name("gpt-4o-legacy-1") == "cl100k_base"
    assert tokenizer.encoding_name("gpt-4o") == "o200k_base"
    assert tokenizer.encoding_name("azure/prod-chat") == "cl100k_base"
    assert tokenizer.encoding_name("claude-3-haiku") == "cl100k_base"


def test_source_for_marks_default_guesses_as_estimates(tok: Tokenizer) -> None:
    assert tok.source is CountSource.TOKENIZER
    assert tok.source_for("gpt-4o") is CountSource.TOKENIZER
    assert tok.source_for("claude-sonnet-4-5") is CountSource.ESTIMATE


def test_counts_follow_the_model_encoding(tok: Tokenizer) -> None:
    text = "お誕生日おめでとう"  # the cookbook's example: 9 tokens in cl100k, 8 in o200k
    assert tok.count_text("gpt-4", text) == 9
    assert tok.count_text("gpt-4o", text) == 8


# -- images ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "detail", "expected"),
    [
        (1024, 1024, "high", 765),
        (2048, 4096, "high", 1105),
        (2048, 4096, "auto", 1105),
        (4096, 2048, "high", 1105),
        (4096, 8192, "high", 1105),
        (300, 200, "high", 255),
        (2048, 4096, "low", 85),
        (None, None, "low", 85),
        (None, None, "high", IMAGE_UNKNOWN_SIZE_TOKENS),
    ],
)
def test_image_tile_formula(
    tok: Tokenizer, width: int | None, height: int | None, detail: str, expected: int
) -> None:
    assert tok.image_tokens(width, height, detail) == expected


def test_unknown_size_is_the_largest_tile_count(tok: Tokenizer) -> None:
    worst = max(tok.image_tokens(w, h, "high") for w in range(256, 4097, 256) for h in (768, 2048))
    assert IMAGE_UNKNOWN_SIZE_TOKENS == worst


def png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = b"".join(b"\x00" + bytes(width) for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"\x3b"


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    exif = b"\xff\xe1" + struct.pack(">H", 2 + 3000) + bytes(3000)  # a large APP1 before SOF
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + exif + sof + b"\xff\xd9"


def webp_vp8x(width: int, height: int) -> bytes:
    body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    body += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | ((height - 1) << 14)
    body = b"WEBP" + b"VP8L" + struct.pack("<I", 5) + b"\x2f" + struct.pack("<I", bits) + b"\x00"
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_vp8(width: int, height: int) -> bytes:
    frame = b"\x00\x00\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + bytes(4)
    body = b"WEBP" + b"VP8 " + struct.pack("<I", len(frame)) + frame
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("make", [png, gif, jpeg, webp_vp8x, webp_vp8l, webp_vp8])
def test_image_size_from_headers(make: Callable[[int, int], bytes]) -> None:
    assert image_size(make(1000, 700)) == (1000, 700)
    assert image_size(make(33, 2000)) == (33, 2000)


def test_image_size_rejects_garbage() -> None:
    assert image_size(b"") is None
    assert image_size(b"not an image at all") is None
    assert image_size(b"\xff\xd8\x00\x00") is None
    assert image_size_from_data_url("https://example.com/cat.png") is None
    assert image_size_from_data_url("data:image/png;base64,!!!notbase64!!!") is None
    assert image_size_from_data_url("data:text/plain,hello") is None


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_chat_image_part_reads_size_from_data_url(tok: Tokenizer) -> None:
    def image_message(url: str, detail: str) -> list[dict[str, Any]]:
        part = {"type": "image_url", "image_url": {"url": url, "detail": detail}}
        return [{"role": "user", "content": [part]}]

    empty = tok.count_chat("gpt-4o", [{"role": "user", "content": []}])
    small_png = data_url("image/png", png(1024, 1024))
    assert tok.count_chat("gpt-4o", image_message(small_png, "high")) == empty + 765
    assert tok.count_chat("gpt-4o", image_message(small_png, "low")) == empty + 85
    tall_jpeg = data_url("image/jpeg", jpeg(2048, 4096))
    assert tok.count_chat("gpt-4o", image_message(tall_jpeg, "auto")) == empty + 1105
    remote = "https://example.com/cat.png"
    expected = empty + IMAGE_UNKNOWN_SIZE_TOKENS
    assert tok.count_chat("gpt-4o", image_message(remote, "high")) == expected


# -- fallback ----------------------------------------------------------------------------------


def test_fallback_counts_bytes_over_four(caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = Tokenizer(loader=failing_loader)
    with caplog.at_level(logging.WARNING, logger="proxy.tokens"):
        tokenizer.load()
        tokenizer.load()
        assert tokenizer.fallback
        for text in ["", "a", "hello world", "héllo wörld, 你好", "x" * 4001]:
            assert tokenizer.count_text("gpt-4o", text) == ceil_bytes_over_4(text)
            assert tokenizer.count_text("claude-3-opus", text) == ceil_bytes_over_4(text)
    assert tokenizer.source is CountSource.ESTIMATE
    assert tokenizer.source_for("gpt-4o") is CountSource.ESTIMATE
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "estimate" in warnings[0].getMessage().lower()


def test_fallback_chat_keeps_the_message_framing() -> None:
    tokenizer = Tokenizer(loader=failing_loader)
    messages = [{"role": "user", "content": "hello world", "name": "bob"}]
    expected = 3 + ceil_bytes_over_4("user") + ceil_bytes_over_4("hello world")
    expected += ceil_bytes_over_4("bob") + 1 + 3
    assert tokenizer.count_chat("gpt-4o", messages) == expected
    body = {"messages": COOKBOOK_MESSAGES, "tools": COOKBOOK_TOOLS}
    assert tokenizer.estimate_prompt(ApiKind.CHAT, "gpt-4o", body) > 100


def test_real_tiktoken_failure_means_fallback() -> None:
    # tiktoken itself raises for an encoding it cannot get; that must not escape load().
    tokenizer = Tokenizer(default_encoding="no_such_encoding")
    tokenizer.load()
    assert tokenizer.fallback
    assert tokenizer.count_text("gpt-4o", "abcdefgh") == 2


def test_a_bad_configured_encoding_only_affects_its_models(tok: Tokenizer) -> None:
    tokenizer = Tokenizer({"weird-*": "no_such_encoding"})
    tokenizer.load()
    assert not tokenizer.fallback
    text = "The quick brown fox jumps over the lazy dog"
    assert tokenizer.count_text("weird-1", text) == tok.count_text("gpt-4o", text)


def test_encodings_load_once() -> None:
    calls: list[str] = []

    def counting_loader(name: str) -> Encoding:
        calls.append(name)
        return tiktoken.get_encoding(name)

    tokenizer = Tokenizer(loader=counting_loader)
    tokenizer.load()
    tokenizer.load()
    for _ in range(3):
        tokenizer.count_text("gpt-4o", "hello")
        tokenizer.count_chat("gpt-4", COOKBOOK_MESSAGES)
    assert sorted(calls) == ["cl100k_base", "o200k_base"]


def test_counting_before_load_loads_lazily() -> None:
    tokenizer = Tokenizer()
    assert tokenizer.count_chat("gpt-4o", COOKBOOK_MESSAGES) == 124


# -- estimate_prompt per API kind --------------------------------------------------------------


def chat_body(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}


def completions_body(text: str) -> dict[str, Any]:
    return {"model": "gpt-3.5-turbo-instruct", "prompt": [text, text]}


def embeddings_body(text: str) -> dict[str, Any]:
    return {"model": "text-embedding-3-small", "input": text}


def responses_body(text: str) -> dict[str, Any]:
    return {
        "model": "gpt-4.1",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": text},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": text},
                    {
                        "type": "input_image",
                        "image_url": "https://example.com/x.png",
                        "detail": "low",
                    },
                ],
            },
            {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"q": "x"}'},
            {"type": "function_call_output", "call_id": "c1", "output": text},
        ],
        "tools": [
            {
                "type": "function",
                "name": "lookup",
                "description": "Look up",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
            {"type": "web_search"},
        ],
    }


def responses_string_body(text: str) -> dict[str, Any]:
    return {"model": "gpt-5", "input": text}


def messages_body(text: str) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "You are terse."}],
        "messages": [
            {"role": "user", "content": text},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t1", "name": "lookup", "input": {"q": "x"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": text},
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": base64.b64encode(png(300, 300)).decode(),
                        },
                    },
                ],
            },
        ],
        "tools": [
            {
                "name": "lookup",
                "description": "Look up",
                "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
            }
        ],
    }


def generate_body(text: str) -> dict[str, Any]:
    return {
        "systemInstruction": {"parts": [{"text": "You are terse."}]},
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": text},
                    {
                        "inlineData": {
                            "mimeType": "image/gif",
                            "data": base64.b64encode(gif(100, 100)).decode(),
                        }
                    },
                ],
            },
            {"role": "model", "parts": [{"functionCall": {"name": "lookup", "args": {"q": "x"}}}]},
            {
                "role": "user",
                "parts": [{"functionResponse": {"name": "lookup", "response": {"result": text}}}],
            },
        ],
        "tools": [{"functionDeclarations": [{"name": "lookup", "description": "Look up"}]}],
    }


BODIES: list[tuple[ApiKind, str, Callable[[str], dict[str, Any]]]] = [
    (ApiKind.CHAT, "gpt-4o", chat_body),
    (ApiKind.COMPLETIONS, "gpt-3.5-turbo-instruct", completions_body),
    (ApiKind.EMBEDDINGS, "text-embedding-3-small", embeddings_body),
    (ApiKind.RESPONSES, "gpt-4.1", responses_body),
    (ApiKind.RESPONSES, "gpt-5", responses_string_body),
    (ApiKind.MESSAGES, "claude-sonnet-4-5", messages_body),
    (ApiKind.COUNT_TOKENS, "claude-sonnet-4-5", messages_body),
    (ApiKind.GENERATE, "gemini-2.5-flash", generate_body),
]


@pytest.mark.parametrize(("kind", "model", "make_body"), BODIES)
def test_estimates_are_positive_and_grow_with_input(
    tok: Tokenizer, kind: ApiKind, model: str, make_body: Callable[[str], dict[str, Any]]
) -> None:
    small = tok.estimate_prompt(kind, model, make_body("hello"))
    large = tok.estimate_prompt(kind, model, make_body("hello " * 500))
    assert small > 0
    assert large >= small + 500


@pytest.mark.parametrize(("kind", "model", "make_body"), BODIES)
def test_estimates_work_in_fallback(
    kind: ApiKind, model: str, make_body: Callable[[str], dict[str, Any]]
) -> None:
    tokenizer = Tokenizer(loader=failing_loader)
    small = tokenizer.estimate_prompt(kind, model, make_body("hello"))
    large = tokenizer.estimate_prompt(kind, model, make_body("hello " * 500))
    assert 0 < small < large


def test_token_id_prompts_count_their_length(tok: Tokenizer) -> None:
    assert tok.estimate_prompt(ApiKind.COMPLETIONS, "davinci-002", {"prompt": [1, 2, 3, 4]}) == 4
    body: dict[str, Any] = {"prompt": [[1, 2], [3, 4, 5]]}
    assert tok.estimate_prompt(ApiKind.COMPLETIONS, "davinci-002", body) == 5
    body = {"input": [[7] * 10, [8] * 6]}
    assert tok.estimate_prompt(ApiKind.EMBEDDINGS, "text-embedding-3-small", body) == 16
    body = {"input": ["hello world", "goodbye"]}
    expected = tok.count_text("text-embedding-3-small", "hello world")
    expected += tok.count_text("text-embedding-3-small", "goodbye")
    assert tok.estimate_prompt(ApiKind.EMBEDDINGS, "text-embedding-3-small", body) == expected


def test_completions_prompt_string_is_encoded(tok: Tokenizer) -> None:
    text = "Say this is a test, and then say it again."
    expected = tok.count_text("gpt-3.5-turbo-instruct", text)
    got = tok.estimate_prompt(ApiKind.COMPLETIONS, "gpt-3.5-turbo-instruct", {"prompt": text})
    assert got == expected


def test_anthropic_tools_add_the_hidden_system_prompt(tok: Tokenizer) -> None:
    body = messages_body("hi")
    without = dict(body, tools=[])
    assert tok.estimate_prompt(ApiKind.MESSAGES, "claude-sonnet-4-5", body) > (
        tok.estimate_prompt(ApiKind.MESSAGES, "claude-sonnet-4-5", without) + 300
    )


def test_other_kind_is_zero(tok: Tokenizer) -> None:
    assert tok.estimate_prompt(ApiKind.OTHER, "gpt-4o", {"messages": COOKBOOK_MESSAGES}) == 0


ODD_BODIES: list[dict[str, Any]] = [
    {},
    {"messages": "not a list", "tools": {"a": 1}, "functions": 3},
    {"messages": [None, 3, "x", {"role": None, "content": {"weird": True}}]},
    {
        "messages": [
            {
                "role": "user",
                "content": [None, 5, {"type": "image_url"}, {"type": "image_url", "image_url": 7}],
            }
        ]
    },
    {"messages": [{"role": "assistant", "tool_calls": [None, {"function": None}]}]},
    {"prompt": {"a": 1}, "input": 12, "instructions": 5},
    {"prompt": [None, ["a"], 3.5], "input": [None, {"x": 1}]},
    {
        "input": [
            None,
            {"type": "message", "content": 5},
            {"type": "function_call_output"},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": "t"}]},
            {"type": "item_reference", "id": "x"},
        ]
    },
    {
        "system": 5,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "document"},
                    {"type": "tool_use", "input": object()},
                    {"type": "tool_result", "content": [3]},
                ],
            }
        ],
    },
    {"contents": "just text", "systemInstruction": "sys", "tools": [None, {"googleSearch": {}}]},
    {
        "contents": [
            None,
            {"parts": "x"},
            {"parts": [None, {"inline_data": {"data": 5}}, {"fileData": {}}]},
        ]
    },
]


@pytest.mark.parametrize("body", ODD_BODIES)
@pytest.mark.parametrize("kind", list(ApiKind))
def test_odd_shapes_never_raise(tok: Tokenizer, kind: ApiKind, body: dict[str, Any]) -> None:
    assert tok.estimate_prompt(kind, "gpt-4o", body) >= 0


def test_model_cache_stays_bounded(tok: Tokenizer) -> None:
    tokenizer = Tokenizer()
    tokenizer.load()
    for i in range(2000):
        assert tokenizer.count_text(f"client-model-{i}", "hello") == tok.count_text(
            "gpt-4o", "hello"
        )
    assert len(tokenizer._models) <= 512
