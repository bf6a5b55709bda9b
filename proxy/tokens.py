"""Local token counting: prompt estimates before forwarding (for the quota check) and counts of
output text when a stream ended without provider usage. Pure logic over tiktoken encodings that
`Tokenizer.load()` reads once; without them, counts fall back to byte length / 4. How each API's
body is walked is in prompt_tokens."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Any, Protocol

import tiktoken

from proxy.prompt_tokens import (
    FUNC_INIT_CL100K,
    FUNC_INIT_O200K,
    ModelCounter,
    anthropic_tokens,
    chat_tokens,
    count_strings,
    gemini_tokens,
    openai_image_tokens,
    prompt_value_tokens,
    responses_tokens,
)
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
_MODEL_CACHE_MAX = 512
# glibc mallopt parameters and the values used around a load (see _compact_load).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LOAD_MMAP_THRESHOLD = 128 * 1024  # glibc's starting value
_SERVE_MMAP_THRESHOLD = 4 * 1024 * 1024


class Encoding(Protocol):
    """What we need of a tiktoken encoding (lets tests inject a loader)."""

    name: str

    def encode_ordinary(self, text: str) -> list[int]: ...


EncodingLoader = Callable[[str], Encoding]


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
        self._models: dict[str, ModelCounter] = {}
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

    def _counter(self, model: str) -> ModelCounter:
        counter = self._models.get(model)
        if counter is not None:
            return counter
        self._ensure_loaded()
        name, known = self._lookup(model)
        if self._lazy and name not in self._encodings and not self._fallback:
            self._load_later(name)
            encoding = self._encodings.get(self._default_encoding)
            if encoding is not None:  # a stand-in until the real one is loaded: not cached
                return ModelCounter(name, _encoded_length(encoding), FUNC_INIT_O200K, known)
        encoding = self._encodings.get(name) or self._encodings.get(self._default_encoding)
        count = estimate_from_bytes if encoding is None else _encoded_length(encoding)
        actual = encoding.name if encoding is not None else name
        func_init = FUNC_INIT_O200K if actual in _O200K_FAMILY else FUNC_INIT_CL100K
        counter = ModelCounter(name, count, func_init, known)
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
        return chat_tokens(self._counter(model), messages, tools, functions)

    # The tile formula needs no encoding: the function itself, kept as a method for callers.
    image_tokens = staticmethod(openai_image_tokens)

    # -- request bodies ------------------------------------------------------------------------

    def estimate_prompt(self, kind: ApiKind, model: str, body: Mapping[str, Any]) -> int:
        """Prompt tokens of a request body, before forwarding. Never raises on odd shapes."""
        if kind is ApiKind.CHAT:
            messages = body.get("messages")
            tools = body.get("tools")
            functions = body.get("functions")
            return chat_tokens(
                self._counter(model),
                messages if isinstance(messages, list) else [],
                tools if isinstance(tools, list) else None,
                functions if isinstance(functions, list) else None,
            )
        if kind is ApiKind.COMPLETIONS:
            c = self._counter(model)
            return prompt_value_tokens(c, body.get("prompt")) + count_strings(
                c, body.get("suffix")
            )
        if kind is ApiKind.EMBEDDINGS:
            return prompt_value_tokens(self._counter(model), body.get("input"))
        if kind is ApiKind.RESPONSES:
            return responses_tokens(self._counter(model), body)
        if kind in (ApiKind.MESSAGES, ApiKind.COUNT_TOKENS):
            return anthropic_tokens(self._counter(model), body)
        if kind is ApiKind.GENERATE:
            return gemini_tokens(self._counter(model), body)
        return 0


# -- helpers (pure functions) ----------------------------------------------------------------


def _encoded_length(encoding: Encoding) -> Callable[[str], int]:
    encode = encoding.encode_ordinary  # no special-token scan: user text is just text

    def count(text: str) -> int:
        return len(encode(text)) if text else 0

    return count

