"""Filling a PostgreSQL store fast for the retention benchmark: one day written by costwatch's writer,
copied to later days in SQL.

The retention benchmark (row 9) needs a store of 10M attempts over 60 days; through the writer that
is ~45 minutes on the benchmark machine. Instead, one day of synthetic attempts is written through
``SqlStore.export`` (so every row, reclassification and rollup is the writer's own), and then that
day's rows of the tables the writer fills are copied, in the database, to each later day:

* ``costwatch_attempts``: every column as stored, ``started_at`` moved by whole days, the ids that
  must stay unique made new (:func:`replicated`: the time in a UUIDv7 id moved by the same days,
  so ids still sort by time; a fingerprint hashed with the copy's number, so no copy is taken for
  a retry of another);
* ``costwatch_hourly_rollups``: the day's rows, their hour moved by the same days (each copied hour
  holds exactly the copied attempts of that hour, so its sums are theirs);
* ``costwatch_all_time_rollups``: each row set to the sum of its hourly rows and their earliest hour,
  which is what the writer keeps it equal to;
* ``costwatch_retried_requests`` (migration 0016): each retried request's summary, its ids, last
  start and its attempts' entries moved as its attempts were;
* ``costwatch_retried_alike`` (migration 0016): the sums of the alike requests, which the copied
  day alone made (the store holds nothing else when it is copied), times the days they now cover.

Any other table the writer filled for that day is refused (:class:`UnknownTable`), so the copies
cannot silently miss what a later writer starts to store. :func:`replicated` is the same copy made
in Python, for writing the same store through the writer and comparing
(``tests/test_bulk_fill.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, time, timedelta, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from costwatch.records import AttemptRecord
from costwatch.store.rows import ATTEMPT_COLUMNS
from costwatch.store.schema import (
    ALL_TIME_DIMENSIONS,
    ALL_TIME_ROLLUPS,
    ATTEMPTS,
    ROLLUP_DIMENSIONS,
    ROLLUP_MEASURES,
    ROLLUPS,
    metadata,
)

__all__ = ["UnknownTable", "copy_day", "replicated", "sum_all_time_rollups"]

_DAY_MS = 86_400_000

_SUMMARIES, _ALIKE = "costwatch_retried_requests", "costwatch_retried_alike"
_COPIED = {ATTEMPTS.name, ROLLUPS.name, ALL_TIME_ROLLUPS.name, _SUMMARIES, _ALIKE}
_UNCHANGED = {"costwatch_retention", "costwatch_reconciliations"}
"""Tables the writer does not fill from a batch of attempts (checked empty of the day all the same)."""


class UnknownTable(RuntimeError):
    """The template day left rows in a table the copy does not know how to copy."""


def _moved_id(value: str, days: int) -> str:
    return f"{int(value[:12], 16) + days * _DAY_MS:012x}{value[12:]}"


def replicated(record: AttemptRecord, days: int) -> AttemptRecord:
    """``record`` as :func:`copy_day` copies its row ``days`` days later."""
    return dataclasses.replace(
        record,
        attempt_id=_moved_id(record.attempt_id, days),
        logical_request_id=_moved_id(record.logical_request_id, days),
        fingerprint=None
        if record.fingerprint is None
        else hashlib.md5(f"{record.fingerprint}:{days}".encode()).hexdigest(),
        started_at=record.started_at + timedelta(days=days),
    )


def _sql_moved_id(column: str) -> str:
    return (
        f"lpad(to_hex(('x' || lpad(substr({column}, 1, 12), 16, '0'))::bit(64)::bigint "
        f"+ CAST(:days AS bigint) * {_DAY_MS}), 12, '0') || substr({column}, 13)"
    )


_ATTEMPT_COPIED = {
    "attempt_id": _sql_moved_id("attempt_id"),
    "logical_request_id": _sql_moved_id("logical_request_id"),
    "fingerprint": "md5(fingerprint || ':' || :days)",
    "started_at": "started_at + make_interval(hours => :days * 24)",
}


def _summaries_copied() -> sa.TextClause | None:
    """The statement copying the day's retried-request summaries (``None``: no such table yet)."""
    table = metadata.tables.get(_SUMMARIES)
    if table is None:
        return None
    moved = {
        "logical_request_id": _sql_moved_id("logical_request_id"),
        "last_attempt_id": _sql_moved_id("last_attempt_id"),
        "last_started_at": "last_started_at + make_interval(hours => :days * 24)",
        # Each entry: attempt id -> [attempt number, start in microseconds, ...].
        "prompts": (
            f"(SELECT coalesce(jsonb_object_agg({_sql_moved_id('key')}, jsonb_set(value, '{{1}}', "
            f"to_jsonb((value ->> 1)::bigint + CAST(:days AS bigint) * {_DAY_MS * 1000}))), '{{}}'::jsonb) "
            "FROM jsonb_each(prompts))"
        ),
    }
    names = [column.name for column in table.columns]
    return sa.text(
        f"INSERT INTO {_SUMMARIES} ({', '.join(names)}) "
        f"SELECT {', '.join(moved.get(name, name) for name in names)} FROM {_SUMMARIES} "
        # The day's own (the copies made meanwhile are later days): a request's attempts all
        # started within its day.
        "WHERE last_started_at >= :start AND last_started_at < :end"
    )


def _start(day: date) -> datetime:
    return datetime.combine(day, time(), timezone.utc)


def _check_tables(connection: sa.Connection, day: date) -> None:
    """Refuse a day whose rows are in a table not copied here (what the writer stores grew)."""
    for table in metadata.sorted_tables:
        if table.name in _COPIED or table.name in _UNCHANGED:
            continue
        if connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one():
            raise UnknownTable(
                f"{table.name} has rows after the template day {day}: benchmarks/bulk_fill.py does not "
                "copy it yet, so a bulk-filled store would differ from one the writer filled"
            )


def copy_day(
    engine: Engine,
    day: date,
    copies: int,
    *,
    sessions: int = 2,
    log: Callable[[str], None] | None = None,
) -> int:
    """Copy ``day``'s attempts and hourly rollups to each of the ``copies`` days after it (their
    partitions made first, their days empty), one transaction a day, ``sessions`` at a time; then
    sum the all-time rollups again. Returns the attempts copied."""
    start, end = _start(day), _start(day + timedelta(days=1))
    columns = ", ".join(ATTEMPT_COLUMNS)
    values = ", ".join(_ATTEMPT_COPIED.get(name, name) for name in ATTEMPT_COLUMNS)
    # Read in the order the writer stored them (by start): each copy's index entries then land at
    # one end of the time-ordered indexes, as the writer's do.
    attempts = sa.text(
        f"INSERT INTO {ATTEMPTS.name} ({columns}) SELECT {values} FROM {ATTEMPTS.name} "
        "WHERE started_at >= :start AND started_at < :end"
    )
    rollup_columns = (*ROLLUP_DIMENSIONS, *ROLLUP_MEASURES)
    rollup_values = ["hour + make_interval(hours => :days * 24)", *rollup_columns[1:]]
    rollups = sa.text(
        f"INSERT INTO {ROLLUPS.name} ({', '.join(rollup_columns)}) SELECT {', '.join(rollup_values)} "
        f"FROM {ROLLUPS.name} WHERE hour >= :start AND hour < :end"
    )
    summaries = _summaries_copied()
    with engine.connect() as connection:
        _check_tables(connection, day)
        others = sa.text(
            f"SELECT 1 FROM {ATTEMPTS.name} WHERE started_at < :start OR started_at >= :end LIMIT 1"
        )
        if connection.execute(others, {"start": start, "end": end}).first() is not None:
            raise ValueError(
                f"the store holds attempts outside {day}: only a store of that day alone is copied"
            )
    done: list[int] = []
    lock = threading.Lock()

    def copy(days: int) -> None:
        with engine.begin() as connection:
            connection.exec_driver_sql("SET LOCAL jit = off")
            bounds = {"start": start, "end": end, "days": days}
            count = int(connection.execute(attempts, bounds).rowcount or 0)
            connection.execute(rollups, bounds)
            if summaries is not None:
                connection.execute(summaries, bounds)
        with lock:
            done.append(count)
            if log is not None and (len(done) % 10 == 0 or len(done) == copies):
                log(f"  bulk fill: day {day} copied to {len(done)} of {copies} days after it ({sum(done):,})")

    # Sessions side by side: one copy keeps one core busy, and the server has more.
    with ThreadPoolExecutor(max_workers=sessions) as pool:
        for finished in [pool.submit(copy, days) for days in range(1, copies + 1)]:
            finished.result()
    with engine.begin() as connection:
        sum_all_time_rollups(connection)
        alike = metadata.tables.get(_ALIKE)
        if alike is not None:
            sums = [column.name for column in alike.columns if not column.primary_key]
            connection.exec_driver_sql(
                f"UPDATE {_ALIKE} SET {', '.join(f'{name} = {name} * {copies + 1}' for name in sums)}"
            )
    return sum(done)


def sum_all_time_rollups(connection: sa.Connection) -> None:
    """Set every all-time rollup row to the sum of its hourly rows and their earliest hour."""
    keys = ", ".join(ALL_TIME_DIMENSIONS)
    sums = ", ".join(f"sum({name})" for name in ROLLUP_MEASURES)
    assigned = ", ".join(f"{name} = excluded.{name}" for name in ("first_hour", *ROLLUP_MEASURES))
    connection.exec_driver_sql(
        f"INSERT INTO {ALL_TIME_ROLLUPS.name} ({keys}, first_hour, {', '.join(ROLLUP_MEASURES)}) "
        f"SELECT {keys}, min(hour), {sums} FROM {ROLLUPS.name} GROUP BY {keys} "
        f"ON CONFLICT ({keys}) DO UPDATE SET {assigned}"
    )
