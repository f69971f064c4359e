"""Reading the store: totals over the rollups, grouped by chosen dimensions, for reports and exporters.

Reports and exporters read only the rollups, whose size grows with hours x label combinations and
not with traffic, so a query never scans the raw attempt rows. Totals over every hour come from the
all-time rollups (a few thousand rows), not from grouping every hourly row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import field, make_dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

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

_MEASURE_TYPES: dict[str, type[int] | type[float]] = {
    name: int if isinstance(ROLLUPS.c[name].type, sa.Integer) else float for name in ROLLUP_MEASURES
}
"""Each rollup measure's Python type, read from its column (counts and tokens are integers)."""


def settled_before(now: datetime, retry_window: timedelta) -> datetime:
    """The first unsettled hour: every rollup hour before it ended at least ``retry_window`` ago.

    An ``abandoned`` attempt of a later hour may still turn ``retried`` when its retry lands; the
    fleet exporter counts such waste only once its hour is settled, and the report shows it as
    pending, both from this one boundary.
    """
    return hour_of(now - retry_window)


_TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")


def _billed_tokens(self: Any) -> int:
    """Billed tokens of every kind."""
    return sum(getattr(self, f"billed_{kind}_tokens") for kind in _TOKEN_KINDS)


def _wasted_tokens(self: Any) -> int:
    """Wasted tokens of every kind."""
    return sum(getattr(self, f"wasted_{kind}_tokens") for kind in _TOKEN_KINDS)


_ROLLUP_TOTALS_DOC = """Sums of every rollup measure for one group (``group``: its dimensions' values).

One attribute per rollup measure, named and typed as its column (``ROLLUP_MEASURES``: integers for
counts and tokens, floats for dollars and seconds), zero unless given; and ``billed_tokens`` and
``wasted_tokens``, of every kind. Dimensions that were absent on the attempts read as ``""``:
``waste_reason == ""`` means not wasted, ``workflow == ""`` untagged, ``error_type == ""`` no error.
"""

if TYPE_CHECKING:

    class RollupTotals:
        # What the type checker sees of the class made below from the rollup tables' columns.
        __dataclass_fields__: ClassVar[dict[str, Any]]
        group: Mapping[str, Any]

        def __init__(self, group: Mapping[str, Any] = ..., **measures: float) -> None: ...
        def __getattr__(self, measure: str) -> Any: ...
        @property
        def billed_tokens(self) -> int: ...
        @property
        def wasted_tokens(self) -> int: ...

else:
    # The measures are the rollup tables' columns: a new column is a new field here, with no list to
    # keep in step (as rows.py names each measure's value and the table orders them).
    RollupTotals = make_dataclass(
        "RollupTotals",
        [
            ("group", Mapping[str, Any], field(default_factory=dict)),
            *((name, kind, field(default=kind())) for name, kind in _MEASURE_TYPES.items()),
        ],
        frozen=True,
        namespace={
            "__doc__": _ROLLUP_TOTALS_DOC,
            "__module__": __name__,
            "billed_tokens": property(_billed_tokens),
            "wasted_tokens": property(_wasted_tokens),
        },
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
        measures: dict[str, Any] = {name: kind(row[name] or 0) for name, kind in _MEASURE_TYPES.items()}
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
