"""Local token counting: prompt estimates before forwarding (for the quota check) and counts of
output text when a stream ended without provider usage. Pure logic over tiktoken encodings that
`Tokenizer.load()` reads once; without them, counts fall back to byte length / 4."""

from __future__ import annotations

import base64
import binascii
import gc
import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Protocol

import tiktoken

from proxy.records import ApiKind, CountSource

logger = logging.getLogger(__name__)

# Built-in model -> encoding table (tiktoken's model.py, WIRE-FORMATS §1.6). Order matters: the
# first matching prefix wins, so "gpt-4o" must come before "gpt-4". Names are lower-cased first.
_PREFIX_TO_ENCODING: tuple[tuple[str, str], ...] = (
    ("ft:gpt-4o", "o200k_base"),
    ("ft:gpt-4", "cl100k_base"),
    ("ft:gpt-3.5", "cl100k_base"),
    ("gpt-4o", "o200k_base"),
    ("chatgpt-4o", "o200k_base"),
    ("gpt-4.1", "o200k_base"),
    ("gpt-4.5", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3", "o200k_base"),
    ("o4", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5", "cl100k_base"),
    ("gpt-35", "cl100k_base"),
    ("text-embedding-", "cl100k_base"),
    ("davinci-002", "cl100k_base"),
    ("babbage-002", "cl100k_base"),
)
# Loaded at start whatever the config says; if either is missing we run in fallback mode.
_BASE_ENCODINGS = ("o200k_base", "cl100k_base")
_O200K_FAMILY = frozenset({"o200k_base", "o200k_harmony"})

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
# Reading image sizes from base64 data: decode at most this many base64 characters (JPEG's size
# can sit after a large EXIF block; beyond this we give up and use the constant).
_IMAGE_HEADER_B64_CHARS = 65536
_MODEL_CACHE_MAX = 512
# glibc mallopt parameters and the values used around a load (see _compact_load).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LOAD_MMAP_THRESHOLD = 128 * 1024  # glibc's starting value
_SERVE_MMAP_THRESHOLD = 4 * 1024 * 1024

_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


class Encoding(Protocol):
    """What we need of a tiktoken encoding (lets tests inject a loader)."""

    name: str

    def encode_ordinary(self, text: str) -> list[int]: ...


EncodingLoader = Callable[[str], Encoding]


@dataclass(frozen=True, slots=True)
class _ModelCounter:
    """How to count for one model name, resolved once and cached."""

    encoding_name: str
    count: Callable[[str], int]
    func_init: int
    known: bool  # the model matched config or the built-in table (not a default guess)


def _slim(encoding: Encoding) -> Encoding:
    """Drop tiktoken's Python copy of the BPE ranks: the Rust core keeps its own, and the dict
    (used only to pickle an Encoding) costs ~30 MiB per encoding."""
    if hasattr(encoding, "_core_bpe") and hasattr(encoding, "_mergeable_ranks"):
        encoding._mergeable_ranks = {}
    return encoding


def _glibc() -> Any | None:
    """The C library when it is glibc (malloc_trim, mallopt), else None (musl, macOS)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


@contextmanager
def _compact_load() -> Iterator[None]:
    """Load encodings with glibc's mmap threshold at 128 KiB, then return the freed memory.

    glibc raises its threshold to the size of each large block freed. A load frees several
    (the file, the rank dict's tables as it grows), so the large Rust tables built next would
    land in the loading thread's arena among small blocks instead of in their own mappings,
    leaving gaps malloc_trim cannot return. Measured with the server: 102.8 -> 98.5 MiB at
    start (o200k), +30.5 -> +21.5 MiB for a lazy cl100k load. Setting the threshold turns
    glibc's adjustment off, so afterwards we set what serving wants: bodies up to 4 MiB from
    the heap (at 128 KiB a 200 KB prompt costs ~300 page faults, +14 % CPU) and glibc's own
    trim/mmap ratio of 2."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        gc.collect()  # the dropped rank dicts (see `_slim`), if a cycle still held them
        if libc is not None:
            libc.malloc_trim(0)
            libc.mallopt(_M_MMAP_THRESHOLD, _SERVE_MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * _SERVE_MMAP_THRESHOLD)


def estimate_from_bytes(text: str) -> int:
    """Fallback count: UTF-8 length / 4, rounded up (OpenAI's rule of thumb for English)."""
    if text.isascii():
        return (len(text) + 3) // 4
    return (len(text.encode("utf-8", "surrogatepass")) + 3) // 4


class Tokenizer:
    """Counts tokens per model with tiktoken, or estimates from bytes when encodings are missing.

    Non-OpenAI models (Claude, Gemini, Llama, ...) are counted with `default_encoding`: a
    documented approximation for quota pre-checks, reconciled later with provider usage.
    """

    def __init__(
        self,
        encoding_by_model: Mapping[str, str] | None = None,
        default_encoding: str = "o200k_base",
        *,
        loader: EncodingLoader | None = None,
        lazy: bool = False,
    ) -> None:
        self._globs: tuple[tuple[str, str], ...] = tuple(
            (pattern.lower(), name) for pattern, name in (encoding_by_model or {}).items()
        )
        self._default_encoding = default_encoding
        self._loader: EncodingLoader = loader or tiktoken.get_encoding
        self._encodings: dict[str, Encoding] = {}
        self._loaded = False
        self._fallback = False
        self._lock = threading.Lock()
        self._models: dict[str, _ModelCounter] = {}
        # lazy: load() takes only the default encoding; others load on first use, in a thread,
        # with the default standing in meanwhile (resident: o200k ~43 MiB, cl100k ~21 MiB).
        self._lazy = lazy
        self._pending: set[str] = set()

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Load every encoding we may need. Blocking (file or network I/O): run it in a thread."""
        with self._lock:
            if self._loaded:
                return
            with _compact_load():
                self._load_encodings()
            self._models.clear()
            self._loaded = True

    def _load_encodings(self) -> None:
        """Fill `_encodings` (lock held); a required encoding missing means fallback mode."""
        required = dict.fromkeys((self._default_encoding,) if self._lazy
                                 else (*_BASE_ENCODINGS, self._default_encoding))
        optional = [] if self._lazy else [name for _, name in self._globs if name not in required]
        try:
            for name in required:
                self._encodings[name] = _slim(self._loader(name))
        except Exception as exc:  # tiktoken raises requests/OS/value errors; any means "none"
            self._encodings.clear()
            self._fallback = True
            logger.warning(
                "tiktoken encodings could not be loaded (%s: %s); token counts are ESTIMATES "
                "from byte length / 4. Set TIKTOKEN_CACHE_DIR to a directory holding the "
                "encoding files.",
                type(exc).__name__,
                exc,
            )
            return
        for name in dict.fromkeys(optional):
            try:
                self._encodings[name] = _slim(self._loader(name))
            except Exception as exc:  # a bad configured name must not stop the proxy
                logger.warning(
                    "encoding %r from config could not be loaded (%s); models mapped to it "
                    "use %s instead",
                    name,
                    exc,
                    self._default_encoding,
                )

    @property
    def fallback(self) -> bool:
        self._ensure_loaded()
        return self._fallback

    @property
    def source(self) -> CountSource:
        return CountSource.ESTIMATE if self.fallback else CountSource.TOKENIZER

    def source_for(self, model: str) -> CountSource:
        """TOKENIZER only when we know the model's encoding; a default guess is an ESTIMATE."""
        if self.fallback or not self._counter(model).known:
            return CountSource.ESTIMATE
        return CountSource.TOKENIZER

    def _ensure_loaded(self) -> None:
        # The app loads in a thread at start; this only guards callers (CLI, tests) that did not.
        if not self._loaded:
            self.load()

    # -- model -> encoding ---------------------------------------------------------------------

    def encoding_name(self, model: str) -> str:
        return self._lookup(model)[0]

    def _lookup(self, model: str) -> tuple[str, bool]:
        lowered = model.strip().lower()
        bare = lowered.rsplit("/", 1)[-1]  # "openai/gpt-4o", "azure/x", "models/gemini-2.0"
        for pattern, name in self._globs:
            if fnmatchcase(lowered, pattern) or fnmatchcase(bare, pattern):
                return name, True
        for prefix, name in _PREFIX_TO_ENCODING:
            if bare.startswith(prefix):
                return name, True
        return self._default_encoding, False

    def _counter(self, model: str) -> _ModelCounter:
        counter = self._models.get(model)
        if counter is not None:
            return counter
        self._ensure_loaded()
        name, known = self._lookup(model)
        if self._lazy and name not in self._encodings and not self._fallback:
            self._load_later(name)
            encoding = self._encodings.get(self._default_encoding)
            if encoding is not None:  # a stand-in until the real one is loaded: not cached
                return _ModelCounter(name, _encoded_length(encoding), FUNC_INIT_O200K, known)
        encoding = self._encodings.get(name) or self._encodings.get(self._default_encoding)
        count = estimate_from_bytes if encoding is None else _encoded_length(encoding)
        actual = encoding.name if encoding is not None else name
        func_init = FUNC_INIT_O200K if actual in _O200K_FAMILY else FUNC_INIT_CL100K
        counter = _ModelCounter(name, count, func_init, known)
        if len(self._models) >= _MODEL_CACHE_MAX:
            self._models.clear()  # client-chosen names: keep the cache bounded, simply
        self._models[model] = counter
        return counter

    def _load_later(self, name: str) -> None:
        with self._lock:
            if name in self._pending:
                return
            self._pending.add(name)

        def run() -> None:
            try:
                with _compact_load():
                    self._encodings[name] = _slim(self._loader(name))
                self._models.clear()  # counters built with the stand-in are rebuilt
            except Exception as exc:  # keep the stand-in for good
                logger.warning("encoding %r could not be loaded (%s); using %s", name, exc, self._default_encoding)
                self._encodings[name] = self._encodings[self._default_encoding]

        threading.Thread(target=run, name=f"tiktoken-{name}", daemon=True).start()

    # -- counting ------------------------------------------------------------------------------

    def count_text(self, model: str, text: str) -> int:
        return self._counter(model).count(text)

    def count_chat(
        self,
        model: str,
        messages: list[Any],
        tools: list[Any] | None = None,
        functions: list[Any] | None = None,
    ) -> int:
        """Chat Completions prompt tokens, per the cookbook's num_tokens_from_messages/_for_tools."""
        c = self._counter(model)
        total = 0
        for message in messages:
            if not isinstance(message, Mapping):
                continue
            total += TOKENS_PER_MESSAGE
            for key, value in message.items():
                total += self._chat_value(c, key, value)
                if key == "name":
                    total += TOKENS_PER_NAME
        total += REPLY_PRIMER_TOKENS
        return total + self._tools_tokens(c, [*(tools or ()), *(functions or ())])

    def _chat_value(self, c: _ModelCounter, key: str, value: Any) -> int:
        if isinstance(value, str):
            return c.count(value)
        if key == "content" and isinstance(value, list):
            return sum(self._chat_part(c, part) for part in value)
        if key == "tool_calls" and isinstance(value, list):
            # Approximation: the rendered call is about its name and arguments.
            total = 0
            for call in value:
                if isinstance(call, Mapping):
                    fn = call.get("function") or call.get("custom")
                    if isinstance(fn, Mapping):
                        total += _count_strings(
                            c, fn.get("name"), fn.get("arguments"), fn.get("input")
                        )
            return total
        if key == "function_call" and isinstance(value, Mapping):
            return _count_strings(c, value.get("name"), value.get("arguments"))
        return 0

    def _chat_part(self, c: _ModelCounter, part: Any) -> int:
        if isinstance(part, str):
            return c.count(part)
        if not isinstance(part, Mapping):
            return 0
        kind = part.get("type")
        if kind == "image_url":
            image = part.get("image_url")
            if isinstance(image, str):
                return self._openai_image(image, "auto")
            if isinstance(image, Mapping):
                return self._openai_image(image.get("url"), image.get("detail"))
            return IMAGE_UNKNOWN_SIZE_TOKENS
        if kind == "input_audio":
            return AUDIO_PART_TOKENS
        if kind == "file":
            return FILE_PART_TOKENS
        # "text", "refusal", and anything unknown that carries text.
        return _count_strings(c, part.get("text"), part.get("refusal"))

    # -- tool definitions ----------------------------------------------------------------------

    def _tools_tokens(self, c: _ModelCounter, tools: Iterable[Any]) -> int:
        total = 0
        any_function = False
        for tool in tools:
            definitions = _function_definitions(tool)
            for fn in definitions:
                any_function = True
                total += self._function_tokens(c, fn)
            builtin = "" if definitions else _builtin_tool_kind(tool)
            if builtin:
                # Built-in tools (web_search, code_interpreter, googleSearch, ...): rough.
                total += c.func_init + c.count(builtin)
        return total + (FUNC_END if any_function else 0)

    def _function_tokens(self, c: _ModelCounter, fn: Mapping[str, Any]) -> int:
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

    # -- images --------------------------------------------------------------------------------

    def image_tokens(self, width: int | None, height: int | None, detail: str | None) -> int:
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

    def _openai_image(self, url: Any, detail: Any) -> int:
        detail_text = detail if isinstance(detail, str) else "auto"
        if detail_text == "low":
            return IMAGE_LOW_TOKENS
        size = image_size_from_data_url(url) if isinstance(url, str) else None
        if size is None:
            return self.image_tokens(None, None, detail_text)
        return self.image_tokens(size[0], size[1], detail_text)

    # -- request bodies ------------------------------------------------------------------------

    def estimate_prompt(self, kind: ApiKind, model: str, body: Mapping[str, Any]) -> int:
        """Prompt tokens of a request body, before forwarding. Never raises on odd shapes."""
        if kind is ApiKind.CHAT:
            messages = body.get("messages")
            tools = body.get("tools")
            functions = body.get("functions")
            return self.count_chat(
                model,
                messages if isinstance(messages, list) else [],
                tools if isinstance(tools, list) else None,
                functions if isinstance(functions, list) else None,
            )
        if kind is ApiKind.COMPLETIONS:
            c = self._counter(model)
            return _prompt_value_tokens(c, body.get("prompt")) + _count_strings(
                c, body.get("suffix")
            )
        if kind is ApiKind.EMBEDDINGS:
            return _prompt_value_tokens(self._counter(model), body.get("input"))
        if kind is ApiKind.RESPONSES:
            return self._responses_tokens(self._counter(model), body)
        if kind in (ApiKind.MESSAGES, ApiKind.COUNT_TOKENS):
            return self._anthropic_tokens(self._counter(model), body)
        if kind is ApiKind.GENERATE:
            return self._gemini_tokens(self._counter(model), body)
        return 0

    def _responses_tokens(self, c: _ModelCounter, body: Mapping[str, Any]) -> int:
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
                    total += TOKENS_PER_MESSAGE + self._responses_item(c, item)
        tools = body.get("tools")
        return total + (self._tools_tokens(c, tools) if isinstance(tools, list) else 0)

    def _responses_item(self, c: _ModelCounter, item: Mapping[str, Any]) -> int:
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            total = _count_strings(c, item.get("role"))
            if isinstance(content, str):
                return total + c.count(content)
            if isinstance(content, list):
                total += sum(self._responses_part(c, part) for part in content)
            return total
        if kind in ("function_call", "custom_tool_call"):
            return _count_strings(c, item.get("name"), item.get("arguments"), item.get("input"))
        if kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output")
            if isinstance(output, list):
                return sum(self._responses_part(c, part) for part in output)
            return _count_strings(c, output)
        if kind == "reasoning":
            summary = item.get("summary")
            if isinstance(summary, list):
                return sum(self._responses_part(c, part) for part in summary)
        return 0

    def _responses_part(self, c: _ModelCounter, part: Any) -> int:
        if isinstance(part, str):
            return c.count(part)
        if not isinstance(part, Mapping):
            return 0
        kind = part.get("type")
        if kind == "input_image":
            return self._openai_image(part.get("image_url"), part.get("detail"))
        if kind == "input_file":
            return FILE_PART_TOKENS
        if kind == "input_audio":
            return AUDIO_PART_TOKENS
        return _count_strings(c, part.get("text"), part.get("refusal"))

    def _anthropic_tokens(self, c: _ModelCounter, body: Mapping[str, Any]) -> int:
        # Claude's tokenizer is not public: counted with our default encoding and chat framing,
        # a documented approximation (count_tokens upstream is the exact answer).
        total = REPLY_PRIMER_TOKENS
        system = body.get("system")
        if isinstance(system, str):
            total += TOKENS_PER_MESSAGE + c.count(system)
        elif isinstance(system, list):
            total += TOKENS_PER_MESSAGE + sum(self._anthropic_block(c, b) for b in system)
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if not isinstance(message, Mapping):
                continue
            total += TOKENS_PER_MESSAGE + _count_strings(c, message.get("role"))
            content = message.get("content")
            if isinstance(content, str):
                total += c.count(content)
            elif isinstance(content, list):
                total += sum(self._anthropic_block(c, block) for block in content)
        tools = body.get("tools")
        if isinstance(tools, list) and tools:
            total += ANTHROPIC_TOOLS_SYSTEM_TOKENS + self._tools_tokens(c, tools)
        return total

    def _anthropic_block(self, c: _ModelCounter, block: Any) -> int:
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
                return _count_strings(c, source.get("data"))
            return FILE_PART_TOKENS
        if kind in ("tool_use", "server_tool_use"):
            return _count_strings(c, block.get("name")) + c.count(_compact_json(block.get("input")))
        if kind == "tool_result":
            content = block.get("content")
            if isinstance(content, list):
                return sum(self._anthropic_block(c, inner) for inner in content)
            return _count_strings(c, content)
        return _count_strings(c, block.get("text"), block.get("thinking"))

    def _gemini_tokens(self, c: _ModelCounter, body: Mapping[str, Any]) -> int:
        # Gemini's tokenizer is not public either: default encoding, chat framing, approximation.
        total = REPLY_PRIMER_TOKENS
        system = _get(body, "systemInstruction", "system_instruction")
        if system is not None:
            total += TOKENS_PER_MESSAGE + self._gemini_content(c, system)
        contents = body.get("contents")
        if isinstance(contents, (str, Mapping)):
            contents = [contents]
        for content in contents if isinstance(contents, list) else ():
            total += TOKENS_PER_MESSAGE + self._gemini_content(c, content)
        tools = body.get("tools")
        return total + (self._tools_tokens(c, tools) if isinstance(tools, list) else 0)

    def _gemini_content(self, c: _ModelCounter, content: Any) -> int:
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
                total += _count_strings(c, call.get("name")) + c.count(
                    _compact_json(call.get("args"))
                )
            elif isinstance(resp := _get(part, "functionResponse", "function_response"), Mapping):
                total += _count_strings(c, resp.get("name")) + c.count(
                    _compact_json(resp.get("response"))
                )
        return total


# -- helpers (pure functions) ----------------------------------------------------------------


def _encoded_length(encoding: Encoding) -> Callable[[str], int]:
    encode = encoding.encode_ordinary  # no special-token scan: user text is just text

    def count(text: str) -> int:
        return len(encode(text)) if text else 0

    return count


def _as_str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _strip_period(text: str) -> str:
    return text[:-1] if text.endswith(".") else text


def _count_strings(c: _ModelCounter, *values: Any) -> int:
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


def _prompt_value_tokens(c: _ModelCounter, value: Any) -> int:
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
    c: _ModelCounter,
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
        size = image_size(_decode_b64_prefix(data)) if isinstance(data, str) else None
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
            size = image_size(_decode_b64_prefix(data))
            if size:
                w, h = size
                if w <= 384 and h <= 384:
                    return GEMINI_IMAGE_TILE_TOKENS
                return GEMINI_IMAGE_TILE_TOKENS * math.ceil(w / 768) * math.ceil(h / 768)
    return GEMINI_MEDIA_PART_TOKENS


def image_size_from_data_url(url: str) -> tuple[int, int] | None:
    """(width, height) of a base64 `data:` image URL, read from its header; None otherwise."""
    if not url.startswith("data:"):
        return None
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    return image_size(_decode_b64_prefix(payload))


def _decode_b64_prefix(data: str) -> bytes:
    prefix = data[:_IMAGE_HEADER_B64_CHARS]
    prefix = prefix[: len(prefix) - len(prefix) % 4]
    try:
        return base64.b64decode(prefix)
    except (binascii.Error, ValueError):
        return b""


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from PNG, GIF, WebP or JPEG header bytes; None when not recognised."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w = int.from_bytes(data[26:28], "little") & 0x3FFF
        h = int.from_bytes(data[28:30], "little") & 0x3FFF
        return w, h
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(
                data[i + 5 : i + 7], "big"
            )
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None
