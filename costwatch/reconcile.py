"""Reconciliation: Anthropic's own usage figures beside what costwatch recorded, per time bucket and model.

Pure: :func:`reconcile` takes the reported rows (:mod:`costwatch.usage_api`) and the recorded
attempts and returns a plain dict whose shape is documented, key by key, in ``docs/reconcile.md``
(``costwatch reconcile --format json`` is a stable contract: it only gains keys). The ``render_*``
functions turn it into text.

Three questions per bucket and model: how much of the billed traffic costwatch saw (coverage per
token type), what it never saw (``unseen`` tokens and dollars: an uninstrumented process, another
tool), and, where it saw all the input, what the dropped attempts really generated (the
``residual`` output: the reported output less the output the API reported to costwatch for the
attempts that completed), beside costwatch's estimate of it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from .pricing import PriceTable
from .records import AttemptRecord, Usage
from .usage_api import ANALYTICS_BETA, BUCKET_WIDTHS, COST_PATH, USAGE_PATH, ReportedCost, ReportedUsage

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_TOLERANCE",
    "RECONCILE_FORMATS",
    "TOKEN_TYPES",
    "bucket_window",
    "reconcile",
    "render_csv",
    "render_json",
    "render_table",
]

TOKEN_TYPES = ("input", "cache_read", "cache_write", "output")
"""The token types compared, as the metrics label them (``input`` is uncached input)."""

_INPUT_TYPES = TOKEN_TYPES[:3]

DEFAULT_TOLERANCE = 0.001
"""How far recorded input may be from reported input (as a share of it) for a bucket to count as
fully seen. Both sides are the API's own exact counts, so fully instrumented traffic matches
exactly; 0.1% leaves room for an attempt costwatch dated into the neighbouring bucket (its clock
and the API's differ by the request's transit time) without hiding one unseen request in a thousand."""

RECONCILE_FORMATS = ("table", "json", "csv")

FORMAT_VERSION = 1
"""The JSON's ``version``; it changes only if a key ever had to change meaning (it never should)."""


def bucket_window(start: datetime, end: datetime, bucket: str) -> tuple[datetime, datetime]:
    """``[start, end)`` widened to whole buckets of width ``bucket`` (UTC)."""
    width = BUCKET_WIDTHS[bucket]
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    first = epoch + ((start - epoch) // width) * width
    last = epoch + -((epoch - end) // width) * width
    return first, last


def _floor(moment: datetime, width: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    return epoch + ((moment.astimezone(timezone.utc) - epoch) // width) * width


@dataclass
class _Side:
    """Token sums of one side (reported or recorded) for one bucket and model."""

    input: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    output: int = 0
    output_reported: int = 0
    output_estimated: int = 0
    requests: int = 0
    dropped: int = 0
    cost_usd: float | None = 0.0
    seen: bool = False

    def tokens(self, token_type: str) -> int:
        if token_type == "cache_write":
            return self.cache_write_5m + self.cache_write_1h
        value: int = getattr(self, token_type)
        return value

    def add(self, other: _Side) -> None:
        for name in ("input", "cache_read", "cache_write_5m", "cache_write_1h", "output"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.output_reported += other.output_reported
        self.output_estimated += other.output_estimated
        self.requests += other.requests
        self.dropped += other.dropped
        self.cost_usd = (
            None if self.cost_usd is None or other.cost_usd is None else self.cost_usd + other.cost_usd
        )
        self.seen = self.seen or other.seen


@dataclass
class _Pair:
    reported: _Side = field(default_factory=_Side)
    recorded: _Side = field(default_factory=_Side)


def _ratio(recorded: int, reported: int) -> float | None:
    return round(recorded / reported, 6) if reported else None


def _matches(recorded: int, reported: int, tolerance: float) -> bool:
    return abs(recorded - reported) <= tolerance * reported if reported else recorded == 0


def _reported_json(reported: _Side, cost_usd: float | None) -> dict[str, Any]:
    """The reported side of a row or of the totals, as the JSON shows it."""
    return {
        "input_tokens": reported.input,
        "cache_read_tokens": reported.cache_read,
        "cache_write_tokens": reported.tokens("cache_write"),
        "output_tokens": reported.output,
        "requests": reported.requests,
        "cost_usd": cost_usd,
    }


def _recorded_json(recorded: _Side, cost_usd: float | None) -> dict[str, Any]:
    """The recorded side of a row or of the totals, as the JSON shows it."""
    return {
        "input_tokens": recorded.input,
        "cache_read_tokens": recorded.cache_read,
        "cache_write_tokens": recorded.tokens("cache_write"),
        "output_tokens": recorded.output,
        "output_reported_tokens": recorded.output_reported,
        "output_estimated_tokens": recorded.output_estimated,
        "attempts": recorded.requests,
        "dropped_attempts": recorded.dropped,
        "cost_usd": cost_usd,
    }


def _row(pair: _Pair, prices: PriceTable, model: str, tolerance: float) -> dict[str, Any]:
    reported, recorded = pair.reported, pair.recorded
    input_matched = reported.seen and all(
        _matches(recorded.tokens(t), reported.tokens(t), tolerance) for t in _INPUT_TYPES
    )
    unseen = {t: max(0, reported.tokens(t) - recorded.tokens(t)) for t in _INPUT_TYPES}
    # All the input seen means all the requests seen: output beyond the completed attempts' is the
    # dropped attempts' (compared with their estimate below), not traffic costwatch missed.
    unseen["output"] = 0 if input_matched else max(0, reported.output - recorded.output)
    residual = max(0, reported.output - recorded.output_reported) if input_matched else None
    price = prices.lookup(model)
    unseen_usd: float | None = None
    if price is not None:
        # Unseen cache writes are split between lifetimes as the API reported them.
        write_5m = max(0, reported.cache_write_5m - recorded.cache_write_5m)
        write_1h = max(0, unseen["cache_write"] - write_5m)
        usage = Usage(
            input_tokens=unseen["input"],
            cache_read_tokens=unseen["cache_read"],
            cache_write_5m_tokens=write_5m,
            cache_write_1h_tokens=write_1h,
            output_tokens=unseen["output"],
        )
        unseen_usd = round(price.cost(usage).total_usd, 6)
    flags = []
    if price is None:
        flags.append("unpriced")
    if not reported.seen:
        flags.append("not_reported")
    if any(recorded.tokens(t) > reported.tokens(t) * (1 + tolerance) for t in _INPUT_TYPES) or (
        recorded.output_reported > reported.output
    ):
        flags.append("over_recorded")
    return {
        "priced": price is not None,
        "flags": flags,
        "reported": _reported_json(reported, _usd(reported.cost_usd) if reported.seen else None),
        "recorded": _recorded_json(recorded, _usd(recorded.cost_usd)),
        "coverage": {t: _ratio(recorded.tokens(t), reported.tokens(t)) for t in TOKEN_TYPES},
        "unseen": {"tokens": unseen, "usd": unseen_usd},
        "dropped_output": {
            "input_matched": input_matched,
            "estimated_tokens": recorded.output_estimated,
            "residual_tokens": residual,
        },
    }


def _usd(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def reconcile(
    reported: Iterable[ReportedUsage],
    costs: Iterable[ReportedCost],
    recorded: Iterable[AttemptRecord],
    *,
    start: datetime,
    end: datetime,
    bucket: str,
    prices: PriceTable,
    tolerance: float = DEFAULT_TOLERANCE,
    api_key_ids: Sequence[str] = (),
    data_refreshed_at: datetime | None = None,
) -> dict[str, Any]:
    """The reconciliation of ``[start, end)`` in ``bucket`` buckets: one row per bucket and model that
    either side has, and the totals. See ``docs/reconcile.md`` for every key."""
    width = BUCKET_WIDTHS[bucket]
    pairs: dict[tuple[datetime, str], _Pair] = {}
    for figures in reported:
        side = pairs.setdefault((figures.bucket_start, figures.model), _Pair()).reported
        side.seen = True
        side.input += figures.uncached_input_tokens
        side.cache_read += figures.cache_read_tokens
        side.cache_write_5m += figures.cache_write_5m_tokens
        side.cache_write_1h += figures.cache_write_1h_tokens
        side.output += figures.output_tokens
        side.requests += figures.requests or 0
    for charged in costs:
        side = pairs.setdefault((charged.bucket_start, charged.model), _Pair()).reported
        side.cost_usd = (side.cost_usd or 0.0) + charged.usd
    for record in recorded:
        if not start <= record.started_at < end:
            continue
        side = pairs.setdefault((_floor(record.started_at, width), record.model_name), _Pair()).recorded
        usage = record.usage
        side.input += usage.input_tokens
        side.cache_read += usage.cache_read_tokens
        side.cache_write_5m += usage.cache_write_5m_tokens
        side.cache_write_1h += usage.cache_write_1h_tokens
        side.output += usage.output_tokens
        estimated = usage.estimated_output_tokens if usage.output_estimated else 0
        side.output_estimated += estimated
        side.output_reported += usage.output_tokens - estimated
        side.requests += 1
        side.dropped += 1 if record.outcome.value == "dropped" else 0
        cost = record.cost
        side.cost_usd = None if cost is None or side.cost_usd is None else side.cost_usd + cost.total_usd
    rows = []
    total = _Pair()
    for (bucket_start, model), pair in sorted(pairs.items()):
        row = _row(pair, prices, model, tolerance)
        rows.append(
            {
                "bucket_start": _iso(bucket_start),
                "bucket_end": _iso(bucket_start + width),
                "model": model,
                **row,
            }
        )
        total.reported.add(pair.reported)
        total.recorded.add(pair.recorded)
    totals = _totals(rows, total)
    return {
        "version": FORMAT_VERSION,
        "source": {
            "api": "usage_and_cost_analytics",
            "endpoints": [USAGE_PATH, COST_PATH],
            "beta": ANALYTICS_BETA,
            "data_refreshed_at": _iso(data_refreshed_at) if data_refreshed_at is not None else None,
        },
        "start": _iso(start),
        "end": _iso(end),
        "bucket": bucket,
        "api_key_ids": list(api_key_ids),
        "tolerance": tolerance,
        "prices": {"version": prices.version, "source": prices.source},
        "totals": totals,
        "rows": rows,
    }


def _totals(rows: list[dict[str, Any]], total: _Pair) -> dict[str, Any]:
    reported, recorded = total.reported, total.recorded
    unseen = {t: sum(row["unseen"]["tokens"][t] for row in rows) for t in TOKEN_TYPES}
    unseen_usd = sum(row["unseen"]["usd"] or 0.0 for row in rows)
    matched = [row for row in rows if row["dropped_output"]["input_matched"]]
    return {
        "rows": len(rows),
        "unpriced_rows": sum(1 for row in rows if "unpriced" in row["flags"]),
        # The totals' costs sum the rows' costs, a row without one (unpriced, not reported) counting 0.
        "reported": _reported_json(reported, _usd(sum(row["reported"]["cost_usd"] or 0.0 for row in rows))),
        "recorded": _recorded_json(recorded, _usd(sum(row["recorded"]["cost_usd"] or 0.0 for row in rows))),
        "coverage": {t: _ratio(recorded.tokens(t), reported.tokens(t)) for t in TOKEN_TYPES},
        "unseen": {"tokens": unseen, "usd": _usd(unseen_usd)},
        "dropped_output": {
            "matched_rows": len(matched),
            "estimated_tokens": sum(row["dropped_output"]["estimated_tokens"] for row in matched),
            "residual_tokens": sum(row["dropped_output"]["residual_tokens"] for row in matched),
        },
    }


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_json(result: Mapping[str, Any]) -> str:
    """The reconciliation as indented JSON (the documented contract)."""
    return json.dumps(result, indent=2)


CSV_COLUMNS = (
    "bucket_start",
    "bucket_end",
    "model",
    "priced",
    "flags",
    *(f"reported_{t}_tokens" for t in TOKEN_TYPES),
    "reported_requests",
    "reported_cost_usd",
    *(f"recorded_{t}_tokens" for t in TOKEN_TYPES),
    "recorded_output_estimated_tokens",
    "recorded_attempts",
    "recorded_cost_usd",
    *(f"coverage_{t}" for t in TOKEN_TYPES),
    *(f"unseen_{t}_tokens" for t in TOKEN_TYPES),
    "unseen_usd",
    "dropped_output_estimated_tokens",
    "dropped_output_residual_tokens",
)
"""The CSV's columns: one line per row of the JSON, flattened."""


def render_csv(result: Mapping[str, Any]) -> str:
    """One CSV line per bucket and model (``flags`` joined by ``;``; empty cells are JSON nulls)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in result["rows"]:
        line: dict[str, Any] = {
            "bucket_start": row["bucket_start"],
            "bucket_end": row["bucket_end"],
            "model": row["model"],
            "priced": row["priced"],
            "flags": ";".join(row["flags"]),
            "reported_requests": row["reported"]["requests"],
            "reported_cost_usd": row["reported"]["cost_usd"],
            "recorded_output_estimated_tokens": row["recorded"]["output_estimated_tokens"],
            "recorded_attempts": row["recorded"]["attempts"],
            "recorded_cost_usd": row["recorded"]["cost_usd"],
            "unseen_usd": row["unseen"]["usd"],
            "dropped_output_estimated_tokens": row["dropped_output"]["estimated_tokens"],
            "dropped_output_residual_tokens": row["dropped_output"]["residual_tokens"],
        }
        for t in TOKEN_TYPES:
            line[f"reported_{t}_tokens"] = row["reported"][f"{t}_tokens"]
            line[f"recorded_{t}_tokens"] = row["recorded"][f"{t}_tokens"]
            line[f"coverage_{t}"] = row["coverage"][t]
            line[f"unseen_{t}_tokens"] = row["unseen"]["tokens"][t]
        writer.writerow({key: "" if value is None else value for key, value in line.items()})
    return out.getvalue()


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.4f}" if value < 0.01 else f"${value:,.2f}"


def render_table(result: Mapping[str, Any], console: Console) -> None:
    """The reconciliation for a reader: coverage per token type, unseen spend, dropped output."""
    totals = result["totals"]
    console.print(
        f"Reconciliation with Anthropic's usage report, {result['start']} to {result['end']}, "
        f"{result['bucket']} buckets (UTC)",
        highlight=False,
    )
    if not result["rows"]:
        console.print("No usage reported or recorded in this window.", highlight=False)
        return
    table = Table(box=box.SIMPLE_HEAD)
    for title in (
        "bucket",
        "model",
        "input",
        "cache read",
        "cache write",
        "output",
        "unseen $",
        "dropped est/billed",
        "flags",
    ):
        left = title in ("bucket", "model", "flags")
        table.add_column(title, justify="left" if left else "right", no_wrap=title != "flags")
    for row in result["rows"]:
        dropped = row["dropped_output"]
        real = "?" if dropped["residual_tokens"] is None else f"{dropped['residual_tokens']:,}"
        table.add_row(
            row["bucket_start"][5:16].replace("T", " "),
            row["model"],
            *(_percent(row["coverage"][t]) for t in TOKEN_TYPES),
            _money(row["unseen"]["usd"]),
            f"{dropped['estimated_tokens']:,} / {real}",
            ", ".join(row["flags"]),
        )
    console.print(table)
    coverage = totals["coverage"]
    console.print(
        "Coverage (recorded / reported): "
        + ", ".join(f"{t.replace('_', ' ')} {_percent(coverage[t])}" for t in TOKEN_TYPES),
        highlight=False,
    )
    unseen = totals["unseen"]
    console.print(
        f"Unseen by costwatch: {sum(unseen['tokens'].values()):,} tokens, {_money(unseen['usd'])} "
        "(traffic from processes or tools costwatch does not instrument)",
        highlight=False,
    )
    dropped = totals["dropped_output"]
    if dropped["matched_rows"]:
        console.print(
            f"Dropped attempts' output, where all input was seen: estimated {dropped['estimated_tokens']:,} "
            f"tokens, billed {dropped['residual_tokens']:,}",
            highlight=False,
        )
    if totals["unpriced_rows"]:
        console.print(
            f"[yellow]{totals['unpriced_rows']} row(s) are for models with no price: their unseen $ is "
            "unknown (see `costwatch prices`)[/yellow]",
            highlight=False,
        )
