"""Tests for proxy/pricing.py: the shipped price list, exact micro-dollar arithmetic, lookup rules."""
from __future__ import annotations

from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import ConfigError
from proxy.pricing import ModelPrice, PriceTable
from proxy.records import TokenCounts

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "pricing.yaml"
TODAY = date(2026, 11, 28)


@pytest.fixture(scope="module")
def shipped() -> PriceTable:
    return PriceTable.load(SHIPPED)


def write(tmp_path: Path, text: str, name: str = "pricing.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def price(table: PriceTable, model: str, on: date = TODAY) -> ModelPrice:
    found = table.lookup(model, on)
    assert found is not None, f"{model} is not priced"
    return found


def exact_cost(p: ModelPrice, t: TokenCounts) -> int:
    """Independent reference: Decimal dollars per type, summed, rounded half up once."""
    per_token = Decimal(1) / Decimal(1_000_000)
    reasoning_rate = p.output if p.reasoning is None else p.reasoning
    total = (
        t.input * p.input
        + t.cached_input * p.cached_input
        + t.cache_write * p.cache_write
        + (t.output - t.reasoning) * p.output
        + t.reasoning * reasoning_rate
    ) * per_token
    return int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP))


# ---------------------------------------------------------------- the shipped file

REQUIRED_MODELS = [
    "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-5.1", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano",
    "gpt-4o", "gpt-4o-mini", "o1", "o3", "o3-mini", "o4-mini", "gpt-4-turbo", "gpt-4",
    "gpt-3.5-turbo", "text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002",
    "claude-opus-4-1", "claude-opus-4-5", "claude-sonnet-4-5", "claude-sonnet-4",
    "claude-haiku-4-5", "claude-3-5-haiku", "claude-3-7-sonnet", "claude-3-5-sonnet",
    "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.0-flash",
]


def test_shipped_file_loads_with_date_and_all_required_models(shipped: PriceTable) -> None:
    assert shipped.taken is not None
    date.fromisoformat(shipped.taken)
    missing = [m for m in REQUIRED_MODELS if shipped.lookup(m, TODAY) is None]
    assert missing == []


def test_every_shipped_entry_is_priced_today_and_sane(shipped: PriceTable) -> None:
    for key in shipped.keys():
        p = price(shipped, key)
        assert p.input > 0, key
        assert p.output >= 0, key
        assert p.cached_input <= p.input, f"{key}: a cache read costs more than input"
        if not key.startswith("text-embedding"):
            assert p.output >= p.input, f"{key}: output cheaper than input"


def test_shipped_anthropic_cache_writes_are_one_and_a_quarter_input(shipped: PriceTable) -> None:
    # Claude 3 Haiku is the listed exception: $0.30 for writes on $0.25 input (1.2x).
    claude = [k for k in shipped.keys() if k.startswith("claude-") and k != "claude-3-haiku"]
    assert len(claude) >= 10
    for key in claude:
        p = price(shipped, key)
        assert p.cache_write * 4 == p.input * 5, key
        assert p.cached_input < p.input, key


def test_shipped_absolute_prices_are_the_list_prices(shipped: PriceTable) -> None:
    million = 1_000_000
    assert shipped.cost_micro_usd("gpt-4o", TokenCounts(input=million), TODAY) == (2_500_000, True)
    assert shipped.cost_micro_usd("gpt-4o", TokenCounts(output=million), TODAY) == (10_000_000, True)
    assert shipped.cost_micro_usd("gpt-4o", TokenCounts(cached_input=million), TODAY) == (1_250_000, True)
    assert shipped.cost_micro_usd("gpt-4o-mini", TokenCounts(cached_input=million), TODAY) == (75_000, True)
    sonnet = shipped.cost_micro_usd("claude-sonnet-4-5", TokenCounts(cache_write=million), TODAY)
    assert sonnet == (3_750_000, True)
    assert shipped.cost_micro_usd("claude-sonnet-4-5", TokenCounts(cached_input=million), TODAY) == (300_000, True)
    assert shipped.cost_micro_usd("gemini-2.5-flash", TokenCounts(input=million), TODAY) == (300_000, True)
    assert shipped.cost_micro_usd("text-embedding-3-small", TokenCounts(input=million), TODAY) == (20_000, True)


# ---------------------------------------------------------------- arithmetic


def test_gpt4o_cached_tokens_priced_at_cached_rate(shipped: PriceTable) -> None:
    # OpenAI usage: prompt_tokens 2100 of which cached 1920 -> input 180 + cached 1920.
    tokens = TokenCounts(input=180, cached_input=1920, output=640)
    # By hand: 180 x $2.50/1M = 450 u$; 1920 x $1.25/1M = 2400 u$; 640 x $10/1M = 6400 u$.
    assert shipped.cost_micro_usd("gpt-4o", tokens, TODAY) == (9250, True)
    assert exact_cost(price(shipped, "gpt-4o"), tokens) == 9250
    uncached = shipped.cost_micro_usd("gpt-4o", TokenCounts(input=2100, output=640), TODAY)[0]
    assert uncached == 5250 + 6400


def test_claude_cache_writes_and_reads(shipped: PriceTable) -> None:
    tokens = TokenCounts(input=50, cache_write=10_000, cached_input=20_000, output=500)
    # By hand at $3 / $3.75 / $0.30 / $15 per 1M: 150 + 37500 + 6000 + 7500 u$.
    assert shipped.cost_micro_usd("claude-sonnet-4-5-20250929", tokens, TODAY) == (51_150, True)
    p = price(shipped, "claude-haiku-4-5")
    assert shipped.cost_micro_usd("claude-haiku-4-5", tokens, TODAY) == (exact_cost(p, tokens), True)


def test_reasoning_tokens_are_part_of_output_and_priced_as_output(shipped: PriceTable) -> None:
    with_reasoning = shipped.cost_micro_usd("o4-mini", TokenCounts(output=1000, reasoning=800), TODAY)
    plain = shipped.cost_micro_usd("o4-mini", TokenCounts(output=1000), TODAY)
    assert with_reasoning == plain == (4400, True)  # 1000 x $4.40/1M, reasoning not added again


def test_distinct_reasoning_price_from_overrides() -> None:
    table = PriceTable.load(SHIPPED, {"thinker-*": {"input": 1, "output": 2, "reasoning": 8}})
    tokens = TokenCounts(input=10, output=100, reasoning=60)
    # 10 x $1 + 40 x $2 + 60 x $8 per 1M = 10 + 80 + 480 u$.
    assert table.cost_micro_usd("thinker-large", tokens, TODAY) == (570, True)


def test_reasoning_above_output_never_makes_output_negative() -> None:
    table = PriceTable.load(SHIPPED, {"thinker": {"input": 1, "output": 2, "reasoning": 8}})
    # Reasoning is capped at output: 10 tokens at $8/1M = 80 u$, not 25 tokens' worth.
    assert table.cost_micro_usd("thinker", TokenCounts(output=10, reasoning=25), TODAY) == (80, True)
    assert table.cost_micro_usd("thinker", TokenCounts(output=1000, reasoning=5000), TODAY) == (8000, True)


def test_one_rounding_per_request_half_up() -> None:
    table = PriceTable.load(SHIPPED, {"half": {"input": 0.5, "output": 0.5}, "tiny": {"input": 0.49, "output": 1}})
    # 0.5 u$ + 0.5 u$ = exactly 1 u$; rounding each type apart would give 2.
    assert table.cost_micro_usd("half", TokenCounts(input=1, output=1), TODAY) == (1, True)
    # Half up, not half to even: 0.5 -> 1 and 2.5 -> 3.
    assert table.cost_micro_usd("half", TokenCounts(input=1), TODAY) == (1, True)
    assert table.cost_micro_usd("half", TokenCounts(input=5), TODAY) == (3, True)
    assert table.cost_micro_usd("tiny", TokenCounts(input=1), TODAY) == (0, True)
    assert table.cost_micro_usd("half", TokenCounts(), TODAY) == (0, True)


def test_large_counts_stay_exact(shipped: PriceTable) -> None:
    tokens = TokenCounts(input=123_456_789, cached_input=987_654_321, output=55_555_555, reasoning=1_234_567)
    for model in ("gpt-4o-mini", "claude-3-5-haiku", "gemini-2.5-flash-lite"):
        got, priced = shipped.cost_micro_usd(model, tokens, TODAY)
        assert priced
        assert got == exact_cost(price(shipped, model), tokens)
    # 123,456,789 x $0.075 / 1M = 9,259,259.175 u$ -> 9,259,259 u$.
    assert shipped.cost_micro_usd("gpt-4o-mini", TokenCounts(cached_input=123_456_789), TODAY)[0] == 9_259_259


def test_negative_tokens_are_rejected(shipped: PriceTable) -> None:
    with pytest.raises(ValueError, match="cached_input"):
        shipped.cost_micro_usd("gpt-4o", TokenCounts(cached_input=-1), TODAY)
    with pytest.raises(ValueError):
        shipped.cost_for_estimate("gpt-4o", -1, 0, TODAY)


def test_estimate_rounds_up_and_uses_input_and_output_prices(shipped: PriceTable) -> None:
    assert shipped.cost_for_estimate("gpt-4o-mini", 1, 0, TODAY) == 1  # 0.15 u$ -> 1
    assert shipped.cost_for_estimate("gpt-4o-mini", 0, 0, TODAY) == 0
    assert shipped.cost_for_estimate("gpt-4o-mini", 1_000_000, 0, TODAY) == 150_000  # no extra when exact
    assert shipped.cost_for_estimate("gpt-4o", 1000, 500, TODAY) == 2500 + 5000
    p = price(shipped, "claude-sonnet-4-5")
    prompt, out = 12_345, 6_789
    scaled = prompt * p.input + out * p.output
    assert shipped.cost_for_estimate("claude-sonnet-4-5", prompt, out, TODAY) == -(-scaled // 1_000_000)
    settled, _ = shipped.cost_micro_usd("claude-sonnet-4-5", TokenCounts(input=prompt, output=out), TODAY)
    assert shipped.cost_for_estimate("claude-sonnet-4-5", prompt, out, TODAY) >= settled


def test_estimate_reserves_at_reasoning_price_when_higher() -> None:
    table = PriceTable.load(SHIPPED, {"thinker": {"input": 1, "output": 2, "reasoning": 8}})
    assert table.cost_for_estimate("thinker", 0, 1_000_000, TODAY) == 8_000_000


def test_unpriced_model_costs_nothing_and_says_so(shipped: PriceTable) -> None:
    assert shipped.lookup("totally-unknown-model", TODAY) is None
    assert shipped.cost_micro_usd("totally-unknown-model", TokenCounts(input=5, output=5), TODAY) == (0, False)
    assert shipped.cost_for_estimate("totally-unknown-model", 1000, 1000, TODAY) == 0


# ---------------------------------------------------------------- dates


def test_effective_from_switches_on_its_day(shipped: PriceTable) -> None:
    # o3's price cut of 2025-06-10, as shipped.
    assert price(shipped, "o3", date(2025, 6, 9)).input == 10_000_000
    assert price(shipped, "o3", date(2025, 6, 10)).input == 2_000_000
    assert price(shipped, "o3-2025-04-16", date(2025, 6, 10)).output == 8_000_000


def test_dated_entries_in_any_order_and_before_the_first_date(tmp_path: Path) -> None:
    path = write(tmp_path, """
models:
  m:
    - {effective_from: 2026-03-01, input: 3, output: 3}
    - {effective_from: 2026-01-01, input: 1, output: 1}
    - {effective_from: "2026-02-01", input: 2, output: 2}
""")
    table = PriceTable.load(path)
    assert table.lookup("m", date(2025, 12, 31)) is None
    assert table.cost_micro_usd("m", TokenCounts(input=1_000_000), date(2025, 12, 31)) == (0, False)
    assert price(table, "m", date(2026, 1, 1)).input == 1_000_000
    assert price(table, "m", date(2026, 2, 28)).input == 2_000_000
    assert price(table, "m", date(2026, 3, 1)).input == 3_000_000
    assert price(table, "m", date(2026, 3, 1)).effective_from == date(2026, 3, 1)


def test_override_not_yet_effective_falls_back_to_file(shipped: PriceTable) -> None:
    table = PriceTable.load(SHIPPED, {"gpt-4o": {"input": 1, "output": 1, "effective_from": "2027-01-01"}})
    assert price(table, "gpt-4o", TODAY) == price(shipped, "gpt-4o")
    assert price(table, "gpt-4o", date(2027, 1, 1)).input == 1_000_000


# ---------------------------------------------------------------- lookup rules


def test_overrides_win_over_file_and_default_cache_prices_to_input(shipped: PriceTable) -> None:
    table = PriceTable.load(SHIPPED, {"gpt-4o": {"input": 3.0, "output": 12.0}})
    p = price(table, "gpt-4o")
    assert p == ModelPrice(input=3_000_000, output=12_000_000, cached_input=3_000_000, cache_write=3_000_000)
    # The override also covers the snapshots that fall back to the family name.
    assert price(table, "gpt-4o-2024-08-06") == p
    assert price(table, "openai/gpt-4o") == p
    assert price(table, "gpt-4o-mini") == price(shipped, "gpt-4o-mini")


def test_override_globs_beat_file_exact_and_first_glob_wins() -> None:
    table = PriceTable.load(SHIPPED, {
        "my-finetune-*": {"input": 3.0, "output": 12.0, "cached_input": 1.5},
        "my-*": {"input": 9, "output": 9},
        "gpt-4o*": {"input": 7, "output": 7},
    })
    assert price(table, "my-finetune-abc").cached_input == 1_500_000
    assert price(table, "my-other").input == 9_000_000
    assert price(table, "gpt-4o-mini").input == 7_000_000


def test_file_globs_come_after_exact_and_stripped_names(tmp_path: Path) -> None:
    path = write(tmp_path, """
models:
  "fam-*": {input: 9, output: 9}
  fam-a: {input: 1, output: 1}
""")
    table = PriceTable.load(path)
    assert price(table, "fam-a").input == 1_000_000
    assert price(table, "fam-a-2026-01-01").input == 1_000_000  # stripped exact beats the glob
    assert price(table, "fam-b").input == 9_000_000


@pytest.mark.parametrize(("name", "base"), [
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("openai/gpt-4o", "gpt-4o"),
    ("GPT-4o-Mini", "gpt-4o-mini"),
    ("gpt-4-0613", "gpt-4"),
    ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
    ("o1-2024-12-17", "o1"),
    ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
    ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
    ("claude-opus-4-1-20250805", "claude-opus-4-1"),
    ("claude-3-5-sonnet-v2@20241022", "claude-3-5-sonnet"),
    ("us.anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
    ("gemini-2.5-flash-001", "gemini-2.5-flash"),
    ("models/gemini-2.5-flash", "gemini-2.5-flash"),
    ("models/gemini-2.0-flash-001", "gemini-2.0-flash"),
])
def test_prefix_and_suffix_stripping(shipped: PriceTable, name: str, base: str) -> None:
    assert price(shipped, name) == price(shipped, base)


def test_stripping_keeps_short_version_tails_and_listed_snapshots(shipped: PriceTable) -> None:
    # "-5" is part of the model name, not a snapshot: Opus 4.5 is not priced as Opus 4.
    assert price(shipped, "claude-opus-4-5").input != price(shipped, "claude-opus-4").input
    # An exactly listed snapshot beats its family.
    assert price(shipped, "gpt-4o-2024-05-13").input == 5_000_000
    assert price(shipped, "gpt-4o-2024-08-06").input == 2_500_000


def test_lookup_cache_is_bounded_and_consistent(shipped: PriceTable) -> None:
    table = PriceTable.load(SHIPPED)
    first = table.lookup("gpt-4o", TODAY)
    for i in range(5000):
        table.lookup(f"unknown-{i}", TODAY)
    assert len(table._cache) <= 4096
    assert table.lookup("gpt-4o", TODAY) == first == shipped.lookup("gpt-4o", TODAY)


def test_prices_are_parsed_exactly(tmp_path: Path) -> None:
    path = write(tmp_path, """
models:
  a: {input: 0.075, output: 1.1, cached_input: "0.000001", cache_write: 3}
""")
    p = price(PriceTable.load(path), "a")
    assert (p.input, p.output, p.cached_input, p.cache_write) == (75_000, 1_100_000, 1, 3_000_000)


# ---------------------------------------------------------------- broken files

BROKEN: list[tuple[str, list[str]]] = [
    ("models:\n  m1: {output: 1}\n", ["m1", "'input'", "required"]),
    ("models:\n  m1: {input: abc, output: 1}\n", ["m1", "'input'"]),
    ("models:\n  m1: {input: -1, output: 1}\n", ["m1", "'input'", ">= 0"]),
    ("models:\n  m1: {input: 1, output: 0.0000005}\n", ["m1", "'output'", "6 decimal places"]),
    ("models:\n  m1: {input: true, output: 1}\n", ["m1", "'input'"]),
    ("models:\n  m1: {input: .nan, output: 1}\n", ["m1", "'input'"]),
    ("models:\n  m1: {input: 1, output: 1, cache_read: 1}\n", ["m1", "cache_read"]),
    ("models:\n  m1: {input: 1, output: 1, effective_from: soon}\n", ["m1", "effective_from"]),
    ("models:\n  m1:\n    - {input: 1, output: 1, effective_from: 2026-01-01}\n"
     "    - {input: 2, output: 2, effective_from: 2026-01-01}\n", ["m1", "effective_from"]),
    ("models:\n  m1:\n    - {input: 1, output: 1}\n    - {input: 2, output: 2}\n", ["m1", "effective_from"]),
    ("models:\n  m1: []\n", ["m1"]),
    ("models:\n  m1: 3\n", ["m1"]),
    ("models:\n  M1: {input: 1, output: 1}\n  m1: {input: 1, output: 1}\n", ["m1", "twice"]),
    ("models: {}\n", ["models"]),
    ("modles:\n  m1: {input: 1, output: 1}\n", ["modles"]),
    ("models: [unclosed\n", ["YAML"]),
]


@pytest.mark.parametrize(("text", "expected"), BROKEN)
def test_broken_pricing_file_names_file_model_and_field(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path, text, name="broken-pricing.yaml")
    with pytest.raises(ConfigError) as info:
        PriceTable.load(path)
    message = str(info.value)
    assert "broken-pricing.yaml" in message
    for part in expected:
        assert part in message


def test_missing_pricing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        PriceTable.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"mine-*": {"input": 1}}, ["prices.mine-*", "'output'"]),
    ({"mine": {"input": 1, "output": 1, "reasoning": "x"}}, ["prices.mine", "'reasoning'"]),
    ({"mine": [{"input": 1, "output": 1, "effective_from": "2026-13-01"}]}, ["prices.mine", "effective_from"]),
])
def test_broken_overrides_name_the_field(overrides: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        PriceTable.load(SHIPPED, overrides)
    for part in expected:
        assert part in str(info.value)
