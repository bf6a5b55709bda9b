"""Estimate: prompt tokens, output tokens to reserve, and their cost, before forwarding."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from .pricing import PriceTable
from .providers import Adapter, Call
from .records import ApiKind, CountSource
from .tokens import Tokenizer

# API kinds that generate output (and so reserve some).
_GENERATING = frozenset({ApiKind.CHAT, ApiKind.COMPLETIONS, ApiKind.RESPONSES, ApiKind.MESSAGES, ApiKind.GENERATE})
# API kinds whose prompt is billed.
_BILLED_PROMPT = _GENERATING | {ApiKind.EMBEDDINGS}


@dataclass(slots=True, unsafe_hash=True)  # not frozen: built per request, 4x cheaper to make
class Estimate:
    model: str  # the name prices and encodings are looked up by
    prompt_tokens: int
    prompt_source: CountSource
    max_output_tokens: int  # reserved output, all choices together
    client_max_tokens: int | None  # what the client asked for (per choice), None if unset
    choices: int
    cost_micro_usd: int
    priced: bool

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.max_output_tokens


def estimate(
    adapter: Adapter,
    call: Call,
    body: Mapping[str, Any] | None,
    tokenizer: Tokenizer,
    prices: PriceTable,
    day: date,
    default_max_output: int,
) -> Estimate:
    model = adapter.pricing_model(call.model)
    priced = prices.lookup(model, day) is not None
    if body is None or call.kind not in _BILLED_PROMPT:
        return Estimate(model, 0, tokenizer.source_for(model), 0, None, 1, 0, priced)
    prompt = tokenizer.estimate_prompt(call.kind, model, body)
    client_max: int | None = None
    out = 0
    choices = 1
    if call.kind in _GENERATING:
        choices = adapter.choices(call, body)
        client_max = adapter.max_output_tokens(call, body)
        out = (client_max if client_max is not None and client_max >= 0 else default_max_output) * choices
    cost = prices.cost_for_estimate(model, prompt, out, day) if priced else 0
    return Estimate(model, prompt, tokenizer.source_for(model), out, client_max, choices, cost, priced)
