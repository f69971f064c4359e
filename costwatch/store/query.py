"""Reading the store: totals over the hourly rollups, grouped by chosen dimensions, for reports.

Reports and exporters read only the rollups, whose size grows with hours x label combinations and
not with traffic, so a query never scans the raw attempt rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from .schema import ROLLUP_DIMENSIONS, ROLLUP_MEASURES, ROLLUPS

__all__ = ["RollupTotals", "read_rollup_totals", "rollup_totals_query"]

_INTEGER_MEASURES = frozenset(
    m for m in ROLLUP_MEASURES if m not in ("billed_cost_usd", "wasted_cost_usd", "duration_s")
)


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


def rollup_totals_query(
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    group_by: Sequence[str] = (),
    where: Mapping[str, str | Sequence[str]] | None = None,
) -> sa.Select[Any]:
    """The SELECT behind :func:`read_rollup_totals`; exposed so callers can inspect or extend it."""
    unknown = [name for name in [*group_by, *(where or {})] if name not in ROLLUP_DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown rollup dimension(s) {unknown}; choose from {list(ROLLUP_DIMENSIONS)}")
    dimensions = [ROLLUPS.c[name] for name in group_by]
    sums = [sa.func.sum(ROLLUPS.c[name]).label(name) for name in ROLLUP_MEASURES]
    query = sa.select(*dimensions, *sums).group_by(*dimensions).order_by(*dimensions)
    if start is not None:
        query = query.where(ROLLUPS.c.hour >= start)
    if end is not None:
        query = query.where(ROLLUPS.c.hour < end)
    for name, wanted in (where or {}).items():
        values = [wanted] if isinstance(wanted, str) else list(wanted)
        query = query.where(ROLLUPS.c[name].in_(values))
    # Groups whose attempts were all re-attributed elsewhere leave rows of zeros behind.
    return query.having(sa.func.sum(ROLLUPS.c.attempts) != 0)


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
