"""The all-time rollups: one batch's hourly rollup deltas summed over their hours.

The writer applies the same deltas to the hourly rollups and then, in the same transaction, to
the all-time rollups, so that each all-time row always equals the sum of its hourly rows and a
reader that wants totals over every hour (the fleet exporter, an unbounded report) reads a few
thousand rows instead of grouping every hourly row.

The writer (:mod:`.write`) upserts these rows with the same bulk statement as the hourly ones, in
key order and after the hourly rollups, so concurrent PostgreSQL writers take these row locks in one
order and never deadlock (each holds its hourly locks before asking for any of these).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from .schema import ALL_TIME_DIMENSIONS, ROLLUP_DIMENSIONS, ROLLUP_MEASURES

__all__ = ["ALL_TIME_COLUMNS", "all_time_delta_rows"]

ALL_TIME_COLUMNS = (*ALL_TIME_DIMENSIONS, "first_hour", *ROLLUP_MEASURES)
"""The columns of an all-time delta row, in order."""

assert ROLLUP_DIMENSIONS[0] == "hour", "an hourly rollup row starts with its hour"


def all_time_delta_rows(hourly_rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The all-time deltas of hourly rollup delta rows, as rows of ``ALL_TIME_COLUMNS`` in key order.

    ``hourly_rows`` are rows of ``ROLLUP_DIMENSIONS + ROLLUP_MEASURES`` (what the hourly upsert
    gets). Each all-time row sums its hourly rows' measures and carries their earliest hour. A key
    whose measures net to zero is kept: its hour may still be the earliest one seen.
    """
    width = len(ROLLUP_DIMENSIONS)
    sums: dict[tuple[Any, ...], list[Any]] = {}
    for row in hourly_rows:
        key, hour = row[1:width], row[0]
        known = sums.get(key)
        if known is None:
            sums[key] = [hour, *row[width:]]
            continue
        known[1:] = map(operator.add, known[1:], row[width:])
        if hour < known[0]:
            known[0] = hour
    return [(*key, *sums[key]) for key in sorted(sums)]
