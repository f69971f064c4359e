"""Reading the store: totals over the rollups, grouped by chosen dimensions, for reports and exporters.

Reports and exporters read only the rollups, whose size grows with hours x label combinations and
not with traffic, so a query never scans the raw attempt rows. Totals over every hour come from the
all-time rollups (a few thousand rows), not from grouping every hourly row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from .rows import hour_of
from .schema import ALL_TIME_DIMENSIONS, ALL_TIME_ROLLUPS, ROLLUP_DIMENSIONS, ROLLUP_MEASURES, ROLLUPS

__all__ = [
    "RollupTotals",
    "all_time_with_recent_query",
    "capped_all_time_with_recent_query",
    "kept_labels_query",
    "read_rollup_totals",
    "rollup_totals_query",
    "settled_before",
]

_INTEGER_MEASURES = frozenset(m for m in ROLLUP_MEASURES if not m.endswith("_usd") and m != "duration_s")


def settled_before(now: datetime, retry_window: timedelta) -> datetime:
    """The first unsettled hour: every rollup hour before it ended at least ``retry_window`` ago.

    An ``abandoned`` attempt of a later hour may still turn ``retried`` when its retry lands; the
    fleet exporter counts such waste only once its hour is settled, and the report shows it as
    pending, both from this one boundary.
    """
    return hour_of(now - retry_window)


@dataclass(frozen=True)
class RollupTotals:
    """Sums of every rollup measure for one group (``group`` maps each grouped dimension to its value).

    Dimensions that were absent on the attempts read as ``""``: ``waste_reason == ""`` means not
    wasted, ``workflow == ""`` untagged, ``error_type == ""`` no error.
    """

    group: Mapping[str, Any] = field(default_factory=dict)
    attempts: int = 0
    dropped_attempts: int = 0
    logical_requests_started: int = 0
    billed_input_tokens: int = 0
    billed_output_tokens: int = 0
    billed_cache_read_tokens: int = 0
    billed_cache_write_tokens: int = 0
    wasted_input_tokens: int = 0
    wasted_output_tokens: int = 0
    wasted_cache_read_tokens: int = 0
    wasted_cache_write_tokens: int = 0
    billed_cost_usd: float = 0.0
    wasted_cost_usd: float = 0.0
    estimated_output_tokens: int = 0
    duration_s: float = 0.0
    unpriced_attempts: int = 0
    unpriced_tokens: int = 0
    wasted_input_cost_usd: float = 0.0
    wasted_cache_read_cost_usd: float = 0.0
    wasted_cache_write_cost_usd: float = 0.0
    wasted_output_cost_usd: float = 0.0
    wasted_server_tool_cost_usd: float = 0.0
    reported_output_tokens: int = 0
    counted_output_tokens: int = 0
    reconciled_output_tokens: int = 0
    reported_output_cost_usd: float = 0.0
    estimated_output_cost_usd: float = 0.0
    counted_output_cost_usd: float = 0.0
    reconciled_output_cost_usd: float = 0.0

    @property
    def billed_tokens(self) -> int:
        """Billed tokens of every kind."""
        return (
            self.billed_input_tokens
            + self.billed_output_tokens
            + self.billed_cache_read_tokens
            + self.billed_cache_write_tokens
        )

    @property
    def wasted_tokens(self) -> int:
        """Wasted tokens of every kind."""
        return (
            self.wasted_input_tokens
            + self.wasted_output_tokens
            + self.wasted_cache_read_tokens
            + self.wasted_cache_write_tokens
        )


def _where_in(
    table: sa.Table, where: Mapping[str, str | Sequence[str]] | None
) -> list[sa.ColumnElement[bool]]:
    """``dimension IN (values)`` on ``table`` for each dimension of ``where`` (one value or several)."""
    return [
        table.c[name].in_([wanted] if isinstance(wanted, str) else list(wanted))
        for name, wanted in (where or {}).items()
    ]


def rollup_totals_query(
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    group_by: Sequence[str] = (),
    where: Mapping[str, str | Sequence[str]] | None = None,
) -> sa.Select[Any]:
    """The SELECT behind :func:`read_rollup_totals`; exposed so callers can inspect or extend it.

    Without ``start``, ``end`` or the hour among the dimensions, it reads the all-time rollups,
    which hold the same sums as the hourly rollups over every hour.
    """
    named = [*group_by, *(where or {})]
    unknown = [name for name in named if name not in ROLLUP_DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown rollup dimension(s) {unknown}; choose from {list(ROLLUP_DIMENSIONS)}")
    all_time = start is None and end is None and all(name in ALL_TIME_DIMENSIONS for name in named)
    table = ALL_TIME_ROLLUPS if all_time else ROLLUPS
    dimensions = [table.c[name] for name in group_by]
    sums = [sa.func.sum(table.c[name]).label(name) for name in ROLLUP_MEASURES]
    query = sa.select(*dimensions, *sums).group_by(*dimensions).order_by(*dimensions)
    if start is not None:
        query = query.where(ROLLUPS.c.hour >= start)
    if end is not None:
        query = query.where(ROLLUPS.c.hour < end)
    query = query.where(*_where_in(table, where))
    # Groups whose attempts were all re-attributed elsewhere leave rows of zeros behind.
    return query.having(sa.func.sum(table.c.attempts) != 0)


def read_rollup_totals(
    connection: sa.Connection, query: sa.Select[Any], group_by: Sequence[str]
) -> list[RollupTotals]:
    """Run a :func:`rollup_totals_query` and return one :class:`RollupTotals` per group."""
    totals = []
    for row in connection.execute(query).mappings():
        measures: dict[str, Any] = {
            name: int(row[name] or 0) if name in _INTEGER_MEASURES else float(row[name] or 0.0)
            for name in ROLLUP_MEASURES
        }
        totals.append(RollupTotals(group={name: row[name] for name in group_by}, **measures))
    return totals


def all_time_with_recent_query(
    boundary: datetime,
    *,
    measures: Sequence[str] = ROLLUP_MEASURES,
    recent_where: Mapping[str, str | Sequence[str]] | None = None,
) -> sa.CompoundSelect:
    """Every all-time rollup row, and the hourly rollups from ``boundary`` on, grouped the same way.

    One statement, so one snapshot: the recent part can be subtracted from the all-time part (to
    get the sums over the hours before ``boundary``) without a write landing in between. Each row
    is the dimension values (``ALL_TIME_DIMENSIONS``), then ``recent`` (false for an all-time
    row), ``first_hour`` (the group's earliest hour in its part) and the sums in the order of
    ``measures``. ``recent_where`` keeps only the recent hourly rows whose dimensions have these
    values. All-time rows that sum to zero attempts are kept: their first hour still says when a
    label value first appeared.
    """
    unknown = [name for name in recent_where or {} if name not in ALL_TIME_DIMENSIONS]
    unknown += [name for name in measures if name not in ROLLUP_MEASURES]
    if unknown:
        raise ValueError(f"cannot filter recent rollups by or sum {unknown}")
    all_time = sa.select(
        *(ALL_TIME_ROLLUPS.c[name] for name in ALL_TIME_DIMENSIONS),
        sa.literal(False).label("recent"),
        ALL_TIME_ROLLUPS.c.first_hour,
        *(ALL_TIME_ROLLUPS.c[name] for name in measures),
    )
    dimensions = [ROLLUPS.c[name] for name in ALL_TIME_DIMENSIONS]
    # The hour leads the hourly rollups' primary key: the recent hours are one index range.
    recent = sa.select(
        *dimensions,
        sa.literal(True).label("recent"),
        sa.func.min(ROLLUPS.c.hour).label("first_hour"),
        # Cast back to the column's type: PostgreSQL sums bigints as numeric, and the union would
        # then return every all-time row's counts as decimals too.
        *(sa.cast(sa.func.sum(ROLLUPS.c[name]), ROLLUPS.c[name].type).label(name) for name in measures),
    ).where(ROLLUPS.c.hour >= boundary, *_where_in(ROLLUPS, recent_where))
    return sa.union_all(all_time, recent.group_by(*dimensions))


def kept_labels_query(dimension: str, cap: int) -> sa.Select[Any]:
    """The values of ``dimension`` that keep their name under a cap of ``cap``: the first to appear
    (by the earliest hour of their all-time rows, then by value), ``""`` left out."""
    column = ALL_TIME_ROLLUPS.c[dimension]
    return (
        sa.select(column)
        .where(column != "")
        .group_by(column)
        .order_by(sa.func.min(ALL_TIME_ROLLUPS.c.first_hour), column)
        .limit(cap)
    )


def capped_all_time_with_recent_query(
    boundary: datetime,
    *,
    caps: Mapping[str, int],
    other: str,
    measures: Sequence[str] = ROLLUP_MEASURES,
    recent_where: Mapping[str, str | Sequence[str]] | None = None,
    kept: Mapping[str, Sequence[str]] | None = None,
) -> sa.CompoundSelect:
    """:func:`all_time_with_recent_query` with label cardinality capped in the database.

    For each dimension in ``caps``, the values kept are the first ``caps[dimension]`` to appear (by
    the earliest hour of their all-time rows, then by value; ``""`` is always kept and not counted),
    and every other value reads ``other``; rows are grouped (and summed) by the capped values, so
    the result has at most a few rows per combination of kept values, however many distinct values
    the store holds. First appearance, not size, picks them: a kept value stays kept as traffic
    shifts, so no counter moves between a named series and ``other`` and goes down. One
    statement, so one snapshot.

    ``kept`` gives, for some dimensions, their kept values as :func:`kept_labels_query` found them
    once they were ``caps[dimension]`` many (a full set never changes, so the query need not find
    it again).
    """
    unknown = [name for name in [*caps, *(recent_where or {})] if name not in ALL_TIME_DIMENSIONS]
    unknown += [name for name in measures if name not in ROLLUP_MEASURES]
    if unknown:
        raise ValueError(f"cannot cap, filter recent rollups by or sum {unknown}")

    known = kept or {}
    kept_values: dict[str, Any] = {
        name: list(known[name]) if name in known else kept_labels_query(name, caps[name]) for name in caps
    }

    def labels(table: sa.Table) -> list[sa.ColumnElement[Any]]:
        out: list[sa.ColumnElement[Any]] = []
        for name in ALL_TIME_DIMENSIONS:
            column = table.c[name]
            if name in caps:
                keep = sa.or_(column == "", column.in_(kept_values[name]))
                out.append(sa.case((keep, column), else_=sa.literal(other)).label(name))
            else:
                out.append(column.label(name))
        return out

    def grouped(table: sa.Table, first: sa.ColumnElement[Any], recent: bool, *where: Any) -> sa.Select[Any]:
        # Capped in a subquery, grouped outside it: the capped values are plain columns there.
        inner = sa.select(*labels(table), first.label("first_hour"), *(table.c[m] for m in measures))
        capped = inner.where(*where).subquery()
        dimensions = [capped.c[name] for name in ALL_TIME_DIMENSIONS]
        return sa.select(
            *dimensions,
            sa.literal(recent).label("recent"),
            sa.func.min(capped.c.first_hour).label("first_hour"),
            # Cast back to the column's type: PostgreSQL sums bigints as numeric.
            *(sa.cast(sa.func.sum(capped.c[m]), table.c[m].type).label(m) for m in measures),
        ).group_by(*dimensions)

    all_time = grouped(ALL_TIME_ROLLUPS, ALL_TIME_ROLLUPS.c.first_hour, False)
    recent = grouped(
        ROLLUPS, ROLLUPS.c.hour, True, ROLLUPS.c.hour >= boundary, *_where_in(ROLLUPS, recent_where)
    )
    return sa.union_all(all_time, recent)
