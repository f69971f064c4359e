"""The waste report: totals over the store's hourly rollups, grouped one way, as a table, JSON or CSV.

Building is pure: :func:`build_report` turns :class:`~costwatch.store.RollupTotals` (asked for with
:func:`rollup_group_by`) into a plain dict whose shape is documented in ``docs/report.md``; the
``render_*`` functions turn that dict into text. Reading the store is the caller's business.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .avoidable import RequestAvoidable
from .records import WORKFLOW_LABEL_LENGTH, AttemptRecord, Outcome, OutputSource, TokenType, WasteReason
from .report_options import GROUPINGS, REPORT_FORMATS
from .store import ROLLUP_MEASURES, RollupTotals
from .store.rows import hour_of, rollup_measures

__all__ = [
    "CSV_COLUMNS",
    "GROUPINGS",
    "REPORT_FORMATS",
    "TAG_PREFIX",
    "TIME_GROUPINGS",
    "AttemptFilter",
    "avoidable_waste_section",
    "build_report",
    "render_csv",
    "render_json",
    "render_table",
    "render_top",
    "render_waste_reduction",
    "rollup_group_by",
    "subtract_totals",
    "top_wasteful_requests",
    "totals_from_attempts",
]

TIME_GROUPINGS = frozenset({"hour", "day"})
"""Groupings whose groups are listed in time order rather than by waste."""

_TOKEN_KEYS = tuple(token_type.value for token_type in TokenType)
# Every reason the records know, so a reason added to WasteReason shows up without a change here.
_REASON_KEYS = tuple(reason.value for reason in WasteReason)
_PART_KEYS = ("input", "cache_read", "cache_write", "output", "server_tool")
"""The parts of a wasted bill: re-billed input, cache reads, cache writes, (partial) output and
server-tool fees (web searches)."""
_SOURCE_KEYS = tuple(source.value for source in OutputSource)
"""Where billed output counts came from: reported by the API, estimated, counted or reconciled."""
_UNLABELLED = {"workflow": "(untagged)", "error_type": "(no error)", "model": "(unknown)"}


def rollup_group_by(by: str) -> tuple[str, ...]:
    """The rollup dimensions to read for a report grouped ``by`` this (``outcome`` is always read,
    because the rollups count failed attempts only by outcome, and ``waste_reason``, which splits
    the waste into retried, abandoned and cancelled)."""
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}; choose from {', '.join(GROUPINGS)}")
    column = "hour" if by in TIME_GROUPINGS else by
    return (column, "waste_reason") if column == "outcome" else (column, "outcome", "waste_reason")


@dataclass
class _Tally:
    """Running sums for one group (or the whole report)."""

    attempts: int = 0
    dropped_attempts: int = 0
    failed_attempts: int = 0
    logical_requests: int = 0
    billed_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TOKEN_KEYS, 0))
    wasted_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_TOKEN_KEYS, 0))
    billed_cost_usd: float = 0.0
    wasted_cost_usd: float = 0.0
    estimated_output_tokens: int = 0
    unpriced_attempts: int = 0
    unpriced_tokens: int = 0
    wasted_by_reason: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_REASON_KEYS, 0.0))
    wasted_by_part: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_PART_KEYS, 0.0))
    pending_abandoned_attempts: int = 0
    pending_abandoned_cost_usd: float = 0.0
    output_tokens_by_source: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SOURCE_KEYS, 0))
    output_cost_by_source: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_SOURCE_KEYS, 0.0))

    def add_pending(self, row: RollupTotals) -> None:
        """Count ``abandoned`` attempts of unsettled hours: their retry may still arrive."""
        self.pending_abandoned_attempts += row.attempts
        self.pending_abandoned_cost_usd += row.wasted_cost_usd

    def add(self, row: RollupTotals) -> None:
        self.attempts += row.attempts
        self.dropped_attempts += row.dropped_attempts
        if row.group.get("outcome") != Outcome.COMPLETED.value:
            self.failed_attempts += row.attempts
        self.logical_requests += row.logical_requests_started
        for key in _TOKEN_KEYS:
            self.billed_tokens[key] += int(getattr(row, f"billed_{key}_tokens"))
            self.wasted_tokens[key] += int(getattr(row, f"wasted_{key}_tokens"))
        self.billed_cost_usd += row.billed_cost_usd
        self.wasted_cost_usd += row.wasted_cost_usd
        self.estimated_output_tokens += row.estimated_output_tokens
        self.unpriced_attempts += row.unpriced_attempts
        self.unpriced_tokens += row.unpriced_tokens
        reason = row.group.get("waste_reason")
        if reason and row.wasted_cost_usd:
            self.wasted_by_reason[reason] = self.wasted_by_reason.get(reason, 0.0) + row.wasted_cost_usd
        for part in _PART_KEYS:
            self.wasted_by_part[part] += getattr(row, f"wasted_{part}_cost_usd")
        for source in _SOURCE_KEYS:  # the estimated tokens are the rollups' estimated_output_tokens
            self.output_tokens_by_source[source] += int(getattr(row, f"{source}_output_tokens"))
            self.output_cost_by_source[source] += getattr(row, f"{source}_output_cost_usd")

    def to_dict(self) -> dict[str, Any]:
        billed = sum(self.billed_tokens.values())
        wasted = sum(self.wasted_tokens.values())
        return {
            "attempts": self.attempts,
            "dropped_attempts": self.dropped_attempts,
            "failed_attempts": self.failed_attempts,
            "logical_requests": self.logical_requests,
            "billed_tokens": dict(self.billed_tokens),
            "wasted_tokens": dict(self.wasted_tokens),
            "billed_cost_usd": round(self.billed_cost_usd, 6),
            "wasted_cost_usd": round(self.wasted_cost_usd, 6),
            "waste_ratio": round(wasted / billed, 6) if billed else 0.0,
            "estimated_output_tokens": self.estimated_output_tokens,
            "unpriced_attempts": self.unpriced_attempts,
            "unpriced_tokens": self.unpriced_tokens,
            "wasted_cost_ratio": (
                round(self.wasted_cost_usd / self.billed_cost_usd, 6) if self.billed_cost_usd else 0.0
            ),
            "wasted_cost_usd_by_reason": {k: round(v, 6) for k, v in self.wasted_by_reason.items()},
            "wasted_cost_usd_by_part": {k: round(v, 6) for k, v in self.wasted_by_part.items()},
            "pending_abandoned_attempts": self.pending_abandoned_attempts,
            "pending_abandoned_cost_usd": round(self.pending_abandoned_cost_usd, 6),
            "output_by_source": {
                source: {
                    "tokens": self.output_tokens_by_source[source],
                    "cost_usd": round(self.output_cost_by_source[source], 6),
                }
                for source in _SOURCE_KEYS
            },
        }


TAG_PREFIX = "tag:"
"""``--by tag:KEY`` groups by the value of the tag ``KEY`` (read from the attempt rows)."""


def _group_key(by: str, group: Mapping[str, Any]) -> str | None:
    if by in TIME_GROUPINGS:
        hour = hour_of(group["hour"])  # the store's hours are on the hour already; this reads them as UTC
        return hour.date().isoformat() if by == "day" else hour.isoformat()
    value = group.get(by)
    # The rollups store an absent label as "": say "none" in JSON rather than an empty name.
    return str(value) if value else None


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(timezone.utc).isoformat() if moment is not None else None


def build_report(
    totals: Iterable[RollupTotals],
    by: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    pending: Iterable[RollupTotals] = (),
) -> dict[str, Any]:
    """The report over ``totals`` (read with ``group_by=rollup_group_by(by)``), grouped ``by`` this.

    ``start`` and ``end`` are the window the totals cover (``None`` for unbounded) and are echoed
    in the report. ``pending`` are the ``abandoned`` rollups of the hours not settled yet (see
    :func:`~costwatch.store.query.settled_before`), grouped by the same first dimension: waste that
    may still turn ``retried``. Groups of ``hour`` and ``day`` come in time order, other groups from
    the most wasted dollars down.
    """
    if not by.startswith(TAG_PREFIX):
        rollup_group_by(by)
    overall = _Tally()
    groups: dict[str | None, _Tally] = {}
    for row in totals:
        overall.add(row)
        groups.setdefault(_group_key(by, row.group), _Tally()).add(row)
    for row in pending:
        overall.add_pending(row)
        groups.setdefault(_group_key(by, row.group), _Tally()).add_pending(row)
    listed = [{by: key, **tally.to_dict()} for key, tally in groups.items()]
    if by in TIME_GROUPINGS:
        listed.sort(key=lambda g: g[by])
    else:
        listed.sort(key=lambda g: (-g["wasted_cost_usd"], -g["billed_cost_usd"], g[by] or ""))
    return {"by": by, "start": _iso(start), "end": _iso(end), **overall.to_dict(), "groups": listed}


def subtract_totals(after: Sequence[RollupTotals], before: Sequence[RollupTotals]) -> list[RollupTotals]:
    """What was added to the rollups between two reads with the same grouping: ``after - before``.

    Groups that did not change are left out.
    """

    def key(row: RollupTotals) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((name, str(value)) for name, value in row.group.items()))

    earlier = {key(row): row for row in before}
    changed = []
    for row in after:
        old = earlier.get(key(row))
        if old is None:
            changed.append(row)
            continue
        difference = {name: getattr(row, name) - getattr(old, name) for name in ROLLUP_MEASURES}
        if any(difference.values()):
            changed.append(replace(row, **difference))
    return changed


# -- reports read from the attempt rows (tags, filters, what-if prices) ----------------------------
@dataclass(frozen=True)
class AttemptFilter:
    """Which attempts a report covers: each given dimension must match one of its values."""

    models: tuple[str, ...] = ()
    workflows: tuple[str, ...] = ()
    outcomes: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def needs_attempts(self) -> bool:
        """Whether the rollups cannot apply it (any tag other than ``workflow`` is only on the rows)."""
        return bool(self.tags)

    def rollup_where(self) -> dict[str, tuple[str, ...]]:
        """The filter as rollup dimensions (``where`` of :meth:`SqlStore.rollup_totals`)."""
        where = {"model": self.models, "outcome": self.outcomes}
        where["workflow"] = tuple(w[:WORKFLOW_LABEL_LENGTH] for w in self.workflows)
        return {name: values for name, values in where.items() if values}

    def matches(self, record: AttemptRecord) -> bool:
        """Whether ``record`` is covered."""
        if self.models and record.model_name not in self.models:
            return False
        if self.outcomes and record.outcome.value not in self.outcomes:
            return False
        if self.workflows and record.workflow not in {w[:WORKFLOW_LABEL_LENGTH] for w in self.workflows}:
            return False
        return all(record.tags.get(key) == value for key, value in self.tags.items())

    def to_dict(self) -> dict[str, Any]:
        """The filter as the report's JSON echoes it (only what was asked for)."""
        out: dict[str, Any] = {
            "model": list(self.models),
            "workflow": list(self.workflows),
            "outcome": list(self.outcomes),
            "tag": dict(self.tags),
        }
        return {key: value for key, value in out.items() if value}


def _attempt_group(by: str, record: AttemptRecord) -> Any:
    if by.startswith(TAG_PREFIX):
        return str(record.tags.get(by[len(TAG_PREFIX) :]) or "")
    if by in TIME_GROUPINGS:
        return hour_of(record.started_at)
    if by == "model":
        return record.model_name
    if by == "error_type":
        return record.error_label
    if by == "workflow":
        return record.workflow
    if by == "platform":
        return record.platform
    return record.outcome.value


def totals_from_attempts(
    records: Iterable[AttemptRecord], by: str, *, pending_since: datetime | None = None
) -> tuple[list[RollupTotals], list[RollupTotals]]:
    """Rollup-shaped totals over attempt rows, for :func:`build_report`: ``(totals, pending)``.

    Each attempt counts exactly as the writer counts it into the rollups
    (:func:`~costwatch.store.rows.rollup_measures`); ``by`` may be ``tag:KEY``. ``pending`` holds the
    ``abandoned`` attempts that started at or after ``pending_since`` (the first unsettled hour).
    """
    column = by if by.startswith(TAG_PREFIX) else rollup_group_by(by)[0]
    sums: dict[tuple[Any, str, str], list[float]] = {}
    pending: dict[Any, list[float]] = {}
    for record in records:
        key = (_attempt_group(by, record), record.outcome.value, _reason(record))
        values = rollup_measures(record)
        known = sums.get(key)
        sums[key] = list(values) if known is None else [a + b for a, b in zip(known, values, strict=True)]
        if (
            pending_since is not None
            and key[2] == WasteReason.ABANDONED.value
            and record.started_at >= pending_since
        ):
            known = pending.get(key[0])
            pending[key[0]] = (
                list(values) if known is None else [a + b for a, b in zip(known, values, strict=True)]
            )

    def totals(group: Mapping[str, Any], values: Sequence[float]) -> RollupTotals:
        measures: dict[str, Any] = dict(zip(ROLLUP_MEASURES, values, strict=True))
        return RollupTotals(group=group, **measures)

    return (
        [
            totals({column: value, "outcome": outcome, "waste_reason": reason}, values)
            for (value, outcome, reason), values in sums.items()
        ],
        [totals({column: value}, values) for value, values in pending.items()],
    )


def _reason(record: AttemptRecord) -> str:
    return record.waste_reason.value if (record.wasted and record.waste_reason is not None) else ""


def top_wasteful_requests(
    wasted: Iterable[AttemptRecord], attempts_of: Callable[[list[str]], Sequence[AttemptRecord]], n: int
) -> list[dict[str, Any]]:
    """The ``n`` logical requests whose attempts wasted the most dollars, most first.

    ``wasted`` are the wasted attempts to rank by; ``attempts_of`` returns every attempt of the
    given logical requests (to count them and to find their first and last time).
    """
    by_request: dict[str, float] = {}
    for record in wasted:
        by_request[record.logical_request_id] = by_request.get(record.logical_request_id, 0.0) + (
            record.wasted_cost_usd
        )
    ranked = sorted(by_request.items(), key=lambda item: (-item[1], item[0]))[:n]
    attempts: dict[str, list[AttemptRecord]] = {}
    for record in attempts_of([request for request, _ in ranked]):
        attempts.setdefault(record.logical_request_id, []).append(record)
    out = []
    for request, cost in ranked:
        mine = sorted(attempts.get(request, []), key=lambda r: (r.started_at, r.attempt_number))
        last = mine[-1] if mine else None
        out.append(
            {
                "logical_request_id": request,
                "model": last.model_name if last else None,
                "workflow": (last.workflow or None) if last else None,
                "attempts": len(mine),
                "wasted_attempts": sum(1 for r in mine if r.wasted),
                "wasted_cost_usd": round(cost, 6),
                "first": _iso(mine[0].started_at) if mine else None,
                "last": _iso(last.started_at) if last else None,
            }
        )
    return out


def avoidable_waste_section(
    requests: Iterable[RequestAvoidable], *, wasted_usd: float, refused_retries: int = 0, top: int = 5
) -> dict[str, Any]:
    """The report's keys about reducing waste: avoidable with prompt caching, and refused retries.

    ``requests`` are the retried logical requests of the window (see :mod:`costwatch.avoidable`);
    ``wasted_usd`` is the window's whole waste, which the avoidable dollars are a part of.
    """
    known: list[RequestAvoidable] = []
    unknown: dict[str, int] = {}
    unknown_usd = 0.0
    already_cached = 0
    by_model: dict[str, dict[str, float]] = {}
    by_workflow: dict[str, dict[str, float]] = {}
    for request in requests:
        if request.avoidable_usd is None:
            reason = request.unknown or "unknown"
            unknown[reason] = unknown.get(reason, 0) + request.requests
            unknown_usd += request.wasted_usd
            continue
        if request.already_cached:
            already_cached += request.requests
        known.append(request)
        for groups, key in ((by_model, request.model), (by_workflow, request.workflow)):
            group = groups.setdefault(key, {"avoidable_usd": 0.0, "wasted_usd": 0.0, "requests": 0})
            group["avoidable_usd"] += request.avoidable_usd
            group["wasted_usd"] += request.wasted_usd
            group["requests"] += request.requests

    def listed(groups: dict[str, dict[str, float]], name: str) -> list[dict[str, Any]]:
        rows = [
            {
                name: key or None,
                "avoidable_usd": round(g["avoidable_usd"], 6),
                "wasted_usd": round(g["wasted_usd"], 6),
                "retried_requests": int(g["requests"]),
            }
            for key, g in groups.items()
        ]
        return sorted(rows, key=lambda row: (-row["avoidable_usd"], row[name] or ""))

    gaining = sorted((r for r in known if r.avoidable_usd), key=lambda r: -(r.avoidable_usd or 0.0))[:top]
    return {
        "avoidable_with_prompt_caching": {
            "avoidable_usd": round(sum(r.avoidable_usd or 0.0 for r in known), 6),
            "wasted_usd": round(wasted_usd, 6),
            "retried_requests": sum(r.requests for r in known),
            "already_cached_requests": already_cached,
            "unknown_requests": sum(unknown.values()),
            "unknown_wasted_usd": round(unknown_usd, 6),
            "unknown_reasons": unknown,
            "by_model": listed(by_model, "model"),
            "by_workflow": listed(by_workflow, "workflow"),
            "top_requests": [
                {
                    "logical_request_id": r.logical_request_id,
                    "model": r.model,
                    "workflow": r.workflow or None,
                    "attempts": r.attempts,
                    "wasted_usd": round(r.wasted_usd, 6),
                    "avoidable_usd": round(r.avoidable_usd or 0.0, 6),
                    "prefix_tokens": r.prefix_tokens,
                    "cache_lifetime": r.lifetime,
                }
                for r in gaining
            ],
        },
        "refused_retries": refused_retries,
    }


# -- rendering -----------------------------------------------------------------------------------
def render_json(report: Mapping[str, Any]) -> str:
    """The report as one JSON object."""
    return json.dumps(report, indent=2)


CSV_COLUMNS: tuple[str, ...] = (
    "attempts",
    "dropped_attempts",
    "failed_attempts",
    "logical_requests",
    *(f"billed_{key}_tokens" for key in _TOKEN_KEYS),
    *(f"wasted_{key}_tokens" for key in _TOKEN_KEYS),
    "billed_cost_usd",
    "wasted_cost_usd",
    "waste_ratio",
    "estimated_output_tokens",
    "unpriced_attempts",
    "unpriced_tokens",
    "wasted_cost_ratio",
    *(f"wasted_{reason}_cost_usd" for reason in _REASON_KEYS),
    *(f"wasted_{part}_cost_usd" for part in _PART_KEYS),
    "pending_abandoned_attempts",
    "pending_abandoned_cost_usd",
    *(f"{source}_output_{measure}" for source in _SOURCE_KEYS for measure in ("tokens", "cost_usd")),
)


def _flat(entry: Mapping[str, Any]) -> dict[str, Any]:
    flat = {name: entry[name] for name in CSV_COLUMNS if name in entry}
    for key in _TOKEN_KEYS:
        flat[f"billed_{key}_tokens"] = entry["billed_tokens"][key]
        flat[f"wasted_{key}_tokens"] = entry["wasted_tokens"][key]
    for reason in _REASON_KEYS:
        flat[f"wasted_{reason}_cost_usd"] = entry["wasted_cost_usd_by_reason"].get(reason, 0.0)
    for part in _PART_KEYS:
        flat[f"wasted_{part}_cost_usd"] = entry["wasted_cost_usd_by_part"][part]
    for source, figures in entry["output_by_source"].items():
        flat[f"{source}_output_tokens"] = figures["tokens"]
        flat[f"{source}_output_cost_usd"] = figures["cost_usd"]
    return flat


def render_csv(report: Mapping[str, Any]) -> str:
    """The report's groups as CSV: a header, then one row per group (the totals are the column sums)."""
    by = report["by"]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[by, *CSV_COLUMNS], lineterminator="\n")
    writer.writeheader()
    for group in report["groups"]:
        writer.writerow({by: group[by] if group[by] is not None else "", **_flat(group)})
    return out.getvalue()


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:,.4f}"


def _tokens(value: int) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:,.2f}M"
    if value >= 10_000:
        return f"{value / 1_000:,.1f}k"
    return f"{value:,}"


def _attempts(count: int, kind: str) -> str:
    return f"{count:,} {kind} attempt{'' if count == 1 else 's'}"


def _label(by: str, key: str | None) -> str:
    if key is not None:
        return key
    return "(untagged)" if by.startswith(TAG_PREFIX) else _UNLABELLED.get(by, "(none)")


_REASON_WORDS = {
    "retried": "paid again by a retry",
    "abandoned": "the request was given up",
    "cancelled": "the application stopped reading",
}
_PART_WORDS = {
    "input": "re-billed input",
    "cache_read": "cache reads",
    "cache_write": "cache writes",
    "output": "partial output",
    "server_tool": "server-tool fees",
}


_SOURCE_WORDS = {
    "reported": "reported by the API",
    "estimated": "estimated from cut streams",
    "counted": "counted by the API from cut streams",
    "reconciled": "corrected by reconciliation",
}


def _output_line(report: Mapping[str, Any]) -> str | None:
    """Where the billed output's figures came from, when any did not come from the API's own report."""
    sources = report["output_by_source"]
    if not any(figures["tokens"] for source, figures in sources.items() if source != "reported"):
        return None
    parts = [
        f"{_tokens(figures['tokens'])} ({_usd(figures['cost_usd'])}) {_SOURCE_WORDS.get(source, source)}"
        for source, figures in sources.items()
        if figures["tokens"]
    ]
    return f"output tokens: {', '.join(parts)}"


def _calls(count: int) -> str:
    return f"{count:,} call{'' if count == 1 else 's'}"


def _why_lines(report: Mapping[str, Any]) -> list[str]:
    """Where the wasted dollars went, by reason and by part, in words; empty when nothing was wasted."""
    if not report["wasted_cost_usd"]:
        return []
    reasons = [
        f"{_usd(value)} {reason} ({_REASON_WORDS.get(reason, reason)})"
        for reason, value in report["wasted_cost_usd_by_reason"].items()
        if value
    ]
    parts = [
        f"{_usd(value)} {_PART_WORDS[part]}"
        for part, value in report["wasted_cost_usd_by_part"].items()
        if value
    ]
    lines = [f"why: {', '.join(reasons)}"] if reasons else []
    if parts:
        lines.append(f"what: {', '.join(parts)}")
    return lines


def render_table(report: Mapping[str, Any], console: Console, *, window: str | None = None) -> None:
    """Print the report for a person: the totals, a table of the groups and the top offenders.

    ``window`` names the period covered; by default it is read from the report's ``start`` and ``end``.
    """
    by = report["by"]
    if window is None:
        window = f"{report['start'] or 'the beginning'} to {report['end'] or 'now'}, whole UTC hours"
    if not report["attempts"]:
        console.print(f"No attempts recorded ({window}).", highlight=False)
        return
    billed, wasted = sum(report["billed_tokens"].values()), sum(report["wasted_tokens"].values())
    failed, dropped = report["failed_attempts"], report["dropped_attempts"]
    # Said for a reader who pays the bill: calls, not attempts; what failed and that it was billed.
    cut = "all cut off mid-answer" if dropped == failed else f"{dropped:,} of them cut off mid-answer"
    outcome = f"{_calls(failed)} failed ({cut}) and were billed anyway\n" if failed else "none failed\n"
    summary = Text.assemble(
        ("Waste report", "bold"),
        f"  ({window})\n",
        f"{report['logical_requests']:,} requests took {_calls(report['attempts'])} to the API: ",
        (outcome, "yellow") if failed else outcome,
        f"billed {_tokens(billed)} tokens, {_usd(report['billed_cost_usd'])}; ",
        (f"wasted {_tokens(wasted)} tokens, {_usd(report['wasted_cost_usd'])}", "bold red"),
        f"\nwasted share: {report['waste_ratio']:.1%} of billed tokens, "
        f"{report['wasted_cost_ratio']:.1%} of billed dollars",
    )
    if report["unpriced_attempts"]:
        console.print(
            f"[bold yellow]warning:[/bold yellow] {_attempts(report['unpriced_attempts'], 'unpriced')} "
            f"({_tokens(report['unpriced_tokens'])} tokens) on models without a known price are left out "
            "of every dollar figure below; add their prices (docs/pricing.md) and run `costwatch reprice`",
            highlight=False,
        )
    console.print(summary)
    for line in _why_lines(report):
        console.print(line, highlight=False)
    output_line = _output_line(report)
    if output_line is not None:
        console.print(output_line, highlight=False)
    if report["pending_abandoned_attempts"]:
        console.print(
            f"pending: {_usd(report['pending_abandoned_cost_usd'])} of it ("
            f"{_calls(report['pending_abandoned_attempts'])} given up within the last hour or so) may still "
            "turn out retried; metrics count it once its hour settles",
            style="yellow",
            highlight=False,
        )
    if report["unpriced_attempts"]:
        console.print(
            f"unpriced: {report['unpriced_attempts']:,} attempts, "
            f"{_tokens(report['unpriced_tokens'])} tokens (no price known: not in billed or wasted $)",
            style="yellow",
            highlight=False,
        )

    reasons = [r for r, value in report["wasted_cost_usd_by_reason"].items() if value]
    # Tight padding: with a column per waste reason the table must still fit 120 characters.
    table = Table(
        box=box.SIMPLE_HEAD,
        show_footer=True,
        title=f"by {by}",
        title_justify="left",
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    table.add_column(by, footer="total", no_wrap=True)
    for name, footer, style in (
        ("attempts", f"{report['attempts']:,}", None),
        ("dropped", f"{report['dropped_attempts']:,}", "yellow"),
        ("failed", f"{report['failed_attempts']:,}", None),
        ("billed\ntokens", _tokens(billed), None),
        ("wasted\ntokens", _tokens(wasted), "red"),
        ("billed $", _usd(report["billed_cost_usd"]), None),
        ("wasted $", _usd(report["wasted_cost_usd"]), "bold red"),
        *((f"{reason}\n$", _usd(report["wasted_cost_usd_by_reason"][reason]), None) for reason in reasons),
        ("token\nshare", f"{report['waste_ratio']:.1%}", None),
        ("$\nshare", f"{report['wasted_cost_ratio']:.1%}", None),
    ):
        table.add_column(name, footer=footer, justify="right", style=style, no_wrap=True)
    for group in report["groups"]:
        table.add_row(
            _label(by, group[by]),
            f"{group['attempts']:,}",
            f"{group['dropped_attempts']:,}",
            f"{group['failed_attempts']:,}",
            _tokens(sum(group["billed_tokens"].values())),
            _tokens(sum(group["wasted_tokens"].values())),
            _usd(group["billed_cost_usd"]),
            _usd(group["wasted_cost_usd"]),
            *(_usd(group["wasted_cost_usd_by_reason"].get(reason, 0.0)) for reason in reasons),
            f"{group['waste_ratio']:.1%}",
            f"{group['wasted_cost_ratio']:.1%}",
        )
    console.print(table)
    console.print(
        "token share: wasted / billed tokens; $ share: wasted / billed dollars (cache reads are cheap "
        "tokens, so the two differ)",
        style="dim",
        highlight=False,
    )

    offenders = sorted(
        (g for g in report["groups"] if g["wasted_cost_usd"] > 0), key=lambda g: -g["wasted_cost_usd"]
    )[:3]
    if offenders:
        console.print("[bold]Top offenders[/bold] (wasted dollars):")
        for group in offenders:
            share = group["wasted_cost_usd"] / report["wasted_cost_usd"] if report["wasted_cost_usd"] else 0.0
            console.print(
                f"  {_label(by, group[by])}: {_usd(group['wasted_cost_usd'])} wasted "
                f"({share:.0%} of all waste) over {_attempts(group['failed_attempts'], 'failed')}",
                highlight=False,
            )


def render_top(top: Sequence[Mapping[str, Any]], console: Console) -> None:
    """Print the logical requests that wasted the most (``report["top"]``)."""
    if not top:
        console.print("No logical request wasted anything in this window.", highlight=False)
        return
    table = Table(
        box=box.SIMPLE_HEAD,
        title="Most wasteful logical requests",
        title_justify="left",
        pad_edge=False,
        collapse_padding=True,
    )
    # The id is what `costwatch explain` needs: never cut it; shorten the model and workflow instead.
    table.add_column("logical request", no_wrap=True, min_width=32)
    for name in ("model", "workflow"):
        table.add_column(name, overflow="ellipsis", no_wrap=True)
    for name in ("attempts", "wasted $"):
        table.add_column(name, justify="right", no_wrap=True)
    for name in ("first (UTC)", "last (UTC)"):
        table.add_column(name, no_wrap=True)
    for entry in top:
        table.add_row(
            entry["logical_request_id"],
            entry["model"] or "",
            entry["workflow"] or "(untagged)",
            f"{entry['attempts']:,}",
            _usd(entry["wasted_cost_usd"]),
            (entry["first"] or "")[5:16].replace("T", " "),
            (entry["last"] or "")[5:16].replace("T", " "),
        )
    console.print(table)
    console.print("`costwatch explain LOGICAL_REQUEST_ID` shows one of them attempt by attempt.", style="dim")


_UNKNOWN_REASONS = {
    "prefix_not_measured": "no retry's prompt was measured (stored before costwatch measured, or not JSON)",
    "unpriced": "the model has no price",
}


def render_waste_reduction(report: Mapping[str, Any], console: Console) -> None:
    """Print what prompt caching would have saved and how many retries the waste budget refused."""
    section = report.get("avoidable_with_prompt_caching")
    if section is None:
        return
    line = Text.assemble(
        ("Avoidable with prompt caching: ", "bold"),
        (_usd(section["avoidable_usd"]), "bold green"),
        f" of {_usd(section['wasted_usd'])} wasted",
        f" ({section['retried_requests']:,} retried logical requests priced",
    )
    if section["already_cached_requests"]:
        line.append(f"; {section['already_cached_requests']:,} of them already use prompt caching")
    line.append(")")
    console.print(line)
    if section["unknown_requests"]:
        reasons = "; ".join(
            f"{count:,}: {_UNKNOWN_REASONS.get(reason, reason)}"
            for reason, count in section["unknown_reasons"].items()
        )
        console.print(
            f"  not known for {section['unknown_requests']:,} retried requests "
            f"({_usd(section['unknown_wasted_usd'])} wasted): {reasons}",
            highlight=False,
        )
    for name, label in (("by_model", "model"), ("by_workflow", "workflow")):
        rows = [row for row in section[name] if row["avoidable_usd"] > 0][:5]
        if rows:
            parts = ", ".join(
                f"{_label(label, row[label])} {_usd(row['avoidable_usd'])} of {_usd(row['wasted_usd'])}"
                for row in rows
            )
            console.print(f"  by {label}: {parts}", highlight=False)
    if section["top_requests"]:
        console.print("  logical requests that would gain most:", highlight=False)
        for row in section["top_requests"]:
            console.print(
                f"    {row['logical_request_id']} ({row['model']}, {_label('workflow', row['workflow'])}): "
                f"{_usd(row['avoidable_usd'])} of {_usd(row['wasted_usd'])} wasted over "
                f"{row['attempts']} attempts, prefix ~{_tokens(row['prefix_tokens'])} tokens, "
                f"{row['cache_lifetime']} cache",
                highlight=False,
            )
    if report.get("refused_retries"):
        console.print(f"Retries refused by the waste budget: {report['refused_retries']:,}", highlight=False)
