"""PostgreSQL's attempts table partitioned by day: creating partitions ahead, dropping old ones.

On PostgreSQL (from migration 0013) ``costwatch_attempts`` is range-partitioned on ``started_at``,
one partition per UTC day (``costwatch_attempts_pYYYYMMDD``), plus a DEFAULT partition
(``costwatch_attempts_default``) that takes any row no day partition covers, so an insert never
fails for a missing partition. Days, not months: a prune drops whole days and deletes rows from one
day at most (the day the cutoff falls in), and the writer's lookups carry a start-time range, so
they probe only the few partitions of the last days whatever the retention. SQLite has no
partitions; every function here does nothing there.

Partitions are created :data:`DAYS_AHEAD` days ahead by the writer (at first use and again when
fewer than half of those days are left), by ``costwatch serve`` (hourly) and by ``costwatch db
upgrade`` / ``prune``. Creating and dropping partitions take the same advisory lock, so processes
doing either at once take turns.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone

import sqlalchemy as sa

from .schema import ROLLUPS

__all__ = [
    "DAYS_AHEAD",
    "DEFAULT_PARTITION",
    "DETACH_LOCK_TIMEOUT_MS",
    "DayPartition",
    "day_partitions",
    "detach_day_partitions",
    "detached_partitions",
    "drop_detached_partitions",
    "ensure_day_partitions",
    "held_by_another_creator",
    "is_attempt_partition",
    "is_partitioned",
    "lock_for_detach",
    "partition_name",
    "rows_of_days",
    "rows_of_detached",
]

DAYS_AHEAD = 7
"""How many days past today the attempts table has partitions for."""

DEFAULT_PARTITION = "costwatch_attempts_default"
"""The partition for rows no day partition covers (a clock far off, a day not created yet)."""

LOCK_TIMEOUT_MS = 100
"""How long one try of creating partitions waits for each of its locks (the attempts table's and its
DEFAULT partition's exclusive ones among them) before it gives up with ``lock_not_available``
(SQLSTATE 55P03), to be tried again later: writers queue behind a waiting exclusive request, so this
is the longest a reader holding the table (a long ``report``) can make them wait for it. Nothing is
lost meanwhile: rows of a day without its partition land in the DEFAULT partition."""

DETACH_LOCK_TIMEOUT_MS = 100
"""How long one try of a prune's detach waits for its locks (the attempts table's exclusive lock
among them) before it gives up, to try again a little later: writers queue behind a waiting
exclusive request, so this is the longest a reader holding the table (a long ``report``) can make
them wait for a prune."""

_PARENT = "costwatch_attempts"
_NAME = re.compile(r"^costwatch_attempts_(p(\d{8})|default)$")
_PRUNED = "costwatch_attempts_pruned_"
"""A prefix for a detached partition, which a prune drops next: never a table it did not detach."""
_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('costwatch.partitions:' || current_schema()))"
_DROP_LOCK_SQL = "SELECT pg_try_advisory_xact_lock(hashtext('costwatch.drop:' || current_schema()))"


def partition_name(day: date) -> str:
    """The name of the partition holding the attempts that started on ``day`` (UTC)."""
    return f"{_PARENT}_p{day:%Y%m%d}"


def is_attempt_partition(name: str | None) -> bool:
    """Whether ``name`` is one of the attempts table's partitions (which the schema's tables do not list)."""
    return name is not None and (_NAME.match(name) is not None or name.startswith(_PRUNED))


@dataclass(frozen=True)
class DayPartition:
    """One day's partition: its name and the UTC day it holds."""

    name: str
    day: date

    @property
    def end(self) -> datetime:
        """The first moment past this partition's day."""
        return datetime.combine(self.day + timedelta(days=1), time(), timezone.utc)


def is_partitioned(connection: sa.Connection) -> bool:
    """Whether the attempts table is partitioned here (PostgreSQL at migration 0013 or later)."""
    if connection.dialect.name != "postgresql":
        return False
    kind = connection.exec_driver_sql(
        "SELECT relkind FROM pg_class WHERE oid = to_regclass(%(parent)s)", {"parent": _PARENT}
    ).scalar()
    return bool(kind == "p")


def day_partitions(connection: sa.Connection) -> list[DayPartition]:
    """The attempts table's day partitions, oldest first (none where it is not partitioned)."""
    if not is_partitioned(connection):
        return []
    names = connection.exec_driver_sql(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass(%(parent)s)",
        {"parent": _PARENT},
    ).scalars()
    found = []
    for name in names:
        match = _NAME.match(name)
        if match is not None and match.group(2) is not None:
            found.append(DayPartition(name, datetime.strptime(match.group(2), "%Y%m%d").date()))
    return sorted(found, key=lambda partition: partition.day)


def _bound(day: date) -> str:
    # A literal: DDL takes no parameters; made from a date, so nothing to escape.
    return f"'{day.isoformat()} 00:00:00+00'"


def ensure_day_partitions(connection: sa.Connection, first: date, last: date) -> list[str]:
    """Create the missing day partitions for ``first`` to ``last`` (inclusive), inside the caller's
    transaction; returns the names created.

    Rows of those days already in the DEFAULT partition (written before their day's partition
    existed) are moved into the new partition, which is then attached: PostgreSQL refuses to create
    a partition whose rows the DEFAULT partition holds. Each lock is waited for at most
    :data:`LOCK_TIMEOUT_MS`; past that the statement fails (55P03) and the caller's transaction must
    be rolled back.
    """
    if not is_partitioned(connection):
        return []
    connection.exec_driver_sql(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
    connection.exec_driver_sql(_LOCK_SQL)
    existing = {partition.day for partition in day_partitions(connection)}
    quote = connection.dialect.identifier_preparer.quote
    created = []
    day = first
    while day <= last:
        if day not in existing:
            name = quote(partition_name(day))
            start, end = _bound(day), _bound(day + timedelta(days=1))
            in_range = f"started_at >= {start} AND started_at < {end}"
            in_default = connection.exec_driver_sql(
                f"SELECT 1 FROM {DEFAULT_PARTITION} WHERE {in_range} LIMIT 1"
            ).first()
            if in_default is None:
                connection.exec_driver_sql(
                    f"CREATE TABLE {name} PARTITION OF {_PARENT} FOR VALUES FROM ({start}) TO ({end})"
                )
            else:
                connection.exec_driver_sql(
                    f"CREATE TABLE {name} (LIKE {_PARENT} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
                )
                connection.exec_driver_sql(
                    f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION} WHERE {in_range} RETURNING *) "
                    f"INSERT INTO {name} SELECT * FROM moved"
                )
                connection.exec_driver_sql(
                    f"ALTER TABLE {_PARENT} ATTACH PARTITION {name} FOR VALUES FROM ({start}) TO ({end})"
                )
            created.append(partition_name(day))
        day += timedelta(days=1)
    return created


def held_by_another_creator(error: BaseException) -> bool:
    """Whether ``error`` is :func:`ensure_day_partitions` giving up because another session held the
    lock on creating partitions past :data:`LOCK_TIMEOUT_MS`: another process making the same ones
    (a fleet starting on a day without them), which are usually there once it commits."""
    return (
        isinstance(error, sa.exc.DBAPIError)
        and error.statement == _LOCK_SQL
        and getattr(error.orig, "sqlstate", None) == "55P03"  # lock_not_available
    )


def lock_for_detach(connection: sa.Connection) -> None:
    """Take the locks :func:`detach_day_partitions` needs, inside the caller's transaction, each
    waited for at most :data:`DETACH_LOCK_TIMEOUT_MS`: past that the statement fails with
    ``lock_not_available`` (SQLSTATE 55P03), the transaction is rolled back and the writers queued
    behind the request go on."""
    connection.exec_driver_sql(f"SET LOCAL lock_timeout = {DETACH_LOCK_TIMEOUT_MS}")
    connection.exec_driver_sql(_LOCK_SQL)
    # The parent alone: the partitions' locks come with the detach, which a reader holding the
    # parent would block anyway.
    connection.exec_driver_sql(f"LOCK TABLE ONLY {_PARENT} IN ACCESS EXCLUSIVE MODE")


def detach_day_partitions(
    connection: sa.Connection, partitions: Sequence[DayPartition]
) -> list[DayPartition]:
    """Detach day partitions from the attempts table inside the caller's transaction, renamed for
    :func:`drop_detached_partitions`; returns those it detached, under their new names (a partition
    another process detached first is skipped).

    Detaching changes the catalog only, so the table's exclusive lock, which it takes (and holds until
    the caller commits), is held for milliseconds: writers wait that long, not for the files to be
    removed, which happens apart, under no lock on the table. ``DETACH ... CONCURRENTLY`` would not
    block writers at all, but PostgreSQL refuses it on a table with a DEFAULT partition. Each lock is
    waited for at most :data:`DETACH_LOCK_TIMEOUT_MS` (:func:`lock_for_detach`).
    """
    lock_for_detach(connection)
    present = set(day_partitions(connection))
    quote = connection.dialect.identifier_preparer.quote
    detached, statements = [], []
    for partition in partitions:
        if partition in present:
            name = quote(partition.name)
            pruned = f"{_PRUNED}{partition.name.removeprefix(_PARENT + '_')}"
            statements.append(f"ALTER TABLE {_PARENT} DETACH PARTITION {name}")
            statements.append(f"ALTER TABLE {name} RENAME TO {quote(pruned)}")
            detached.append(DayPartition(pruned, partition.day))
    if statements:
        # One round trip for all of them: writers wait while this runs, and on a busy host each
        # statement's round trip cost more than the statement itself.
        connection.exec_driver_sql("; ".join(statements))
    return detached


def detached_partitions(connection: sa.Connection) -> list[str]:
    """The partitions a prune detached and nobody has dropped yet (:func:`drop_detached_partitions`)."""
    if not is_partitioned(connection):
        return []
    names = connection.exec_driver_sql(
        "SELECT c.relname FROM pg_class c WHERE c.relkind = 'r' AND c.relname LIKE %(pattern)s "
        "AND c.relnamespace = "
        "(SELECT p.relnamespace FROM pg_class p WHERE p.oid = to_regclass(%(parent)s)) "
        "ORDER BY c.relname",
        {"pattern": f"{_PRUNED}%", "parent": _PARENT},
    ).scalars()
    return [name for name in names if name.startswith(_PRUNED)]  # LIKE's _ matches any character


def drop_detached_partitions(connection: sa.Connection) -> int:
    """Drop the partitions prunes detached, inside the caller's transaction; returns the bytes their
    files held, which the commit gives back to the file system.

    Their rows left the attempts table (and were counted) when they were detached: this only frees
    the disk. No lock on the attempts table: they are tables of their own. The cost is removing their
    files when the caller commits, which grows with their size (benchmarks/README.md, row 9).
    """
    # Not the partitions' lock (a writer creating its days would wait for the files' removal): a
    # lock of its own, and a process that finds it taken leaves the dropping to the one holding it.
    dropping = connection.exec_driver_sql(_DROP_LOCK_SQL).scalar()
    if not dropping:
        return 0
    names = detached_partitions(connection)
    if not names:
        return 0
    quote = connection.dialect.identifier_preparer.quote
    tables = ", ".join(quote(name) for name in names)
    size = connection.exec_driver_sql(
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
        "WHERE c.oid = ANY(%(tables)s::regclass[])",
        {"tables": [quote(name) for name in names]},
    ).scalar_one()
    connection.exec_driver_sql(f"DROP TABLE {tables}")
    return int(size)


def rows_of_detached(connection: sa.Connection, partitions: Sequence[DayPartition]) -> int:
    """The rows of detached day partitions, counted one by one (see :func:`rows_of_days` for days
    whose rollups count them)."""
    if not partitions:
        return 0
    quote = connection.dialect.identifier_preparer.quote
    # No JIT: its compile time would exceed the count's.
    connection.exec_driver_sql("SET LOCAL jit = off")
    tables = " UNION ALL ".join(f"SELECT 1 FROM {quote(partition.name)}" for partition in partitions)
    return int(connection.exec_driver_sql(f"SELECT count(*) FROM ({tables}) AS detached").scalar_one())


def _start(day: date) -> datetime:
    return datetime.combine(day, time(), timezone.utc)


def rows_of_days(connection: sa.Connection, days: Sequence[date]) -> int:
    """The attempts that started on ``days``, as the hourly rollups count them: every stored attempt
    is in its hour's rollups once, whatever its revisions and reclassifications moved, so for a day
    no prune deleted rows from this is its rows, exactly, read from its rollup rows whatever it holds."""
    if not days:
        return 0
    hour = ROLLUPS.c.hour
    # One index range of the rollups' key (the hour leads it) per run of consecutive days.
    runs: list[list[date]] = []
    for day in sorted(days):
        if runs and runs[-1][1] + timedelta(days=1) == day:
            runs[-1][1] = day
        else:
            runs.append([day, day])
    ranges = [sa.and_(hour >= _start(first), hour < _start(last + timedelta(days=1))) for first, last in runs]
    query = sa.select(sa.func.coalesce(sa.func.sum(ROLLUPS.c.attempts), 0)).where(sa.or_(*ranges))
    return int(connection.execute(query).scalar_one())
