"""Retention: pruning raw attempt rows before a cutoff, and never counting a pruned attempt twice.

A prune first raises the store's cutoff (``costwatch_retention``), then removes the rows: on
PostgreSQL it detaches the day partitions wholly before the cutoff in the same transaction (the one
moment it locks the table) and deletes the rest row by row (the day the cutoff falls in, the
DEFAULT partition); on SQLite it deletes rows. The detached days are dropped, and their disk space
given back, in a step of its own (:func:`drop_pruned`), which blocks nobody and whose time grows
with their bytes. The rollups are never touched, so every total stays.

The cutoff is what keeps a pruned attempt from being counted again: a spool older than the retention
replayed after the prune (or a later revision of a pruned attempt) would find no row, be stored as
new and add to the rollups a second time. So the writer keeps every record that started before the
cutoff out of the attempts table and the rollups, and in ``costwatch_rejected_attempts`` with the
reason. On PostgreSQL, writers hold a shared advisory lock while they read the cutoff and write,
and raising the cutoff takes it exclusively: a writer that read the old cutoff has committed before
any row is removed. SQLite's write lock does the same.

The detach waits a moment for the table's lock, never long: a waiting request for it holds every
writer queued behind it, so a prune that finds the table held by a long read lets the writers by and
tries again (:func:`prune_before`).
"""

from __future__ import annotations

import time as clock
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, time, timedelta, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .partitions import (
    DAYS_AHEAD,
    day_partitions,
    detach_day_partitions,
    drop_detached_partitions,
    ensure_day_partitions,
    lock_for_detach,
    rows_of_days,
    rows_of_detached,
)
from .schema import ATTEMPTS, RETENTION

__all__ = [
    "PRUNE_BATCH",
    "PRUNE_LOCK_WAIT_S",
    "PruneLockTimeout",
    "as_utc",
    "cutoff_for_writing",
    "drop_pruned",
    "ensure_partitions_ahead",
    "prune_before",
    "raise_cutoff",
]

PRUNE_BATCH = 10_000
"""Attempt rows a prune deletes per transaction (where it deletes rather than drops)."""

PRUNE_LOCK_WAIT_S = 300.0
"""How long a prune keeps trying to detach the expired days (PostgreSQL) while other sessions hold
the attempts table (a long ``report``), before it gives up with :class:`PruneLockTimeout`."""

_FIRST_PAUSE_S = 0.2
_LONGEST_PAUSE_S = 5.0
"""Between tries of the detach, a pause doubling from the first to the longest: writers queued behind
a try go on during it, and a try waits at most ``DETACH_LOCK_TIMEOUT_MS`` (0.1 s)."""

_LOCK_NOT_AVAILABLE = "55P03"


class PruneLockTimeout(Exception):
    """A prune found the attempts table held by other sessions (long reads) at every try for its whole
    lock wait: nothing was pruned, and the store's cutoff was not raised."""

    def __init__(self, waited_s: float, tries: int) -> None:
        super().__init__(
            f"other sessions held the attempts table (a long read, such as a report) at each of {tries} "
            f"tries over {waited_s:.0f} s; nothing was pruned"
        )
        self.waited_s = waited_s
        """How long the prune kept trying."""
        self.tries = tries
        """How many times it tried."""


_LOCK = "hashtext('costwatch.prune:' || current_schema())"

_READ_CUTOFF = sa.select(RETENTION.c.pruned_before)
"""Read by every batch: built once, so that SQLAlchemy neither builds nor keys it each time."""


def as_utc(moment: datetime) -> datetime:
    """``moment`` as timezone-aware UTC (naive is taken as UTC, as the store stores it)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def cutoff_for_writing(connection: sa.Connection) -> datetime | None:
    """The latest prune's cutoff, read inside a writer's transaction, where it stays in force until
    the transaction ends (``None``: never pruned)."""
    if connection.dialect.name == "postgresql":
        # A statement of its own: the next one's snapshot is taken after the lock is granted.
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock_shared({_LOCK})")
    cutoff = connection.execute(_READ_CUTOFF).scalar()
    return None if cutoff is None else as_utc(cutoff)


def raise_cutoff(connection: sa.Connection, moment: datetime, now: datetime) -> datetime | None:
    """Raise the store's cutoff to ``moment`` (never lower it), inside the caller's transaction;
    returns the cutoff before (``None``: never pruned).

    On PostgreSQL this waits for the writers in flight, which may have read the older cutoff.
    """
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK})")
    stored = connection.execute(_READ_CUTOFF).scalar()
    if stored is None:
        connection.execute(sa.insert(RETENTION).values(id=1, pruned_before=moment, pruned_at=now))
        return None
    if as_utc(stored) < moment:
        connection.execute(sa.update(RETENTION).values(pruned_before=moment, pruned_at=now))
    return as_utc(stored)


def ensure_partitions_ahead(engine: Engine, now: datetime | None = None) -> datetime | None:
    """Create the day partitions from yesterday to :data:`~costwatch.store.partitions.DAYS_AHEAD`
    days ahead where missing (PostgreSQL; nothing on SQLite). Returns when to do it again (``None``:
    never needed here)."""
    if engine.dialect.name != "postgresql":
        return None
    today = (now or datetime.now(timezone.utc)).date()
    with engine.begin() as connection:
        ensure_day_partitions(connection, today - timedelta(days=1), today + timedelta(days=DAYS_AHEAD))
    # Again when half the days ahead are used up: one writer's check a day, at most.
    return datetime.combine(today, datetime.min.time(), timezone.utc) + timedelta(days=DAYS_AHEAD // 2)


def prune_before(
    engine: Engine,
    moment: datetime,
    *,
    batch: int = PRUNE_BATCH,
    lock_wait_s: float | None = None,
    on_wait: Callable[[float], object] | None = None,
) -> int:
    """Remove raw attempt rows that started before ``moment``; returns how many. Idempotent.

    The cutoff is raised first. PostgreSQL: in the same short transaction, the day partitions wholly
    before ``moment`` are detached (the only moment the table is locked): their rows leave the table
    at its commit, counted as removed by this prune; their files stay until :func:`drop_pruned`.
    Then (both backends) the rows left before it are deleted in transactions of at most ``batch``
    rows, so a writer beside the prune waits for one short transaction at a time, never for the
    whole prune.

    While other sessions hold the attempts table (a long read), the detach is tried again and again,
    each try waiting at most ``DETACH_LOCK_TIMEOUT_MS`` so that the writers queued behind it are held
    no longer, for up to ``lock_wait_s`` seconds (default :data:`PRUNE_LOCK_WAIT_S`); then
    :class:`PruneLockTimeout`, with nothing pruned. ``on_wait`` is told once, at the first try that
    found the table held, with that wait.
    """
    moment = as_utc(moment)
    budget = PRUNE_LOCK_WAIT_S if lock_wait_s is None else lock_wait_s
    started = clock.monotonic()
    pause, tries = _FIRST_PAUSE_S, 0
    while True:
        tries += 1
        try:
            removed = _detach_before(engine, moment)
            break
        except sa.exc.OperationalError as exc:
            if not _lock_not_available(exc):
                raise
            waited = clock.monotonic() - started
            if waited >= budget:
                raise PruneLockTimeout(waited, tries) from None
            if tries == 1 and on_wait is not None:
                on_wait(budget)
            clock.sleep(min(pause, budget - waited))
            pause = min(2 * pause, _LONGEST_PAUSE_S)
    return removed + _delete_before(engine, moment, batch)


def _lock_not_available(exc: sa.exc.OperationalError) -> bool:
    return getattr(exc.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE


def _detach_before(engine: Engine, moment: datetime) -> int:
    """Raise the cutoff to ``moment`` and detach the day partitions wholly before it, in one
    transaction; returns the rows those days held."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        with engine.begin() as connection:
            earlier = raise_cutoff(connection, moment, datetime.now(timezone.utc))
            old_days = [partition for partition in day_partitions(connection) if partition.end <= moment]
            if old_days:
                # Before the rows are summed: a try that cannot have the table costs nothing more.
                lock_for_detach(connection)
            # A day that starts at or after the earlier cutoff never had a row deleted, so its rows
            # are the attempts its hours' rollups count. No writer moves those counts any more: the
            # writers that read the old cutoff have committed (raise_cutoff waited for them), later
            # ones wait for this transaction and then refuse records before the new cutoff, and a
            # reclassification keeps an attempt in its hour. So they are summed on a connection of
            # their own while the detach waits for its lock and commits, not after it.
            whole = {day.day for day in old_days if earlier is None or _start(day.day) >= earlier}
            summed = pool.submit(_rows_of_days, engine, sorted(whole))
            detached = detach_day_partitions(connection, old_days) if old_days else []
            # A day an earlier prune deleted rows from (the day its cutoff fell in): counted row by
            # row, before another process could drop it.
            removed = rows_of_detached(connection, [day for day in detached if day.day not in whole])
        ours = {day.day for day in detached} & whole
        removed += summed.result() if ours == whole else _rows_of_days(engine, sorted(ours))
    return removed


def drop_pruned(engine: Engine) -> int:
    """Drop the day partitions prunes detached (PostgreSQL; nothing on SQLite); returns the bytes
    given back to the file system. Blocks no writer; its time grows with those bytes."""
    if engine.dialect.name != "postgresql":
        return 0
    with engine.begin() as connection:
        return drop_detached_partitions(connection)


def _rows_of_days(engine: Engine, days: list[date]) -> int:
    if not days:
        return 0
    with engine.connect() as connection:
        return rows_of_days(connection, days)


def _start(day: date) -> datetime:
    return datetime.combine(day, time(), timezone.utc)


def _delete_before(engine: Engine, moment: datetime, batch: int) -> int:
    if engine.dialect.name == "postgresql":
        # The key is (attempt_id, started_at); the start-time condition keeps the scan to the
        # partitions before the cutoff (the day it falls in and the DEFAULT partition).
        key = sa.tuple_(ATTEMPTS.c.attempt_id, ATTEMPTS.c.started_at)
        old = sa.select(ATTEMPTS.c.attempt_id, ATTEMPTS.c.started_at).where(ATTEMPTS.c.started_at < moment)
        delete = sa.delete(ATTEMPTS).where(ATTEMPTS.c.started_at < moment, key.in_(old.limit(batch)))
    else:
        old = sa.select(ATTEMPTS.c.attempt_id).where(ATTEMPTS.c.started_at < moment).limit(batch)
        delete = sa.delete(ATTEMPTS).where(ATTEMPTS.c.attempt_id.in_(old.scalar_subquery()))
    deleted = 0
    while True:
        with engine.begin() as connection:
            count = int(connection.execute(delete).rowcount or 0)
        deleted += count
        if count < batch:
            return deleted
