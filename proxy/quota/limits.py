"""Which limits apply to a subject (plan, user, team, key: tightest wins) and how they are told to
the client: OpenAI-style rate-limit headers, `x-budget-remaining-usd`, and 429s naming the limit.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from functools import lru_cache

from ..auth import key_id_of, sha256_hex
from ..config import Config, KeyConfig, Limits, PlanConfig
from ..errors import ProxyError, QuotaExhausted, RateLimited
from ..records import Subject
from .store import MONEY_LIMITS, TOKEN_LIMITS, Decision, Limit, LimitName, LimitState

# Limits whose room a smaller max_tokens can fit into (budgets; a per-minute window refills instead).
CLAMPABLE = MONEY_LIMITS | {LimitName.TOKENS_PER_DAY}
# Limits that count output tokens, so a stream running past its reservation overshoots them.
OUTPUT_LIMITS = MONEY_LIMITS | TOKEN_LIMITS
_CACHE_MAX = 200_000


def go_duration(seconds: float) -> str:
    """OpenAI's reset format: `12ms`, `1s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    return _whole_seconds(math.ceil(seconds))


@lru_cache(maxsize=4096)  # a window's reset is about a minute on every admission: a few values recur
def _whole_seconds(s: int) -> str:
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


class LimitBook:
    """The config's limits, resolved per subject (and cached: the config is frozen)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._key_limits: dict[str, KeyConfig] = {
            key_id_of(k.key_sha256 or sha256_hex(k.key or "")): k for k in config.keys if k.values()}
        self._trusted = {key_id_of(k.key_sha256 or sha256_hex(k.key or "")) for k in config.keys
                         if k.trusted_user_header}
        self._cache: dict[Subject, tuple[Limit, ...]] = {}

    def plan_of(self, subject: Subject) -> PlanConfig:
        """The subject's plan; a plan that vanished in a reload falls back to `default_plan`."""
        return self.config.plans.get(subject.plan) or self.config.plans[self.config.default_plan]

    @staticmethod
    def tag_for(subject: Subject) -> str:
        """The Redis Cluster hash tag of every counter one admission touches.

        The team's when there is one (its members share the team's counters); else a trusted
        key's, so the key's own limits are one counter across all the end users it names; else
        the user's. Interned: every end user of a key (and member of a team) then holds one
        string, which the hot path touches for each of them anyway.
        """
        if subject.team:
            return sys.intern(f"t:{subject.team}")
        if subject.trusted:
            return sys.intern(f"k:{subject.key_id}")
        return sys.intern(f"u:{subject.user}")

    def tag_of_record(self, user: str, team: str | None, key_id: str) -> str:
        """`tag_for` of a finished request known only by its record (refused before admission).
        Keys created through the admin API are not known here: their end users get the user tag."""
        return self.tag_for(Subject(user, team, "", key_id, key_id in self._trusted))

    def limits_for(self, subject: Subject) -> tuple[Limit, ...]:
        """Every limit that applies: the user's own (plan and user entry, tightest wins), the
        team's on top, and the key's. A shadow (`enforce: false`) limit is kept beside an
        enforced one of the same name when it is tighter, so a quota can be trialled safely."""
        hit = self._cache.get(subject)
        if hit is not None:
            return hit
        user_cfg = self.config.users.get(subject.user)
        sources: list[Limits] = [self.plan_of(subject)] + ([user_cfg] if user_cfg else [])
        out = _merged(f"user:{subject.user}", sources)
        team_cfg = self.config.teams.get(subject.team) if subject.team else None
        if team_cfg is not None:
            out += _merged(f"team:{subject.team}", [team_cfg])
        key_cfg = self._key_limits.get(subject.key_id)
        if key_cfg is not None:
            out += _merged(f"key:{subject.key_id}", [key_cfg])
        result = tuple(out)
        if len(self._cache) < _CACHE_MAX:
            self._cache[subject] = result
        return result


def _merged(scope: str, sources: Iterable[Limits]) -> list[Limit]:
    enforced: dict[str, int] = {}
    shadow: dict[str, int] = {}
    for src in sources:
        into = enforced if src.enforce else shadow
        for name, value in src.values().items():
            into[name] = min(value, into.get(name, value))
    out = [Limit(scope, LimitName(n), v, True) for n, v in enforced.items()]
    out += [Limit(scope, LimitName(n), v, False) for n, v in shadow.items()
            if n not in enforced or v < enforced[n]]
    return out


def rate_headers(states: Iterable[LimitState]) -> dict[str, str]:
    """The subject's own x-ratelimit-* headers (OpenAI's names and formats) and budget headroom.

    Each pair reports the enforced limit with the least room left; `reset` is when the window
    next frees room (sliding windows: when the oldest counted use leaves it).
    """
    rpm = tpm = money = None
    for st in states:  # one pass: the tightest enforced limit of each kind
        lim = st.limit
        if not lim.enforce:
            continue
        name = lim.name
        if name is LimitName.RPM:
            if rpm is None or st.remaining < rpm.remaining:
                rpm = st
        elif name is LimitName.TPM:
            if tpm is None or st.remaining < tpm.remaining:
                tpm = st
        elif name in MONEY_LIMITS and (money is None or st.remaining < money.remaining):
            money = st
    out: dict[str, str] = {}
    if rpm is not None:
        out["x-ratelimit-limit-requests"] = str(rpm.limit.value)
        out["x-ratelimit-remaining-requests"] = str(rpm.remaining)
        out["x-ratelimit-reset-requests"] = go_duration(rpm.reset_seconds)
    if tpm is not None:
        out["x-ratelimit-limit-tokens"] = str(tpm.limit.value)
        out["x-ratelimit-remaining-tokens"] = str(tpm.remaining)
        out["x-ratelimit-reset-tokens"] = go_duration(tpm.reset_seconds)
    if money is not None:
        out["x-budget-remaining-usd"] = format_usd(money.remaining)
    return out


def format_usd(micro: int) -> str:
    """Micro-dollars as a plain decimal string: 4500000 -> "4.5", 0 -> "0" (no exponent, no float)."""
    whole, frac = divmod(abs(micro), 1_000_000)
    text = f"{whole}.{frac:06d}".rstrip("0").rstrip(".")
    return ("-" if micro < 0 else "") + text


def _fmt_value(lim: Limit) -> str:
    if lim.name in MONEY_LIMITS:
        return "$" + format_usd(lim.value)
    return str(lim.value)


def describe(lim: Limit) -> str:
    return f"the {lim.name.value} limit of {_fmt_value(lim)} for {lim.scope}"


def refusal(denied: Limit, decision: Decision) -> ProxyError:
    """The 429 for a refused admission, in our error tree (adapters give it the provider's shape)."""
    retry = max(1, math.ceil(decision.retry_after_seconds))
    headers = {**rate_headers(decision.states), "retry-after": str(retry)}
    if denied.name in MONEY_LIMITS:
        headers["x-should-retry"] = "false"
        return QuotaExhausted(
            f"Budget exhausted: {describe(denied)} is used up. It resets in {go_duration(retry)}.",
            headers=headers)
    return RateLimited(f"Rate limit reached: {describe(denied)} is reached. Try again in {go_duration(retry)}.",
                       headers=headers)
