"""Settle: the usage a request really consumed (provider first, tokenizer where it said nothing).

Pure logic: the quota store's settle round trip and the record stage take it from here.
"""
from __future__ import annotations

from .estimate import Estimate
from .providers import Call
from .records import ApiKind, CountSource, Relayed, TokenCounts, Usage
from .tokens import Tokenizer

_METERED = frozenset(
    {ApiKind.CHAT, ApiKind.COMPLETIONS, ApiKind.RESPONSES, ApiKind.MESSAGES, ApiKind.GENERATE, ApiKind.EMBEDDINGS}
)


def actual_usage(call: Call, est: Estimate, got: Relayed | None, tokenizer: Tokenizer) -> Usage:
    """Tokens to bill. Never double counts: provider numbers are assigned, not added, to ours."""
    if got is None or call.kind not in _METERED:
        return Usage(TokenCounts(), CountSource.PROVIDER, CountSource.PROVIDER)
    reported = got.usage
    if reported is not None and got.output_final:
        return reported
    if got.status >= 400 and not got.streamed:
        # The provider refused the call: nothing generated, nothing billed.
        return reported or Usage(TokenCounts(), CountSource.PROVIDER, CountSource.PROVIDER)
    # No (complete) usage: the stream was cut, or the server does not report it.
    base = reported.tokens if reported else TokenCounts()
    prompt_reported = base.input + base.cached_input + base.cache_write > 0
    if call.kind == ApiKind.EMBEDDINGS:
        return Usage(TokenCounts(input=est.prompt_tokens), est.prompt_source, est.prompt_source)
    # Only here, once per request and only without final usage, is output text tokenized.
    text = got.text()
    counted = tokenizer.count_text(est.model, text) if text else 0
    if got.text_beyond_usage:
        # Cumulative usage rode on the chunks: it counts their text; only later text is added.
        output = base.output + counted
        by_provider = counted == 0
    else:
        # Usage that came before the text (Anthropic's message_start): the larger count wins.
        output = max(counted, base.output)
        by_provider = base.output >= counted and base.output > 0
    out_source = CountSource.PROVIDER if by_provider else tokenizer.source_for(est.model)
    if prompt_reported:
        tokens = TokenCounts(base.input, base.cached_input, base.cache_write, output, min(base.reasoning, output))
        in_source = CountSource.PROVIDER
    else:
        tokens = TokenCounts(input=est.prompt_tokens, output=output)
        in_source = est.prompt_source
    return Usage(tokens, in_source, out_source, reported.model if reported else None)
