"""Prompt tokens per API body shape, over one model's counter: Chat messages, Completions and
Embeddings prompts, Responses items, Anthropic messages, Gemini contents, tool definitions and
media parts. Pure functions; the Tokenizer picks the counter and the walker."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.image_size import decode_b64_prefix, image_size, image_size_from_data_url

# Chat framing, OpenAI cookbook `num_tokens_from_messages` (checked there against the live API).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMER_TOKENS = 3
# Tool definitions, cookbook `num_tokens_for_tools`. FUNC_INIT is 7 on the gpt-4o family
# (o200k encodings) and 10 on gpt-3.5/gpt-4; the others are shared.
FUNC_INIT_O200K = 7
FUNC_INIT_CL100K = 10
PROP_INIT = 3
PROP_KEY = 3
ENUM_INIT = -3
ENUM_ITEM = 3
FUNC_END = 12

# OpenAI tile model (WIRE-FORMATS §8.4).
IMAGE_LOW_TOKENS = 85
IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
# An image whose size we cannot see (an http URL): the most the tile formula can give, 2x4 tiles
# (e.g. 768x2048 after scaling) = 1445. Pre-flight estimates must not undercount.
IMAGE_UNKNOWN_SIZE_TOKENS = IMAGE_TILE_TOKENS * 8 + IMAGE_BASE_TOKENS
# Audio and file parts: we do not decode media on the request path. Conservative constants:
# ~100 s of audio at OpenAI's ~10 tokens/s, and a few pages of a document.
AUDIO_PART_TOKENS = 1000
FILE_PART_TOKENS = 2000
# Anthropic images: ~ (w*h)/750, and images are scaled down to about 1600 tokens at most
# (Anthropic vision guide, unverified here); unknown size -> that cap.
ANTHROPIC_IMAGE_MAX_TOKENS = 1600
# Anthropic adds a hidden tool-use system prompt when tools are given (a few hundred tokens;
# ~346 on recent models per Anthropic's tool-use pricing notes, unverified here).
ANTHROPIC_TOOLS_SYSTEM_TOKENS = 346
# Gemini: 258 tokens per image up to 384 px, larger images in 768 px tiles of 258 each;
# other inline or file media (audio, video, PDF) get a constant.
GEMINI_IMAGE_TILE_TOKENS = 258
GEMINI_MEDIA_PART_TOKENS = 1000


@dataclass(frozen=True, slots=True)
class ModelCounter:
    """How to count for one model name, resolved once and cached (by the Tokenizer)."""

    encoding_name: str
    count: Callable[[str], int]
    func_init: int
    known: bool  # the model matched config or the built-in table (not a default guess)


# -- Chat Completions messages -----------------------------------------------------------------


def chat_tokens(
    c: ModelCounter,
    messages: list[Any],
    tools: list[Any] | None = None,
    functions: list[Any] | None = None,
) -> int:
    """Chat Completions prompt tokens, per the cookbook's num_tokens_from_messages/_for_tools."""
    total = 0
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            total += _chat_value(c, key, value)
            if key == "name":
                total += TOKENS_PER_NAME
    total += REPLY_PRIMER_TOKENS
    return total + _tools_tokens(c, [*(tools or ()), *(functions or ())])


def _chat_value(c: ModelCounter, key: str, value: Any) -> int:
    if isinstance(value, str):
        return c.count(value)
    if key == "content" and isinstance(value, list):
        return sum(_chat_part(c, part) for part in value)
    if key == "tool_calls" and isinstance(value, list):
        # Approximation: the rendered call is about its name and arguments.
        total = 0
        for call in value:
            if isinstance(call, Mapping):
                fn = call.get("function") or call.get("custom")
                if isinstance(fn, Mapping):
                    total += count_strings(
                        c, fn.get("name"), fn.get("arguments"), fn.get("input")
                    )
        return total
    if key == "function_call" and isinstance(value, Mapping):
        return count_strings(c, value.get("name"), value.get("arguments"))
    return 0


def _chat_part(c: ModelCounter, part: Any) -> int:
    if isinstance(part, str):
        return c.count(part)
    if not isinstance(part, Mapping):
        return 0
    kind = part.get("type")
    if kind == "image_url":
        image = part.get("image_url")
        if isinstance(image, str):
            return _openai_image(image, "auto")
        if isinstance(image, Mapping):
            return _openai_image(image.get("url"), image.get("detail"))
        return IMAGE_UNKNOWN_SIZE_TOKENS
    if kind == "input_audio":
        return AUDIO_PART_TOKENS
    if kind == "file":
        return FILE_PART_TOKENS
    # "text", "refusal", and anything unknown that carries text.
    return count_strings(c, part.get("text"), part.get("refusal"))


# -- tool definitions --------------------------------------------------------------------------


def _tools_tokens(c: ModelCounter, tools: Iterable[Any]) -> int:
    total = 0
    any_function = False
    for tool in tools:
        definitions = _function_definitions(tool)
        for fn in definitions:
            any_function = True
            total += _function_tokens(c, fn)
        builtin = "" if definitions else _builtin_tool_kind(tool)
        if builtin:
            # Built-in tools (web_search, code_interpreter, googleSearch, ...): rough.
            total += c.func_init + c.count(builtin)
    return total + (FUNC_END if any_function else 0)


def _function_tokens(c: ModelCounter, fn: Mapping[str, Any]) -> int:
    total = c.func_init
    name = _as_str(fn.get("name"))
    total += c.count(f"{name}:{_strip_period(_as_str(fn.get('description')))}")
    params = fn.get("parameters") or fn.get("input_schema") or fn.get("parametersJsonSchema")
    if not isinstance(params, Mapping):
        return total
    props = params.get("properties")
    if isinstance(props, Mapping) and props:
        total += PROP_INIT
        for key, prop in props.items():
            total += PROP_KEY
            if not isinstance(prop, Mapping):
                total += c.count(str(key))
                continue
            enum = prop.get("enum")
            if isinstance(enum, list):
                total += ENUM_INIT + sum(ENUM_ITEM + c.count(str(item)) for item in enum)
            p_type = prop.get("type")
            type_text = (
                "|".join(map(str, p_type)) if isinstance(p_type, list) else _as_str(p_type)
            )
            p_desc = _strip_period(_as_str(prop.get("description")))
            total += c.count(f"{key}:{type_text}:{p_desc}")
            total += _nested_schema_tokens(c, prop)
    return total + _nested_schema_tokens(c, params, keys=("$defs", "definitions"))


# -- images ------------------------------------------------------------------------------------


def openai_image_tokens(width: int | None, height: int | None, detail: str | None) -> int:
    """OpenAI tile formula. `auto` (and anything not `low`) is counted as `high`.

    We only scale down, never up: an image smaller than 768 px on its short side keeps its
    size, so a small image costs one tile (255).
    """
    if detail == "low":
        return IMAGE_LOW_TOKENS
    if not width or not height or width <= 0 or height <= 0:
        return IMAGE_UNKNOWN_SIZE_TOKENS
    w, h = float(width), float(height)
    fit = min(1.0, 2048.0 / max(w, h))
    w, h = w * fit, h * fit
    shrink = min(1.0, 768.0 / min(w, h))
    w, h = round(w * shrink), round(h * shrink)
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return IMAGE_TILE_TOKENS * tiles + IMAGE_BASE_TOKENS


def _openai_image(url: Any, detail: Any) -> int:
    detail_text = detail if isinstance(detail, str) else "auto"
    if detail_text == "low":
        return IMAGE_LOW_TOKENS
    size = image_size_from_data_url(url) if isinstance(url, str) else None
    if size is None:
        return openai_image_tokens(None, None, detail_text)
    return openai_image_tokens(size[0], size[1], detail_text)


# -- Responses, Anthropic Messages, Gemini bodies ----------------------------------------------


def responses_tokens(c: ModelCounter, body: Mapping[str, Any]) -> int:
    # Items are framed like chat messages (an approximation: the Responses API publishes no
    # framing constants). Stored context (previous_response_id) is invisible to us.
    total = REPLY_PRIMER_TOKENS
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        total += TOKENS_PER_MESSAGE + c.count("system") + c.count(instructions)
    items = body.get("input")
    if isinstance(items, str):
        total += TOKENS_PER_MESSAGE + c.count("user") + c.count(items)
    elif isinstance(items, list):
        for item in items:
            if isinstance(item, Mapping):
                total += TOKENS_PER_MESSAGE + _responses_item(c, item)
    tools = body.get("tools")
    return total + (_tools_tokens(c, tools) if isinstance(tools, list) else 0)


def _responses_item(c: ModelCounter, item: Mapping[str, Any]) -> int:
    kind = item.get("type", "message")
    if kind == "message":
        content = item.get("content")
        total = count_strings(c, item.get("role"))
        if isinstance(content, str):
            return total + c.count(content)
        if isinstance(content, list):
            total += sum(_responses_part(c, part) for part in content)
        return total
    if kind in ("function_call", "custom_tool_call"):
        return count_strings(c, item.get("name"), item.get("arguments"), item.get("input"))
    if kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output")
        if isinstance(output, list):
            return sum(_responses_part(c, part) for part in output)
        return count_strings(c, output)
    if kind == "reasoning":
        summary = item.get("summary")
        if isinstance(summary, list):
            return sum(_responses_part(c, part) for part in summary)
    return 0


def _responses_part(c: ModelCounter, part: Any) -> int:
    if isinstance(part, str):
        return c.count(part)
    if not isinstance(part, Mapping):
        return 0
    kind = part.get("type")
    if kind == "input_image":
        return _openai_image(part.get("image_url"), part.get("detail"))
    if kind == "input_file":
        return FILE_PART_TOKENS
    if kind == "input_audio":
        return AUDIO_PART_TOKENS
    return count_strings(c, part.get("text"), part.get("refusal"))


def anthropic_tokens(c: ModelCounter, body: Mapping[str, Any]) -> int:
    # Claude's tokenizer is not public: counted with our default encoding and chat framing,
    # a documented approximation (count_tokens upstream is the exact answer).
    total = REPLY_PRIMER_TOKENS
    system = body.get("system")
    if isinstance(system, str):
        total += TOKENS_PER_MESSAGE + c.count(system)
    elif isinstance(system, list):
        total += TOKENS_PER_MESSAGE + sum(_anthropic_block(c, b) for b in system)
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, Mapping):
            continue
        total += TOKENS_PER_MESSAGE + count_strings(c, message.get("role"))
        content = message.get("content")
        if isinstance(content, str):
            total += c.count(content)
        elif isinstance(content, list):
            total += sum(_anthropic_block(c, block) for block in content)
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        total += ANTHROPIC_TOOLS_SYSTEM_TOKENS + _tools_tokens(c, tools)
    return total


def _anthropic_block(c: ModelCounter, block: Any) -> int:
    if isinstance(block, str):
        return c.count(block)
    if not isinstance(block, Mapping):
        return 0
    kind = block.get("type")
    if kind == "image":
        return _anthropic_image_tokens(block.get("source"))
    if kind == "document":
        source = block.get("source")
        if isinstance(source, Mapping) and source.get("type") == "text":
            return count_strings(c, source.get("data"))
        return FILE_PART_TOKENS
    if kind in ("tool_use", "server_tool_use"):
        return count_strings(c, block.get("name")) + c.count(_compact_json(block.get("input")))
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return sum(_anthropic_block(c, inner) for inner in content)
        return count_strings(c, content)
    return count_strings(c, block.get("text"), block.get("thinking"))


def gemini_tokens(c: ModelCounter, body: Mapping[str, Any]) -> int:
    # Gemini's tokenizer is not public either: default encoding, chat framing, approximation.
    total = REPLY_PRIMER_TOKENS
    system = _get(body, "systemInstruction", "system_instruction")
    if system is not None:
        total += TOKENS_PER_MESSAGE + _gemini_content(c, system)
    contents = body.get("contents")
    if isinstance(contents, (str, Mapping)):
        contents = [contents]
    for content in contents if isinstance(contents, list) else ():
        total += TOKENS_PER_MESSAGE + _gemini_content(c, content)
    tools = body.get("tools")
    return total + (_tools_tokens(c, tools) if isinstance(tools, list) else 0)


def _gemini_content(c: ModelCounter, content: Any) -> int:
    if isinstance(content, str):
        return c.count(content)
    if not isinstance(content, Mapping):
        return 0
    parts = content.get("parts")
    if not isinstance(parts, list):
        return 0
    total = 0
    for part in parts:
        if not isinstance(part, Mapping):
            continue
        if isinstance(part.get("text"), str):
            total += c.count(part["text"])
        elif (inline := _get(part, "inlineData", "inline_data")) is not None:
            total += _gemini_inline_tokens(inline)
        elif _get(part, "fileData", "file_data") is not None:
            total += GEMINI_MEDIA_PART_TOKENS
        elif isinstance(call := _get(part, "functionCall", "function_call"), Mapping):
            total += count_strings(c, call.get("name")) + c.count(
                _compact_json(call.get("args"))
            )
        elif isinstance(resp := _get(part, "functionResponse", "function_response"), Mapping):
            total += count_strings(c, resp.get("name")) + c.count(
                _compact_json(resp.get("response"))
            )
    return total


# -- helpers (pure functions) ------------------------------------------------------------------


def _as_str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _strip_period(text: str) -> str:
    return text[:-1] if text.endswith(".") else text


def count_strings(c: ModelCounter, *values: Any) -> int:
    return sum(c.count(v) for v in values if isinstance(v, str))


def _get(mapping: Mapping[str, Any], camel: str, snake: str) -> Any:
    # Gemini's REST JSON takes camelCase and (as protobuf JSON) snake_case field names.
    value = mapping.get(camel)
    return mapping.get(snake) if value is None else value


def _compact_json(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):  # circular or too deep: count nothing
        return ""


def prompt_value_tokens(c: ModelCounter, value: Any) -> int:
    """A Completions `prompt` or Embeddings `input`: str, [str], [int] or [[int]]."""
    if isinstance(value, str):
        return c.count(value)
    if not isinstance(value, list):
        return 0
    if all(isinstance(x, int) for x in value):
        return len(value)  # token ids: nothing to encode
    total = 0
    for item in value:
        if isinstance(item, str):
            total += c.count(item)
        elif isinstance(item, list):
            total += len(item)
    return total


def _function_definitions(tool: Any) -> list[Mapping[str, Any]]:
    """Function definitions in one tool entry, whatever the provider's shape."""
    if not isinstance(tool, Mapping):
        return []
    inner = tool.get("function") or tool.get("custom")
    if isinstance(inner, Mapping):  # chat {"type": "function", "function": {...}}
        return [inner]
    declarations = _get(tool, "functionDeclarations", "function_declarations")
    if isinstance(declarations, list):  # Gemini
        return [d for d in declarations if isinstance(d, Mapping)]
    kind = tool.get("type")
    if kind in (None, "function", "custom") and isinstance(tool.get("name"), str):
        # Responses flat functions, Anthropic custom tools, deprecated chat `functions`.
        return [tool]
    return []


def _builtin_tool_kind(tool: Any) -> str:
    """The name of a provider built-in tool (no function definition), or ''."""
    if not isinstance(tool, Mapping):
        return ""
    kind = tool.get("type")
    if isinstance(kind, str):
        return kind
    if "functionDeclarations" in tool or "function_declarations" in tool:
        return ""
    return next(iter(tool), "") if tool else ""  # Gemini {"googleSearch": {}}


def _nested_schema_tokens(
    c: ModelCounter,
    schema: Mapping[str, Any],
    keys: tuple[str, ...] = ("properties", "items", "anyOf", "oneOf", "allOf"),
) -> int:
    # The cookbook formula ignores nested schemas; counting their JSON overcounts a little,
    # which is the safe side for a pre-flight estimate.
    nested = {k: schema[k] for k in keys if k in schema}
    return c.count(_compact_json(nested)) if nested else 0


def _anthropic_image_tokens(source: Any) -> int:
    if isinstance(source, Mapping) and source.get("type") == "base64":
        data = source.get("data")
        size = image_size(decode_b64_prefix(data)) if isinstance(data, str) else None
        if size:
            w, h = size
            scale = min(1.0, 1568.0 / max(w, h))  # long edge is capped before counting
            return min(ANTHROPIC_IMAGE_MAX_TOKENS, math.ceil((w * scale) * (h * scale) / 750))
    return ANTHROPIC_IMAGE_MAX_TOKENS


def _gemini_inline_tokens(inline: Any) -> int:
    if isinstance(inline, Mapping):
        mime = _as_str(_get(inline, "mimeType", "mime_type"))
        data = inline.get("data")
        if mime.startswith("image/") and isinstance(data, str):
            size = image_size(decode_b64_prefix(data))
            if size:
                w, h = size
                if w <= 384 and h <= 384:
                    return GEMINI_IMAGE_TILE_TOKENS
                return GEMINI_IMAGE_TILE_TOKENS * math.ceil(w / 768) * math.ceil(h / 768)
    return GEMINI_MEDIA_PART_TOKENS
