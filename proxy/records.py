"""Value types that cross modules: who is calling, what was counted, what it cost."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class CountSource(StrEnum):
    """Where a token count came from, most trustworthy first."""

    PROVIDER = "provider"
    TOKENIZER = "tokenizer"
    ESTIMATE = "estimate"


class ApiKind(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    MESSAGES = "messages"
    COUNT_TOKENS = "count_tokens"
    GENERATE = "generate"
    OTHER = "other"


class LayoutSlot:
    """Where a subject keeps the layout a quota store made for its last admission (the store's own
    type), so the next admission finds it without a lookup among every subject's layouts."""

    __slots__ = ("layout",)

    def __init__(self) -> None:
        self.layout: object = None


@dataclass(slots=True, unsafe_hash=True)
class Subject(LayoutSlot):
    """Who a request is metered and limited as: compared and hashed by who it is (the first five
    fields, never changed once made).

    It also keeps what components work out for it: the key ring keeps one Subject per key and end
    user, so a request reaches its subject's state through the ring's one lookup, and with 100,000
    subjects every further object on the way is a cache miss. `memo` is one component's value
    (`memo_owner` says whose; anyone else works its own out and takes it over), `layout` the
    quota store's."""

    user: str
    team: str | None
    plan: str
    key_id: str  # short, non-secret id of the virtual key (never the key itself)
    trusted: bool = False  # may name an end user with x-meterproxy-user
    memo_owner: object = field(default=None, compare=False, repr=False)
    memo: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        LayoutSlot.__init__(self)  # the dataclass's own __init__ does not call it


@dataclass(slots=True, unsafe_hash=True)  # not frozen: built per request, 4x cheaper to make
class TokenCounts:
    """Tokens by normalized type. `reasoning` is a part of `output`, never added again."""

    input: int = 0  # billed at the full input rate (not read from or written to a cache)
    cached_input: int = 0
    cache_write: int = 0
    output: int = 0
    reasoning: int = 0

    @property
    def total(self) -> int:
        return self.input + self.cached_input + self.cache_write + self.output

    def as_dict(self) -> dict[str, int]:
        return {
            "input": self.input,
            "cached_input": self.cached_input,
            "cache_write": self.cache_write,
            "output": self.output,
            "reasoning": self.reasoning,
        }


@dataclass(slots=True, unsafe_hash=True)  # not frozen: built per request, 4x cheaper to make
class Usage:
    """What a provider (or our tokenizer) says a call consumed."""

    tokens: TokenCounts
    input_source: CountSource = CountSource.PROVIDER
    output_source: CountSource = CountSource.PROVIDER
    model: str | None = None  # the model the provider reports (Azure: the real snapshot)


@dataclass(slots=True, unsafe_hash=True)  # not frozen: built per request, 4x cheaper to make
class UsageRecord:
    """One finished request, handed to metrics and the ledger."""

    event_id: str
    request_id: str
    time: float  # unix seconds at the start of the request
    user: str
    team: str | None
    plan: str
    key_id: str
    provider: str
    model: str
    api_kind: str
    tokens: TokenCounts
    input_source: CountSource
    output_source: CountSource
    cost_micro_usd: int
    priced: bool
    status: int
    latency_seconds: float
    ttft_seconds: float | None
    streamed: bool
    cut_short: bool
    retries: int = 0
    error: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Relayed:
    """What came back, for settle and record."""

    status: int
    usage: Usage | None = None
    output_final: bool = True  # the provider's usage covers the whole output
    text: Callable[[], str] = str  # output text no usage accounts for (for a fallback count)
    text_beyond_usage: bool = False  # that text is on top of `usage.output` (add), not all of it (max)
    ttft_seconds: float | None = None
    streamed: bool = False
    cut_short: bool = False
    client_gone: bool = False
    error: str | None = None
    upstream_done: float = 0.0  # perf_counter when the upstream's last byte came
