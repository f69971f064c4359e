"""Reconciliation: Anthropic's own usage figures beside what costwatch recorded, per time bucket and model.

Pure: :func:`reconcile` takes the reported rows (:mod:`costwatch.usage_api`) and the recorded
attempts and returns a plain dict whose shape is documented, key by key, in ``docs/reconcile.md``
(``costwatch reconcile --format json`` is a stable contract: it only gains keys), with the new
revisions of the attempts the bill corrected. The ``render_*`` functions turn the dict into text.

Three questions per bucket and model: how much of the billed traffic costwatch saw (coverage per
token type), what it never saw (``unseen`` tokens and dollars: an uninstrumented process, another
tool), and, where it saw all the traffic, what the dropped attempts really generated (the
``residual`` output: the reported output less the output the API reported to costwatch for the
attempts that completed). That residual then replaces the dropped attempts' estimates: it is
shared among them in proportion to their estimates, and each becomes a revision with output source
``reconciled`` (``correction`` in the dict says what moved, and why a row was left alone).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from .platforms import ANTHROPIC as FIRST_PARTY
from .pricing import PriceTable
from .records import AttemptRecord, Outcome, OutputSource, Usage
from .usage_api import ANALYTICS_BETA, BUCKET_WIDTHS, COST_PATH, USAGE_PATH, ReportedCost, ReportedUsage

__all__ = [
    "CORRECTION_STATUSES",
    "CSV_COLUMNS",
    "DEFAULT_TOLERANCE",
    "LEFT_ALONE_REASONS",
    "RECONCILE_FORMATS",
    "TOKEN_TYPES",
    "Reconciled",
    "apportion",
    "billed_revision",
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
    output_reconciled: int = 0
    dropped_estimate: int = 0
    """What costwatch estimated for the attempts whose output is (or was) an estimate."""
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
        for name in (
            "input",
            "cache_read",
            "cache_write_5m",
            "cache_write_1h",
            "output",
            "output_reported",
            "output_estimated",
            "output_reconciled",
            "dropped_estimate",
            "requests",
            "dropped",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.cost_usd = (
            None if self.cost_usd is None or other.cost_usd is None else self.cost_usd + other.cost_usd
        )
        self.seen = self.seen or other.seen


def _recorded_side(records: Iterable[AttemptRecord]) -> _Side:
    side = _Side()
    for record in records:
        usage = record.usage
        source = record.output_source
        side.input += usage.input_tokens
        side.cache_read += usage.cache_read_tokens
        side.cache_write_5m += usage.cache_write_5m_tokens
        side.cache_write_1h += usage.cache_write_1h_tokens
        side.output += usage.output_tokens
        if source is OutputSource.RECONCILED:
            side.output_reconciled += usage.output_tokens
        else:
            estimated = usage.estimated_output_tokens if source is OutputSource.ESTIMATED else 0
            side.output_estimated += estimated
            side.output_reported += usage.output_tokens - estimated
        if source in _CORRECTABLE:
            # A reconciled attempt keeps the estimate the bill replaced (records.Usage).
            side.dropped_estimate += usage.estimated_output_tokens
        side.requests += 1
        side.dropped += 1 if record.outcome is Outcome.DROPPED else 0
        cost = record.cost
        side.cost_usd = None if cost is None or side.cost_usd is None else side.cost_usd + cost.total_usd
    return side


@dataclass
class _Pair:
    reported: _Side = field(default_factory=_Side)
    recorded: _Side = field(default_factory=_Side)


def _ratio(recorded: int, reported: int) -> float | None:
    return round(recorded / reported, 6) if reported else None


def _matches(recorded: int, reported: int, tolerance: float) -> bool:
    return abs(recorded - reported) <= tolerance * reported if reported else recorded == 0


def _input_matched(pair: _Pair, tolerance: float) -> bool:
    reported, recorded = pair.reported, pair.recorded
    return reported.seen and all(
        _matches(recorded.tokens(t), reported.tokens(t), tolerance) for t in _INPUT_TYPES
    )


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
        "output_reconciled_tokens": recorded.output_reconciled,
        "attempts": recorded.requests,
        "dropped_attempts": recorded.dropped,
        "cost_usd": cost_usd,
    }


def _row(pair: _Pair, prices: PriceTable, model: str, tolerance: float) -> dict[str, Any]:
    reported, recorded = pair.reported, pair.recorded
    input_matched = _input_matched(pair, tolerance)
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
    if _over_recorded(pair, tolerance):
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
            "estimated_tokens": recorded.dropped_estimate,
            "residual_tokens": residual,
        },
    }


def _over_recorded(pair: _Pair, tolerance: float) -> bool:
    reported, recorded = pair.reported, pair.recorded
    return any(recorded.tokens(t) > reported.tokens(t) * (1 + tolerance) for t in _INPUT_TYPES) or (
        recorded.output_reported > reported.output
    )


def _usd(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


# -- estimates corrected by the bill ---------------------------------------------------------------
_CORRECTABLE = (OutputSource.ESTIMATED, OutputSource.RECONCILED)
"""The output sources the bill may set: estimates, and earlier corrections (the API's data may have
grown since). Reported and counted outputs are exact and never moved."""

CORRECTION_STATUSES = ("corrected", "settled", "left_alone", "none")
"""A row's ``correction.status``: this run wrote the bill's figures; they already stood; the row's
estimates were left as they are (``correction.reason`` says why); nothing to correct."""

LEFT_ALONE_REASONS = ("not_reported", "input_not_matched", "unseen_requests", "over_recorded", "no_estimates")
"""Why a row's estimates were left alone (``correction.reason``); see docs/reconcile.md."""


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split into whole parts in proportion to ``weights``; the parts sum to ``total`` exactly.

    Largest remainder: every part gets the whole part of its exact share (integer arithmetic, no
    rounding error), and what is left goes one by one to the largest remainders, ties to the earlier
    weight. Negative weights count as zero; all-zero weights share equally.
    """
    if total < 0:
        raise ValueError(f"cannot apportion a negative total ({total})")
    if not weights:
        if total:
            raise ValueError(f"cannot apportion {total} over no weights")
        return []
    clipped = [max(0, weight) for weight in weights]
    whole = sum(clipped)
    if whole == 0:
        clipped, whole = [1] * len(clipped), len(clipped)
    parts: list[int] = []
    remainders: list[tuple[int, int]] = []
    for position, weight in enumerate(clipped):
        part, remainder = divmod(total * weight, whole)
        parts.append(part)
        remainders.append((-remainder, position))
    for _, position in sorted(remainders)[: total - sum(parts)]:
        parts[position] += 1
    return parts


def billed_revision(record: AttemptRecord, output_tokens: int, prices: PriceTable) -> AttemptRecord | None:
    """``record`` with the output the bill gave it, as its next revision (source ``reconciled``, priced
    with ``prices``); ``None`` when it already says so. The estimate it replaces is kept."""
    usage = record.usage
    corrected = dataclasses.replace(
        usage,
        output_tokens=output_tokens,
        output_estimated=False,
        output_source=OutputSource.RECONCILED,
    )
    if corrected == usage:
        return None
    revised = dataclasses.replace(record, usage=corrected, revision=record.revision + 1)
    return dataclasses.replace(revised, cost=prices.cost_of(revised))


def _wasted_at(record: AttemptRecord, output_tokens: int, prices: PriceTable) -> float | None:
    """The attempt's wasted dollars with ``output_tokens`` of output, at ``prices``."""
    if not record.wasted:
        return 0.0
    usage = dataclasses.replace(record.usage, output_tokens=output_tokens)
    cost = prices.cost_of(dataclasses.replace(record, usage=usage))
    return None if cost is None else cost.total_usd


def _sum_usd(values: Iterable[float | None]) -> float | None:
    total = 0.0
    for value in values:
        if value is None:
            return None
        total += value
    return round(total, 6)


@dataclass
class _Correction:
    """What the bill did to one row's estimated attempts."""

    status: str = "none"
    reason: str | None = None
    targets: list[AttemptRecord] = field(default_factory=list)
    """The row's attempts whose output is an estimate or the bill's, as they stand after the run."""
    revisions: list[AttemptRecord] = field(default_factory=list)
    output_moved: int = 0
    wasted_moved: float | None = 0.0

    def as_json(self, prices: PriceTable) -> dict[str, Any]:
        reconciled = all(r.output_source is OutputSource.RECONCILED for r in self.targets)
        at_bill = (
            _sum_usd(_wasted_at(r, r.usage.output_tokens, prices) for r in self.targets)
            if self.targets and reconciled
            else None
        )
        at_estimate = (
            _sum_usd(_wasted_at(r, r.usage.estimated_output_tokens, prices) for r in self.targets)
            if at_bill is not None
            else None
        )
        return {
            "status": self.status,
            "reason": self.reason,
            "attempts": len(self.targets) if self.status in ("corrected", "settled") else 0,
            "revised_attempts": len(self.revisions),
            "output_tokens_moved": self.output_moved,
            "wasted_usd_moved": _usd(self.wasted_moved),
            "wasted_usd_at_estimate": at_estimate,
            "wasted_usd_at_bill": at_bill,
        }


def _left_alone_because(pair: _Pair, tolerance: float) -> str | None:
    reported, recorded = pair.reported, pair.recorded
    if not reported.seen:
        return "not_reported"
    if not _input_matched(pair, tolerance):
        return "input_not_matched"
    # A request costwatch never saw may hide in the input tolerance, but not in the request count
    # (when the API gives one): its output would be taken for the dropped attempts'. Every recorded
    # attempt counts, errors too: whether the API counts a refused request is not documented.
    if reported.requests and reported.requests > recorded.requests:
        return "unseen_requests"
    if _over_recorded(pair, tolerance):
        return "over_recorded"
    return None


def _correct(
    pair: _Pair, records: list[AttemptRecord], prices: PriceTable, tolerance: float
) -> tuple[_Correction, list[AttemptRecord]]:
    """The correction of one row, and its records as they stand after it."""
    targets = sorted((r for r in records if r.output_source in _CORRECTABLE), key=lambda r: r.attempt_id)
    correction = _Correction(targets=targets)
    reason = _left_alone_because(pair, tolerance)
    residual = pair.reported.output - pair.recorded.output_reported
    if reason is None and not targets:
        if residual > 0:
            correction.status, correction.reason = "left_alone", "no_estimates"
        return correction, records
    if reason is not None:
        if targets:
            correction.status, correction.reason = "left_alone", reason
        return correction, records
    # Weighted by what costwatch estimated (a reconciled attempt kept its estimate), so re-reading
    # the same bill gives every attempt the same share again: nothing is written the second time.
    shares = apportion(residual, [r.usage.estimated_output_tokens for r in targets])
    revised: dict[str, AttemptRecord] = {}
    for record, share in zip(targets, shares, strict=True):
        revision = billed_revision(record, share, prices)
        if revision is None:
            continue
        revised[record.attempt_id] = revision
        correction.output_moved += revision.usage.output_tokens - record.usage.output_tokens
        if correction.wasted_moved is not None:
            if revision.wasted and (revision.cost is None or record.cost is None):
                correction.wasted_moved = None
            else:
                correction.wasted_moved += revision.wasted_cost_usd - record.wasted_cost_usd
    correction.revisions = list(revised.values())
    correction.targets = [revised.get(r.attempt_id, r) for r in targets]
    correction.status = "corrected" if revised else "settled"
    return correction, [revised.get(r.attempt_id, r) for r in records]


@dataclass(frozen=True)
class Reconciled:
    """A reconciliation (:func:`reconcile`): its documented dict, and the new revisions of the
    estimated attempts the bill corrected, which the store must take for the dict to be true."""

    result: dict[str, Any]
    revisions: list[AttemptRecord]


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
) -> Reconciled:
    """The reconciliation of ``[start, end)`` in ``bucket`` buckets: one row per bucket and model that
    either side has, and the totals (see ``docs/reconcile.md`` for every key), with the dropped
    attempts' estimates replaced by the bill where a row's figures match it.

    Models are matched by the price table's id (a dated id and its alias are one model); a row is
    named as costwatch recorded the model (so it meets the rollups' labels), else as the API names
    it. Only first-party attempts count: the usage report does not bill Bedrock, Vertex or Foundry
    traffic.
    """
    width = BUCKET_WIDTHS[bucket]
    pairs: dict[tuple[datetime, str], _Pair] = {}
    names: dict[tuple[datetime, str], str] = {}
    for figures in reported:
        key = (figures.bucket_start, prices.canonical(figures.model))
        names.setdefault(key, figures.model)
        side = pairs.setdefault(key, _Pair()).reported
        side.seen = True
        side.input += figures.uncached_input_tokens
        side.cache_read += figures.cache_read_tokens
        side.cache_write_5m += figures.cache_write_5m_tokens
        side.cache_write_1h += figures.cache_write_1h_tokens
        side.output += figures.output_tokens
        side.requests += figures.requests or 0
    for charged in costs:
        key = (charged.bucket_start, prices.canonical(charged.model))
        names.setdefault(key, charged.model)
        side = pairs.setdefault(key, _Pair()).reported
        side.cost_usd = (side.cost_usd or 0.0) + charged.usd
    grouped: dict[tuple[datetime, str], list[AttemptRecord]] = {}
    recorded_names: dict[tuple[datetime, str], str] = {}
    for record in recorded:
        if record.platform != FIRST_PARTY or not start <= record.started_at < end:
            continue
        key = (_floor(record.started_at, width), prices.canonical(record.model_name))
        names[key] = min(record.model_name, recorded_names.get(key, record.model_name))
        recorded_names[key] = names[key]
        pairs.setdefault(key, _Pair())
        grouped.setdefault(key, []).append(record)
    rows = []
    revisions: list[AttemptRecord] = []
    total = _Pair()
    for key, pair in sorted(pairs.items()):
        bucket_start = key[0]
        pair.recorded = _recorded_side(grouped.get(key, ()))
        correction, after = _correct(pair, grouped.get(key, []), prices, tolerance)
        revisions.extend(correction.revisions)
        pair.recorded = _recorded_side(after)
        row = _row(pair, prices, names[key], tolerance)
        rows.append(
            {
                "bucket_start": _iso(bucket_start),
                "bucket_end": _iso(bucket_start + width),
                "model": names[key],
                **row,
                "correction": correction.as_json(prices),
            }
        )
        total.reported.add(pair.reported)
        total.recorded.add(pair.recorded)
    totals = _totals(rows, total)
    result = {
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
    return Reconciled(result, revisions)


def _totals(rows: list[dict[str, Any]], total: _Pair) -> dict[str, Any]:
    reported, recorded = total.reported, total.recorded
    unseen = {t: sum(row["unseen"]["tokens"][t] for row in rows) for t in TOKEN_TYPES}
    unseen_usd = sum(row["unseen"]["usd"] or 0.0 for row in rows)
    matched = [row for row in rows if row["dropped_output"]["input_matched"]]
    corrections = [row["correction"] for row in rows]
    billed = [c for c in corrections if c["wasted_usd_at_bill"] is not None]
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
        "correction": {
            **{
                f"{status}_rows": sum(1 for c in corrections if c["status"] == status)
                for status in CORRECTION_STATUSES[:3]
            },
            "attempts": sum(c["attempts"] for c in corrections),
            "revised_attempts": sum(c["revised_attempts"] for c in corrections),
            "output_tokens_moved": sum(c["output_tokens_moved"] for c in corrections),
            "wasted_usd_moved": _usd(sum(c["wasted_usd_moved"] or 0.0 for c in corrections)),
            "wasted_usd_at_estimate": _usd(sum(c["wasted_usd_at_estimate"] for c in billed)),
            "wasted_usd_at_bill": _usd(sum(c["wasted_usd_at_bill"] for c in billed)),
        },
    }


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_json(result: Mapping[str, Any]) -> str:
    """The reconciliation as indented JSON (the documented contract)."""
    return json.dumps(result, indent=2)


_CORRECTION_KEYS = (
    "status",
    "reason",
    "attempts",
    "revised_attempts",
    "output_tokens_moved",
    "wasted_usd_moved",
    "wasted_usd_at_estimate",
    "wasted_usd_at_bill",
)

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
    "recorded_output_reconciled_tokens",
    *(f"correction_{key}" for key in _CORRECTION_KEYS),
)
"""The CSV's columns: one line per row of the JSON, flattened (new columns only ever go last)."""


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
            "recorded_output_reconciled_tokens": row["recorded"]["output_reconciled_tokens"],
        }
        for key in _CORRECTION_KEYS:
            line[f"correction_{key}"] = row["correction"][key]
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


def _signed_money(value: float) -> str:
    return ("-" if value < 0 else "+") + _money(abs(value))


def _row_notes(row: Mapping[str, Any]) -> list[str]:
    correction = row["correction"]
    notes = list(row["flags"])
    if correction["status"] == "left_alone":
        notes.append(f"estimates kept: {correction['reason'].replace('_', ' ')}")
    return notes


def _print_correction(totals: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], console: Console) -> None:
    if totals["attempts"]:
        buckets = totals["corrected_rows"] + totals["settled_rows"]
        console.print(
            f"Estimates corrected by the bill: {totals['attempts']:,} dropped attempt(s) in {buckets} "
            f"bucket(s) carry the output Anthropic billed; their waste is "
            f"{_money(totals['wasted_usd_at_bill'])} at the bill, {_money(totals['wasted_usd_at_estimate'])} "
            "as estimated. "
            + (
                f"This run wrote {totals['revised_attempts']:,} revision(s) and moved the waste figure "
                f"by {_signed_money(totals['wasted_usd_moved'])} "
                f"({totals['output_tokens_moved']:+,} output tokens)."
                if totals["revised_attempts"]
                else "They already stood: this run changed nothing."
            ),
            highlight=False,
        )
    if totals["left_alone_rows"]:
        reasons = sorted(
            {row["correction"]["reason"] for row in rows if row["correction"]["status"] == "left_alone"}
        )
        console.print(
            f"{totals['left_alone_rows']} bucket(s) with estimated attempts were left alone "
            f"({', '.join(r.replace('_', ' ') for r in reasons)}): their figures do not match the bill "
            "closely enough to tell the dropped attempts' output apart.",
            highlight=False,
        )


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
            ", ".join(_row_notes(row)),
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
    _print_correction(totals["correction"], result["rows"], console)
    if totals["unpriced_rows"]:
        console.print(
            f"[yellow]{totals['unpriced_rows']} row(s) are for models with no price: their unseen $ is "
            "unknown (see `costwatch prices`)[/yellow]",
            highlight=False,
        )
