"""The all-time rollups: one batch's hourly rollup deltas summed over their hours, and upserted.

The writer applies the same deltas to the hourly rollups and then, in the same transaction, to
the all-time rollups, so that each all-time row always equals the sum of its hourly rows and a
reader that wants totals over every hour (the fleet exporter, an unbounded report) reads a few
thousand rows instead of grouping every hourly row.

One statement per batch, with the same text every time: on SQLite the driver's ``executemany``, on
PostgreSQL one JSON parameter turned into rows by the server. Rows are upserted in key order, after the
hourly rollups, so concurrent PostgreSQL writers take these row locks in one order and never
deadlock (each holds its hourly locks before asking for any of these).
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from .schema import ALL_TIME_DIMENSIONS, ALL_TIME_ROLLUPS, ROLLUP_DIMENSIONS, ROLLUP_MEASURES

__all__ = ["all_time_delta_rows", "apply_all_time_deltas"]

_COLUMNS = (*ALL_TIME_DIMENSIONS, "first_hour", *ROLLUP_MEASURES)
"""The columns of an all-time delta row, in order."""

assert ROLLUP_DIMENSIONS[0] == "hour", "an hourly rollup row starts with its hour"


def all_time_delta_rows(hourly_rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The all-time deltas of hourly rollup delta rows, as rows of ``_COLUMNS`` in key order.

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


def apply_all_time_deltas(connection: sa.Connection, hourly_rows: Sequence[tuple[Any, ...]]) -> None:
    """Add hourly rollup delta rows to the all-time rollups, inside the caller's transaction."""
    if not hourly_rows:
        return
    rows = all_time_delta_rows(hourly_rows)
    dialect = connection.dialect
    sql = _statement(dialect)
    if dialect.name == "sqlite":
        connection.exec_driver_sql(sql, [_sqlite_row(row) for row in rows])
    else:
        connection.exec_driver_sql(sql, {"rows": _rows_json(rows)})


_statements: dict[str, str] = {}
_FIRST_HOUR = _COLUMNS.index("first_hour")


def _statement(dialect: Dialect) -> str:
    found = _statements.get(dialect.name)
    if found is not None:
        return found
    if dialect.name not in ("postgresql", "sqlite"):
        raise NotImplementedError(f"costwatch's store supports SQLite and PostgreSQL, not {dialect.name}")
    quote = dialect.identifier_preparer.quote
    table = quote(ALL_TIME_ROLLUPS.name)
    columns = ", ".join(quote(name) for name in _COLUMNS)
    earliest = "min" if dialect.name == "sqlite" else "least"  # SQLite's two-argument min() is scalar
    first_hour = quote("first_hour")
    tail = (
        f"ON CONFLICT ({', '.join(quote(name) for name in ALL_TIME_DIMENSIONS)}) DO UPDATE SET "
        f"{first_hour} = {earliest}({table}.{first_hour}, excluded.{first_hour}), "
        + ", ".join(f"{quote(m)} = {table}.{quote(m)} + excluded.{quote(m)}" for m in ROLLUP_MEASURES)
    )
    if dialect.name == "sqlite":
        marks = ", ".join("?" for _ in _COLUMNS)
        found = f"INSERT INTO {table} ({columns}) VALUES ({marks}) {tail}"
    else:
        # Each row is a JSON array (not an object: a third of the text to build and parse), its
        # values taken by position from jsonb (parsed once, where ``json`` would parse a row again
        # for each value) and cast to the column's type. ORDER BY: rows are upserted, and so
        # locked, in the order given (key order).
        values = ", ".join(
            f"(r ->> {position})::{ALL_TIME_ROLLUPS.c[name].type.compile(dialect)}"
            for position, name in enumerate(_COLUMNS)
        )
        found = (
            f"INSERT INTO {table} ({columns}) SELECT {values} "
            f"FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS given(r, n) ORDER BY n {tail}"
        )
    _statements[dialect.name] = found
    return found


def _sqlite_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """The row as SQLite stores it: the hour as naive UTC text, as ``UtcDateTime`` binds it."""
    hour: datetime = row[_FIRST_HOUR]
    if hour.tzinfo is not None:
        hour = hour.astimezone(timezone.utc).replace(tzinfo=None)
    text = hour.isoformat(sep=" ", timespec="microseconds")
    return (*row[:_FIRST_HOUR], text, *row[_FIRST_HOUR + 1 :])


def _rows_json(rows: list[tuple[Any, ...]]) -> str:
    """The rows as one JSON array of arrays, hours as ISO 8601 text with their zone."""
    arrays = []
    for row in rows:
        hour: datetime = row[_FIRST_HOUR]
        if hour.tzinfo is None:
            hour = hour.replace(tzinfo=timezone.utc)
        arrays.append((*row[:_FIRST_HOUR], hour.isoformat(), *row[_FIRST_HOUR + 1 :]))
    try:
        return json.dumps(arrays, allow_nan=False)
    except ValueError:
        # JSON has no NaN or infinity; PostgreSQL reads them from strings into float columns.
        return json.dumps([[_finite_or_text(value) for value in row] for row in arrays])


def _finite_or_text(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value
