"""Usage reports from the store's aggregates: query parsing, grouping, exact money, and the month-end
forecast. Pure logic (no I/O): the admin API and the CLI read rows from the store and hand them here.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from .quota.store import AggregateRow, Totals

GROUP_KEYS = ("user", "team", "model", "day")
MAX_QUERY_DAYS = 400  # the aggregates are kept a little longer than that
TRAILING_DAYS = 7  # the burn rate is the average daily spend over this many days before today


def usd(micro_usd: int) -> str:
    """Micro-dollars as an exact decimal string of dollars: 1234567 -> "1.234567"."""
    return format(Decimal(micro_usd).scaleb(-6).normalize(), "f")


def day_range(since: date, until: date) -> tuple[str, ...]:
    return tuple((since + timedelta(days=i)).isoformat() for i in range((until - since).days + 1))


@dataclass(frozen=True, slots=True)
class Query:
    since: date
    until: date
    user: str | None = None
    team: str | None = None
    model: str | None = None
    group_by: tuple[str, ...] = ("user",)

    @property
    def days(self) -> tuple[str, ...]:
        return day_range(self.since, self.until)


def parse_query(params: Mapping[str, str | None], today: date) -> Query:
    """Filters from query parameters or CLI flags. Defaults: this month so far, grouped by user.
    Raises ValueError with a message fit for the user."""
    since = _date(params.get("since"), "since") or today.replace(day=1)
    until = _date(params.get("until"), "until") or today
    if since > until:
        raise ValueError(f"since ({since}) is after until ({until})")
    if (until - since).days >= MAX_QUERY_DAYS:
        raise ValueError(f"the range from {since} to {until} is longer than {MAX_QUERY_DAYS} days")
    raw = params.get("group_by") or "user"
    group_by = tuple(dict.fromkeys(g.strip() for g in raw.split(",") if g.strip()))
    bad = [g for g in group_by if g not in GROUP_KEYS]
    if bad or not group_by:
        raise ValueError(f"group_by must be some of {', '.join(GROUP_KEYS)} (comma-separated), not {raw!r}")
    return Query(since, until, params.get("user") or None, params.get("team") or None,
                 params.get("model") or None, group_by)


def _date(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} must be a date as YYYY-MM-DD, not {value!r}") from None


def group(rows: Iterable[AggregateRow], query: Query) -> list[tuple[dict[str, str | None], Totals]]:
    """Sum the rows the query selects by its group keys, sorted by the keys."""
    sums: dict[tuple[str | None, ...], Totals] = {}
    for row in rows:
        if (query.user is not None and row.user != query.user) or \
                (query.team is not None and row.team != query.team) or \
                (query.model is not None and row.model != query.model) or \
                not (query.since.isoformat() <= row.day <= query.until.isoformat()):
            continue
        k = tuple(getattr(row, g) for g in query.group_by)
        sums[k] = sums.get(k, Totals()) + row.totals
    ordered = sorted(sums.items(), key=lambda kv: tuple("" if v is None else v for v in kv[0]))
    return [(dict(zip(query.group_by, k, strict=True)), t) for k, t in ordered]


def row_json(keys: Mapping[str, str | None], totals: Totals) -> dict[str, object]:
    return {**keys, "requests": totals.requests, "input_tokens": totals.input_tokens,
            "output_tokens": totals.output_tokens, "cached_input_tokens": totals.cached_input_tokens,
            "cache_write_tokens": totals.cache_write_tokens, "reasoning_tokens": totals.reasoning_tokens,
            "cost_usd": usd(totals.cost_micro_usd), "cost_micro_usd": totals.cost_micro_usd}


def report(rows: Iterable[AggregateRow], query: Query) -> list[dict[str, object]]:
    return [row_json(k, t) for k, t in group(rows, query)]


# ---------------------------------------------------------------- forecast


@dataclass(frozen=True, slots=True)
class Forecast:
    """Month-end spend at the trailing burn rate, and when a budget runs out at that rate."""

    month: str  # YYYY-MM
    month_to_date_micro_usd: int
    burn_micro_usd_per_day: int  # rounded; the projection uses the exact average
    month_end_micro_usd: int
    budget_micro_usd: int | None
    runs_out_on: date | None  # None: not this month at this rate (or no budget)

    def as_json(self) -> dict[str, object]:
        return {
            "month": self.month,
            "month_to_date_usd": usd(self.month_to_date_micro_usd),
            "burn_usd_per_day": usd(self.burn_micro_usd_per_day),
            "month_end_usd": usd(self.month_end_micro_usd),
            "budget_usd": None if self.budget_micro_usd is None else usd(self.budget_micro_usd),
            "runs_out_on": None if self.runs_out_on is None else self.runs_out_on.isoformat(),
            "month_to_date_micro_usd": self.month_to_date_micro_usd,
            "month_end_micro_usd": self.month_end_micro_usd,
        }


def forecast_days(today: date) -> tuple[str, ...]:
    """The days a forecast reads: the month so far and the trailing window before today."""
    return day_range(min(today.replace(day=1), today - timedelta(days=TRAILING_DAYS)), today)


def daily_spend(rows: Iterable[AggregateRow]) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in rows:
        out[row.day] = out.get(row.day, 0) + row.totals.cost_micro_usd
    return out


def forecast(daily_micro_usd: Mapping[str, int], now: datetime, budget_micro_usd: int | None) -> Forecast:
    """`now` is timezone-aware, in the zone the days are named in.

    month-end = month-to-date + burn × days left, where burn is the average daily spend over the
    `TRAILING_DAYS` full days before today (today is partial, so it counts toward month-to-date
    but not the rate) and days left is the exact fraction from `now` to the month's end, counted on
    the calendar (wall clock: a day that changes summer time is still one day of spend). The budget
    runs out on the day month-to-date + burn × t reaches it, if that is before the month ends
    (today if it already has)."""
    today = now.date()
    first = today.replace(day=1)
    nxt = (first + timedelta(days=32)).replace(day=1)
    month_end = datetime(nxt.year, nxt.month, nxt.day, tzinfo=now.tzinfo)
    mtd = sum(daily_micro_usd.get(d, 0) for d in day_range(first, today))
    trailing = day_range(today - timedelta(days=TRAILING_DAYS), today - timedelta(days=1))
    burn = Fraction(sum(daily_micro_usd.get(d, 0) for d in trailing), TRAILING_DAYS)
    days_left = _days(month_end - now)
    projected = mtd + burn * days_left
    runs_out: date | None = None
    if budget_micro_usd is not None:
        if mtd >= budget_micro_usd:
            runs_out = today
        elif burn > 0:
            t = (budget_micro_usd - mtd) / burn  # days from now
            if t <= days_left:
                runs_out = (now + timedelta(microseconds=int(t * 86_400_000_000))).date()
    return Forecast(first.strftime("%Y-%m"), mtd, _round(burn), _round(projected), budget_micro_usd, runs_out)


def _days(delta: timedelta) -> Fraction:
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return Fraction(max(0, micros), 86_400_000_000)


def _round(x: Fraction) -> int:
    """To the nearest micro-dollar, halves up (money is never negative here)."""
    return int(x + Fraction(1, 2))


# ---------------------------------------------------------------- rendering (CLI)


def render(rows: list[dict[str, object]], columns: list[str], fmt: str) -> str:
    """Rows as an aligned text table, CSV or JSON (an array of objects)."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    cells = [["" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(cells)
        return out.getvalue().rstrip("\n")
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    numeric = [all(_numeric(row[i]) for row in cells) and bool(cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(columns, widths, numeric, strict=True))]
    for row in cells:
        lines.append("  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(row, widths, numeric, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def _numeric(text: str) -> bool:
    try:
        Decimal(text)
    except ArithmeticError:
        return False
    return True


def forecast_line(label: str, f: Forecast) -> str:
    line = (f"forecast for {label} ({f.month}): month to date ${usd(f.month_to_date_micro_usd)}, "
            f"burn ${usd(f.burn_micro_usd_per_day)}/day (trailing {TRAILING_DAYS} days), "
            f"month end ${usd(f.month_end_micro_usd)}")
    if f.budget_micro_usd is not None:
        when = f.runs_out_on.isoformat() if f.runs_out_on else "not this month"
        line += f"; budget ${usd(f.budget_micro_usd)} runs out: {when}"
    return line
