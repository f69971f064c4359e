"""The waste report: totals over the store's hourly rollups, grouped one way, as a table, JSON or CSV.

Building is pure: :func:`build_report` turns :class:`~costwatch.store.RollupTotals` (asked for with
:func:`rollup_group_by`) into a plain dict whose shape is documented in ``docs/report.md``; the
``render_*`` functions turn that dict into text. Reading the store is the caller's business.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .records import Outcome, TokenType, WasteReason
from .store import RollupTotals
from .store.rows import hour_of

__all__ = [
    "CSV_COLUMNS",
    "GROUPINGS",
    "REPORT_FORMATS",
    "TIME_GROUPINGS",
    "build_report",
    "render_csv",
    "render_json",
    "render_table",
    "rollup_group_by",
    "subtract_totals",
]

GROUPINGS: tuple[str, ...] = ("model", "workflow", "outcome", "error_type", "hour", "day")
"""What ``--by`` accepts."""

TIME_GROUPINGS = frozenset({"hour", "day"})
"""Groupings whose groups are listed in time order rather than by waste."""

REPORT_FORMATS: tuple[str, ...] = ("table", "json", "csv")
"""What ``--format`` accepts."""

_TOKEN_KEYS = tuple(token_type.value for token_type in TokenType)
_WASTE_REASONS = tuple(reason.value for reason in WasteReason)
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
    wasted_by_reason: dict[str, dict[str, float]] = field(
        default_factory=lambda: {reason: {"tokens": 0, "cost_usd": 0.0} for reason in _WASTE_REASONS}
    )

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
        reason = self.wasted_by_reason.get(str(row.group.get("waste_reason") or ""))
        if reason is not None:
            reason["tokens"] += sum(int(getattr(row, f"wasted_{key}_tokens")) for key in _TOKEN_KEYS)
            reason["cost_usd"] += row.wasted_cost_usd

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
            "wasted_by_reason": {
                reason: {"tokens": int(sums["tokens"]), "cost_usd": round(sums["cost_usd"], 6)}
                for reason, sums in self.wasted_by_reason.items()
            },
        }


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
) -> dict[str, Any]:
    """The report over ``totals`` (read with ``group_by=rollup_group_by(by)``), grouped ``by`` this.

    ``start`` and ``end`` are the window the totals cover (``None`` for unbounded) and are echoed
    in the report. Groups of ``hour`` and ``day`` come in time order, other groups from the most
    wasted dollars down.
    """
    rollup_group_by(by)
    overall = _Tally()
    groups: dict[str | None, _Tally] = {}
    for row in totals:
        overall.add(row)
        groups.setdefault(_group_key(by, row.group), _Tally()).add(row)
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
    measures = [f.name for f in fields(RollupTotals) if f.name != "group"]
    changed = []
    for row in after:
        old = earlier.get(key(row))
        if old is None:
            changed.append(row)
            continue
        difference = {name: getattr(row, name) - getattr(old, name) for name in measures}
        if any(difference.values()):
            changed.append(replace(row, **difference))
    return changed


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
)


def _flat(entry: Mapping[str, Any]) -> dict[str, Any]:
    flat = {name: entry[name] for name in CSV_COLUMNS if name in entry}
    for key in _TOKEN_KEYS:
        flat[f"billed_{key}_tokens"] = entry["billed_tokens"][key]
        flat[f"wasted_{key}_tokens"] = entry["wasted_tokens"][key]
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
    return key if key is not None else _UNLABELLED.get(by, "(none)")


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
    summary = Text.assemble(
        ("Waste report", "bold"),
        f"  ({window})\n",
        f"{report['attempts']:,} attempts for {report['logical_requests']:,} logical requests: ",
        (f"{report['dropped_attempts']:,} dropped", "yellow"),
        f", {report['failed_attempts']:,} failed in all\n",
        f"billed {_tokens(billed)} tokens, {_usd(report['billed_cost_usd'])}; ",
        (f"wasted {_tokens(wasted)} tokens, {_usd(report['wasted_cost_usd'])}", "bold red"),
        f" ({report['waste_ratio']:.1%} of billed tokens)",
    )
    console.print(summary)
    reasons = report.get("wasted_by_reason") or {}
    if wasted and reasons:
        console.print(
            "wasted by reason: "
            + ", ".join(
                f"{reason} {_tokens(sums['tokens'])} tokens, {_usd(sums['cost_usd'])}"
                for reason, sums in reasons.items()
            ),
            highlight=False,
        )

    table = Table(box=box.SIMPLE_HEAD, show_footer=True, title=f"by {by}", title_justify="left")
    table.add_column(by, footer="total")
    for name, footer, style in (
        ("attempts", f"{report['attempts']:,}", None),
        ("dropped", f"{report['dropped_attempts']:,}", "yellow"),
        ("failed", f"{report['failed_attempts']:,}", None),
        ("billed tokens", _tokens(billed), None),
        ("wasted tokens", _tokens(wasted), "red"),
        ("billed $", _usd(report["billed_cost_usd"]), None),
        ("wasted $", _usd(report["wasted_cost_usd"]), "bold red"),
        ("waste", f"{report['waste_ratio']:.1%}", None),
    ):
        table.add_column(name, footer=footer, justify="right", style=style)
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
            f"{group['waste_ratio']:.1%}",
        )
    console.print(table)

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
