"""What a refused request's budgets still afford: which enforced limits refused it, how many output
tokens every budget can still take, and the smaller max_tokens a clamping plan serves instead.
"""
from __future__ import annotations

from datetime import tzinfo

from ..config import PlanConfig
from ..estimate import Estimate
from ..pricing import TOKENS_PER_PRICE_UNIT, ModelPrice, PriceTable, date_at
from .limits import CLAMPABLE
from .store import MONEY_LIMITS, TOKEN_LIMITS, Admission, Decision, Limit, LimitName, LimitState

MIN_CLAMPED_OUTPUT = 16  # below this a clamped request is not worth serving


def clamped(plan: PlanConfig, decision: Decision, adm: Admission, est: Estimate, out: int, prices: PriceTable,
            tz: tzinfo) -> tuple[int, int] | None:
    """(max_tokens per choice, output reserved) that fits every budget, if refusal was only theirs."""
    if not plan.on_limit_clamp or out <= 0:
        return None
    failing = failing_limits(decision, adm)
    if not failing or any(lim.name not in CLAMPABLE for lim in failing):
        return None
    price = prices.lookup(est.model, date_at(tz, adm.now)) if est.priced else None
    fit = affordable_output(decision.states, price, est.prompt_tokens, CLAMPABLE)
    if fit is None:
        return None
    per_choice = min(fit, out) // max(1, est.choices)
    total = per_choice * max(1, est.choices)
    if per_choice < MIN_CLAMPED_OUTPUT or total >= out:
        return None
    return per_choice, total


def affordable_output(states: tuple[LimitState, ...], price: ModelPrice | None, prompt_tokens: int,
                      names: frozenset[LimitName]) -> int | None:
    """Output tokens every enforced limit in `names` can still take after the prompt, or None.
    `price`: the model's price at the time, None if unpriced (money limits are then skipped)."""
    best: int | None = None
    for st in states:
        lim = st.limit
        if not lim.enforce or lim.name not in names:
            continue
        room = lim.value - st.used  # a refused decision's states exclude this request
        if lim.name in TOKEN_LIMITS:
            fit = room - prompt_tokens
        elif price is not None:
            out_rate = max(price.output, price.reasoning or 0)
            spare = room * TOKENS_PER_PRICE_UNIT - prompt_tokens * price.input
            # Floor: cost_for_estimate rounds the whole up, so this never reserves past the room.
            fit = spare // out_rate if out_rate > 0 else (1 << 30 if spare >= 0 else -1)
        else:
            continue
        best = fit if best is None else min(best, fit)
    return best


def failing_limits(decision: Decision, adm: Admission) -> list[Limit]:
    """The enforced limits that refused (a refused decision's states exclude the request)."""
    return [st.limit for st in decision.states
            if st.limit.enforce and st.used + _amount(st.limit, adm) > st.limit.value]


def _amount(lim: Limit, adm: Admission) -> int:
    if lim.name in TOKEN_LIMITS:
        return adm.tokens
    if lim.name in MONEY_LIMITS:
        return adm.cost_micro_usd
    return 1
