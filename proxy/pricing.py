"""Prices token usage exactly, in integer micro-dollars, from the pricing file plus config overrides.

The file is read once at load; lookups and arithmetic are pure and never touch floats.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, tzinfo
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from proxy.errors import ConfigError
from proxy.records import TokenCounts

log = logging.getLogger("meterproxy.pricing")

MICRO_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are quoted per 1M tokens
_LOOKUP_CACHE_MAX = 4096
_UNPRICED_LOGGED_MAX = 1000  # client-chosen names: stop logging new ones past this many

_PRICE_FIELDS = ("input", "output", "cached_input", "cache_write", "reasoning")
_ENTRY_FIELDS = frozenset(_PRICE_FIELDS) | {"effective_from"}
_GLOB_CHARS = frozenset("*?[")

# Name normalisation, applied only when the exact name is not in a table.
# A leading "<anything>/" (Gemini's "models/", a router's "openai/") and Bedrock's
# "[region.]anthropic." are dropped; then one trailing suffix at a time: Vertex "@version",
# Bedrock "-v2:0", a date (-2024-08-06, -20241022, -05-20, -09-2025), a 3-4 digit snapshot
# (-001, -0613) or -latest. One- and two-digit tails are kept: "claude-opus-4-5" is a model,
# not a version of "claude-opus-4".
_BEDROCK_PREFIX = re.compile(r"^(?:[a-z]{2,4}\.)?anthropic\.")
_VERSION_SUFFIX = re.compile(
    r"(?:@[\w.\-]+|-v\d+(?::\d+)?|-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{2}-\d{4}|-\d{2}-\d{2}|-\d{3,4}|-latest)$"
)


def date_at(tz: tzinfo, ts: float) -> date:
    """The date in `tz` at unix time `ts`: the day prices and periods are looked up by."""
    return _date_of_minute(tz, int(ts // 60))


@lru_cache(maxsize=256)
def _date_of_minute(tz: tzinfo, minute: int) -> date:
    # Memoized per minute (every zone changes date on a whole minute): a zone conversion is the
    # dearest part of the lookup, and the proxy asks for it twice a request.
    return datetime.fromtimestamp(minute * 60, tz).date()


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's prices in micro-USD per 1M tokens ($2.50 per 1M -> 2_500_000).

    `reasoning` None means reasoning tokens are priced as output. `effective_from` None means
    the price has applied since before any dated entry of the same model.
    """

    input: int
    output: int
    cached_input: int
    cache_write: int
    reasoning: int | None = None
    effective_from: date | None = None


@dataclass(frozen=True, slots=True)
class _Layer:
    """One source of prices: exact names, and globs in the order they were written."""

    exact: Mapping[str, tuple[ModelPrice, ...]]
    globs: tuple[tuple[str, tuple[ModelPrice, ...]], ...]


_UNPRICED = object()  # cache marker: looked up, nothing matched


class PriceTable:
    """Prices per model and day. Build with `PriceTable.load`; share one per config."""

    def __init__(self, layers: Sequence[_Layer], taken: str | None) -> None:
        self._layers = tuple(layers)
        self._taken = taken
        # Lookup runs on every request; most traffic uses a handful of (model, day) pairs.
        self._cache: dict[tuple[str, date], ModelPrice | object] = {}
        self._unpriced_logged: set[str] = set()

    @classmethod
    def load(
        cls,
        pricing_file: str | Path,
        overrides: Mapping[str, Mapping[str, Any] | Sequence[Mapping[str, Any]]] | None = None,
    ) -> PriceTable:
        """Read the pricing file and merge the config's `prices:` overrides (which win).

        Raises ConfigError naming the file (or `prices`), the model and the field.
        """
        path = Path(pricing_file)
        where = str(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read pricing file: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML: {exc}") from exc
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a mapping with `models:` at the top level")
        unknown = set(raw) - {"taken", "source", "models"}
        if unknown:
            raise ConfigError(f"{where}: unknown top-level field(s): {', '.join(sorted(map(str, unknown)))}")
        models = raw.get("models")
        if not isinstance(models, Mapping) or not models:
            raise ConfigError(f"{where}: field 'models' must be a non-empty mapping of model -> prices")
        taken = raw.get("taken")
        taken_str = taken.isoformat() if isinstance(taken, date) else (None if taken is None else str(taken))
        layers = [_parse_layer(models, where, "models")]
        if overrides:
            if not isinstance(overrides, Mapping):
                raise ConfigError("prices: expected a mapping of model glob -> prices")
            layers.insert(0, _parse_layer(overrides, "config", "prices"))
        return cls(layers, taken_str)

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any] | None) -> PriceTable:
        """Only the config's `prices:` (no pricing file)."""
        return cls([_parse_layer(overrides, "config", "prices")] if overrides else [], None)

    @property
    def taken(self) -> str | None:
        """The day the shipped prices were read from the providers' pages."""
        return self._taken

    def keys(self) -> list[str]:
        """Every model name or glob known, overrides first (for `check-config` output)."""
        out: list[str] = []
        for layer in self._layers:
            out.extend(layer.exact)
            out.extend(pattern for pattern, _ in layer.globs)
        return out

    def lookup(self, model: str, on: date) -> ModelPrice | None:
        """The price of `model` on day `on`, or None if no entry applies.

        Per layer (overrides, then the file): the exact name, then the name with provider prefix
        and version/date suffixes removed step by step, then globs in written order. A key whose
        dated entries all start after `on` does not match, so lookup falls through to the next.
        """
        key = (model, on)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._resolve(model, on)
            if len(self._cache) >= _LOOKUP_CACHE_MAX:
                del self._cache[next(iter(self._cache))]  # oldest first: dicts keep order
            self._cache[key] = hit
        return hit if isinstance(hit, ModelPrice) else None

    def cost_micro_usd(self, model: str, tokens: TokenCounts, on: date) -> tuple[int, bool]:
        """(cost in micro-USD, priced). Unpriced models cost (0, False).

        Exact: every type's tokens x its price (micro-USD per 1M tokens) are summed as integers,
        then divided by 1M once and rounded half up: one rounding per request, so nothing is
        lost or invented by rounding each type apart. Reasoning is a part of output: it is
        taken out of output and priced at `reasoning` (or output when the model has none).
        """
        _check_tokens(tokens)
        price = self.lookup(model, on)
        if price is None:
            if tokens.total:
                self._log_unpriced(model)
            return 0, False
        # A provider may report more reasoning than output; never let output go negative.
        reasoning = min(tokens.reasoning, tokens.output)
        reasoning_rate = price.output if price.reasoning is None else price.reasoning
        scaled = (
            tokens.input * price.input
            + tokens.cached_input * price.cached_input
            + tokens.cache_write * price.cache_write
            + (tokens.output - reasoning) * price.output
            + reasoning * reasoning_rate
        )
        return (scaled + TOKENS_PER_PRICE_UNIT // 2) // TOKENS_PER_PRICE_UNIT, True

    def _log_unpriced(self, model: str) -> None:
        # Once per model per loaded table: the metric counts every request, the log names the model.
        if model in self._unpriced_logged or len(self._unpriced_logged) >= _UNPRICED_LOGGED_MAX:
            return
        self._unpriced_logged.add(model)
        log.warning("model %r has no price: its usage is metered at zero cost (add it under `prices:`)", model)

    def cost_for_estimate(self, model: str, prompt_tokens: int, output_tokens: int, on: date) -> int:
        """Reservation before forwarding: prompt at the input price, output at the output price
        (or the reasoning price when higher), rounded up so rounding never under-reserves.

        Unpriced models reserve 0. Cache writes (Anthropic: 1.25x input) can still make the
        settled cost exceed this; settle corrects it.
        """
        if prompt_tokens < 0 or output_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got {prompt_tokens=} {output_tokens=}")
        price = self.lookup(model, on)
        if price is None:
            return 0
        out_rate = max(price.output, price.reasoning or 0)
        scaled = prompt_tokens * price.input + output_tokens * out_rate
        return -(-scaled // TOKENS_PER_PRICE_UNIT)

    def _resolve(self, model: str, on: date) -> ModelPrice | object:
        names = list(_candidate_names(model))
        for layer in self._layers:
            for name in names:
                entries = layer.exact.get(name)
                if entries is not None and (found := _effective(entries, on)) is not None:
                    return found
            for pattern, entries in layer.globs:
                if any(fnmatchcase(name, pattern) for name in names):
                    if (found := _effective(entries, on)) is not None:
                        return found
        return _UNPRICED


def _candidate_names(model: str) -> Iterator[str]:
    """The name as given (lower-cased), then ever more normalised forms, without repeats."""
    name = model.strip().lower()
    seen: set[str] = set()

    def fresh(candidate: str) -> bool:
        if candidate and candidate not in seen:
            seen.add(candidate)
            return True
        return False

    if fresh(name):
        yield name
    if "/" in name:
        name = name.rsplit("/", 1)[1]
        if fresh(name):
            yield name
    stripped = _BEDROCK_PREFIX.sub("", name)
    if stripped != name:
        name = stripped
        if fresh(name):
            yield name
    while True:
        shorter = _VERSION_SUFFIX.sub("", name, count=1)
        if shorter == name or not shorter:
            return
        name = shorter
        if fresh(name):
            yield name


def _effective(entries: tuple[ModelPrice, ...], on: date) -> ModelPrice | None:
    """The entry with the latest effective_from <= on (entries are sorted, undated first)."""
    found = None
    for entry in entries:
        if entry.effective_from is None or entry.effective_from <= on:
            found = entry
        else:
            break
    return found


def _check_tokens(tokens: TokenCounts) -> None:
    for name, value in tokens.as_dict().items():
        if value < 0:
            raise ValueError(f"token count {name} must be >= 0, got {value}")


def _parse_layer(models: Mapping[Any, Any], where: str, section: str) -> _Layer:
    exact: dict[str, tuple[ModelPrice, ...]] = {}
    globs: dict[str, tuple[ModelPrice, ...]] = {}
    for raw_key, spec in models.items():
        if not isinstance(raw_key, str) or not raw_key.strip():
            raise ConfigError(f"{where}: {section}: model names must be non-empty strings, got {raw_key!r}")
        key = raw_key.strip().lower()
        label = f"{where}: {section}.{raw_key}"
        if key in exact or key in globs:
            raise ConfigError(f"{label}: listed twice (names are compared case-insensitively)")
        entries = _parse_entries(spec, label)
        (globs if _GLOB_CHARS & set(key) else exact)[key] = entries
    return _Layer(exact=exact, globs=tuple(globs.items()))


def _parse_entries(spec: Any, label: str) -> tuple[ModelPrice, ...]:
    if isinstance(spec, Mapping):
        return (_parse_entry(spec, label),)
    if not isinstance(spec, list) or not spec:
        raise ConfigError(f"{label}: expected a mapping of prices or a non-empty list of dated entries")
    entries = [_parse_entry(item, f"{label}[{i}]") for i, item in enumerate(spec)]
    undated = [e for e in entries if e.effective_from is None]
    if len(undated) > 1:
        raise ConfigError(f"{label}: field 'effective_from' is missing on more than one entry")
    dates = [e.effective_from for e in entries if e.effective_from is not None]
    if len(dates) != len(set(dates)):
        raise ConfigError(f"{label}: field 'effective_from' has the same date twice")
    return tuple(sorted(entries, key=lambda e: e.effective_from or date.min))


def _parse_entry(spec: Any, label: str) -> ModelPrice:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{label}: expected a mapping of prices, got {type(spec).__name__}")
    unknown = set(spec) - _ENTRY_FIELDS
    if unknown:
        raise ConfigError(
            f"{label}: unknown field(s) {', '.join(sorted(map(str, unknown)))}; "
            f"allowed: {', '.join(sorted(_ENTRY_FIELDS))}"
        )
    for required in ("input", "output"):
        if required not in spec:
            raise ConfigError(f"{label}: field '{required}' is required")
    values = {name: _micro_per_million(spec[name], label, name) for name in _PRICE_FIELDS if name in spec}
    return ModelPrice(
        input=values["input"],
        output=values["output"],
        # Providers without a cache discount bill cached and written tokens as plain input.
        cached_input=values.get("cached_input", values["input"]),
        cache_write=values.get("cache_write", values["input"]),
        reasoning=values.get("reasoning"),
        effective_from=_parse_date(spec["effective_from"], label) if "effective_from" in spec else None,
    )


def _micro_per_million(value: Any, label: str, field: str) -> int:
    """USD per 1M tokens as written -> exact integer micro-USD per 1M tokens."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ConfigError(f"{label}: field '{field}' must be a number of USD per 1M tokens, got {value!r}")
    try:
        # str() of a float is its shortest round-trip form, so 0.075 stays exactly 0.075.
        usd = Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise ConfigError(f"{label}: field '{field}' is not a number: {value!r}") from exc
    if not usd.is_finite() or usd < 0:
        raise ConfigError(f"{label}: field '{field}' must be a finite number >= 0, got {value!r}")
    micro = usd * MICRO_PER_USD
    if micro != micro.to_integral_value():
        raise ConfigError(
            f"{label}: field '{field}' = {value!r} has more than 6 decimal places of a dollar "
            "(prices are kept as whole micro-dollars per 1M tokens)"
        )
    return int(micro)


def _parse_date(value: Any, label: str) -> date:
    if isinstance(value, datetime):
        raise ConfigError(f"{label}: field 'effective_from' must be a day (YYYY-MM-DD), not a time")
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{label}: field 'effective_from' must be a date YYYY-MM-DD, got {value!r}")


__all__ = ["MICRO_PER_USD", "ModelPrice", "PriceTable"]
