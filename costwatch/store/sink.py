"""``SqlStore``: the store as a :class:`~costwatch.sinks.Sink`, plus the read API over it."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine

from ..avoidable import RetriedAlike, RetriedRequest
from ..records import AttemptRecord, new_id
from ..settings import default_of, load_settings
from ..validation import clean_text
from .database import (
    READ_ONLY_OPTION,
    checked_database_url,
    create_store_engine,
    database_url,
    safe_url,
    sqlite_path,
)
from .migrate import ensure_migrated
from .partitions import held_by_another_creator
from .query import RollupTotals, read_rollup_totals, rollup_totals_query
from .reconciliations import write_reconciliation
from .rejected import RejectedRecord, insert_rejected, is_refusal, refusal_reason, rejected_row
from .retention import PRUNE_BATCH, drop_pruned, ensure_partitions_ahead, prune_before
from .retried import retried_prompts
from .rows import record_from_row
from .schema import ATTEMPTS, CALIBRATION_SAMPLES, REJECTED_ATTEMPTS
from .write import BatchResult, insert_calibration_samples, prepare_statements, write_batch

__all__ = [
    "DEFAULT_RETRY_WINDOW",
    "PRUNE_BATCH",
    "CalibrationRow",
    "EstimatedAttempt",
    "SqlStore",
    "store_name",
]


class CalibrationRow(NamedTuple):
    """One stored calibration sample: what a completed attempt received, and its reported output."""

    sample_id: int
    model: str
    chars: Mapping[str, int]
    output_tokens: int


class EstimatedAttempt(NamedTuple):
    """A stored attempt whose output was estimated, and the id of its calibration sample."""

    sample_id: int
    record: AttemptRecord


def _new_writer_id() -> str:
    return new_id()


_writer_id = _new_writer_id()
"""This process's mark on the calibration samples it writes (drawn again in a forked child)."""

log = logging.getLogger("costwatch")

DEFAULT_RETRY_WINDOW = timedelta(seconds=default_of("retry_window_s"))
"""The default of ``COSTWATCH_RETRY_WINDOW``: how soon after a failed attempt ended its retry must start."""

_PARTITIONS_FIRST_RETRY = timedelta(seconds=1)
_PARTITIONS_RETRY = timedelta(minutes=5)
"""After a writer could not create partitions ahead (their locks held by a long read), it tries again
at a batch this much later, doubling from the first to the longest: each try waits at most
``partitions.LOCK_TIMEOUT_MS`` (0.1 s), so the writers queued behind it are held no longer."""

_live_stores: weakref.WeakSet[SqlStore] = weakref.WeakSet()


def store_name(url: str | URL) -> str:
    """The store's sink name for ``url``: ``sql-`` and a digest of the database, never of its password.

    A relative SQLite path is made absolute first, since it names a different file in each directory.
    """
    parsed = database_url(url)
    path = sqlite_path(parsed)
    if path is not None:
        parsed = parsed.set(database=os.path.abspath(path))
    digest = hashlib.blake2b(safe_url(parsed).encode(), digest_size=16).hexdigest()
    return f"sql-{digest[:12]}"


class SqlStore:
    """Writes attempt records to SQLite or PostgreSQL and keeps hourly rollups in step.

    ``url`` defaults to ``$COSTWATCH_DATABASE_URL``, else ``sqlite:///costwatch.db``;
    ``retry_window`` defaults to ``$COSTWATCH_RETRY_WINDOW``. The schema is migrated on first use
    unless ``auto_migrate`` is false. ``export`` is idempotent on ``attempt_id`` and keeps the highest
    revision, as the :class:`~costwatch.sinks.Sink` contract asks. ``name`` (which names the store's
    spool) differs per database, so a spool is only ever replayed into the database it was meant for.
    """

    def __init__(
        self,
        url: str | URL | None = None,
        *,
        auto_migrate: bool = True,
        retry_window: timedelta | None = None,
    ) -> None:
        # Another backend or a bad port can never work; a missing SQLite directory is instrument()'s
        # and the CLI's to refuse (the store itself may be built before its directory exists).
        self.url = checked_database_url(url, directory_must_exist=False)
        self.name = store_name(self.url)
        self.auto_migrate = auto_migrate
        self.retry_window = (
            retry_window if retry_window is not None else timedelta(seconds=load_settings().retry_window_s)
        )
        self._engine: Engine | None = None
        self._migrated = False
        self._file: _OpenFile | None = None
        """The SQLite file the pooled connections have open, with its (device, inode) then."""
        self._lock = threading.Lock()
        self.rejected_records = 0
        """Records this store refused to hold (kept in ``costwatch_rejected_attempts``), this process."""
        self._rejection_logged = False
        self._cutoff_logged = False
        self._partitions_due: datetime | None = datetime.min.replace(tzinfo=timezone.utc)
        """When to create partitions ahead again (PostgreSQL; ``None``: never, as on SQLite)."""
        self._partitions_pause: timedelta | None = None
        """After tries that failed in a row, the pause before the next (``None``: the last succeeded)."""
        self._partitions_warned = False
        """Whether this run of failed tries was logged as a warning."""
        _live_stores.add(self)

    def __repr__(self) -> str:
        return f"SqlStore({safe_url(self.url)!r})"

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, created (and the schema migrated) on first use."""
        with self._lock:
            if self._engine is None:
                self._engine = create_store_engine(self.url)
            elif self._file is not None and _file_identity(self._file.path) != self._file.identity:
                # The file was moved, removed or replaced: the pooled connections still write to the
                # file that was. Drop them; the next connection opens what the path names now, which
                # is migrated first (a write fails, and spools, while it cannot be).
                self._engine.dispose()
                self._file = None
                self._migrated = False
            if self.auto_migrate and not self._migrated:
                ensure_migrated(self._engine)
                self._migrated = True
            if self._file is None:  # once connected: the file the pooled connection has open
                self._file = _sqlite_file(self.url)
            return self._engine

    def prepare(self) -> None:
        """Connect, migrate and build the writer's statements now rather than at the first write.

        ``instrument()`` calls it so that this one-time work is done before the application's first
        request rather than on the writer thread beside it. Raises what connecting or migrating
        raised; the writer then tries again at each write, spooling meanwhile. The connection stays
        in the pool for the first write, its statements prepared; a SQLite file moved, removed or
        replaced meanwhile is noticed at that write (see :attr:`engine`), which then connects to
        what the path names and fails, and spools, rather than going to the file that was.
        """
        engine = self.engine  # the property creates the engine, migrates and notes the file it opened
        self.ensure_partitions()
        with engine.connect() as connection:
            prepare_statements(connection)  # and the statements' one-time work

    # -- the Sink side -----------------------------------------------------------------------
    def export(self, records: Sequence[AttemptRecord]) -> None:
        """Write one batch in one transaction; raises (and writes nothing) if the database fails."""
        self.write(records)

    def write(self, records: Sequence[AttemptRecord]) -> BatchResult:
        """Like :meth:`export`, returning what the batch changed.

        A record the database refuses (see :func:`~costwatch.store.rejected.is_refusal`) does not
        fail the batch: the batch is bisected until the refused records stand alone, the others are
        written, and each refused one is kept in ``costwatch_rejected_attempts`` with the
        database's reason and counted in :attr:`rejected_records`. An outage still raises.
        """
        if not records:
            return BatchResult()
        try:
            return self._write_once(records)
        except Exception as exc:
            if not is_refusal(exc):
                raise
            return self._write_isolating(records, exc)

    def _write_once(self, records: Sequence[AttemptRecord]) -> BatchResult:
        engine = self.engine
        due = self._partitions_due
        if due is not None and datetime.now(timezone.utc) >= due:
            self.ensure_partitions()
        with engine.begin() as connection:
            result = write_batch(connection, records, retry_window=self.retry_window)
            insert_calibration_samples(connection, records, _writer_id)
        if result.before_cutoff:
            self._count_before_cutoff(result.before_cutoff)
        return result

    def ensure_partitions(self) -> None:
        """Create the attempts table's day partitions ahead where missing (PostgreSQL only).

        ``prepare()`` does it (at ``instrument()``), the writer before its first write and then about
        every few days. One try waits at most ``LOCK_TIMEOUT_MS`` for its locks; a failure (a lock
        held by a long read) is logged once as a warning and tried again at a later batch, a second
        later at first and then less and less often (up to five minutes): meanwhile rows of days
        without a partition land in the DEFAULT partition, and are moved out when it is created. A
        first try that found another process creating them (a fleet starting on a day without them)
        is only a debug line: they are usually there at the next try, and a warning comes only if
        that one fails too.
        """
        try:
            self._partitions_due = ensure_partitions_ahead(self.engine)
        except sa.exc.SQLAlchemyError as exc:
            last = self._partitions_pause
            pause = _PARTITIONS_FIRST_RETRY if last is None else min(2 * last, _PARTITIONS_RETRY)
            self._partitions_pause = pause
            self._partitions_due = datetime.now(timezone.utc) + pause
            warn = not self._partitions_warned and not (last is None and held_by_another_creator(exc))
            self._partitions_warned |= warn
            (log.warning if warn else log.debug)(  # once per run of failures
                "costwatch: could not create the attempts table's partitions ahead (%s); trying again "
                "in %.0f s, rows of days without one meanwhile in the DEFAULT partition",
                type(exc).__name__,
                pause.total_seconds(),
            )
        else:
            self._partitions_pause = None
            self._partitions_warned = False

    def _count_before_cutoff(self, count: int) -> None:
        with self._lock:
            self.rejected_records += count
            first = not self._cutoff_logged
            self._cutoff_logged = True
        if first:
            log.warning(
                "costwatch: %d attempt record(s) started before the store's retention cutoff (an old "
                "spool replayed after a prune?); they were possibly counted before their rows were "
                "pruned, so they are kept in costwatch_rejected_attempts and not counted again",
                count,
            )

    def write_reconciliation(
        self, result: Mapping[str, Any], revisions: Sequence[AttemptRecord], *, reconciled_at: datetime
    ) -> int:
        """Store a reconciliation and the revisions of the attempts the bill corrected, in one
        transaction (see :func:`~costwatch.store.reconciliations.write_reconciliation`)."""
        with self.engine.begin() as connection:
            return write_reconciliation(
                connection,
                result,
                reconciled_at=reconciled_at,
                revisions=revisions,
                retry_window=self.retry_window,
                writer=_writer_id,
            )

    # -- calibration -------------------------------------------------------------------------
    def calibration_samples(
        self,
        *,
        after: int = 0,
        since: datetime | None = None,
        limit: int = 5_000,
        others_only: bool = False,
        per_model: int | None = None,
    ) -> list[CalibrationRow]:
        """Stored calibration samples (reported output only) with ``sample_id`` above ``after``, oldest
        first: at most the ``limit`` newest, of attempts started at ``since`` or later, and with
        ``others_only`` only those other processes wrote; with ``per_model``, of those only the
        ``per_model`` newest of each model (chosen in the database: the rest are never read)."""
        table = CALIBRATION_SAMPLES
        wanted = [table.c.sample_id > after, table.c.output_tokens.is_not(None)]
        if since is not None:
            wanted.append(table.c.started_at >= since)
        if others_only:
            wanted.append(table.c.writer != _writer_id)
        columns = (table.c.sample_id, table.c.model, table.c.chars, table.c.output_tokens)
        if per_model is None:
            query = sa.select(*columns).where(*wanted).order_by(table.c.sample_id.desc()).limit(limit)
        else:
            # Ranked by their ids and models alone: the counts of only the chosen samples are read.
            newest = (
                sa.select(table.c.sample_id, table.c.model)
                .where(*wanted)
                .order_by(table.c.sample_id.desc())
                .limit(limit)
                .subquery("newest")
            )
            ranked = sa.select(
                newest.c.sample_id,
                sa.func.row_number()
                .over(partition_by=newest.c.model, order_by=newest.c.sample_id.desc())
                .label("rank"),
            ).subquery("ranked")
            chosen = sa.select(ranked.c.sample_id).where(ranked.c.rank <= per_model)
            query = (
                sa.select(*columns).where(table.c.sample_id.in_(chosen)).order_by(table.c.sample_id.desc())
            )
        with self._read() as connection:
            rows = connection.execute(query).all()
        return [
            CalibrationRow(int(row.sample_id), row.model, _chars(row.chars), int(row.output_tokens))
            for row in reversed(rows)
        ]

    def estimated_attempts(
        self,
        *,
        since: datetime,
        after: int = 0,
        limit: int = 500,
        until: int | None = None,
        models: Collection[str] | None = None,
    ) -> list[EstimatedAttempt]:
        """Stored attempts whose output was estimated, started at ``since`` or later, with ``sample_id``
        above ``after`` (and at most ``until``), of ``models`` if given: at most ``limit``, in
        ``sample_id`` order, each with the characters its estimate was made from (``output_chars``)."""
        page_ids, page_rows = _estimated_queries(until is not None, models is not None)
        narrower: dict[str, Any] = {}
        if until is not None:
            narrower["until"] = until
        if models is not None:
            narrower["models"] = sorted(models)
        found: list[EstimatedAttempt] = []
        with self._read() as connection:
            # The page's sample ids first, from the samples alone, then their attempts: joining every
            # sample of the window before taking a page made each page cost the whole window.
            while len(found) < limit:
                wanted = limit - len(found)
                ids = list(
                    connection.execute(
                        page_ids, {"since": since, "after": after, "limit": wanted, **narrower}
                    ).scalars()
                )
                if not ids:
                    break
                rows = connection.execute(page_rows, {"ids": ids, "since": since})
                for row in rows.mappings():
                    record = dataclasses.replace(
                        record_from_row(row), output_chars=MappingProxyType(_chars(row["chars"]))
                    )
                    found.append(EstimatedAttempt(int(row["sample_id"]), record))
                after = ids[-1]
                if len(ids) < wanted:  # no more samples: the page ends short
                    break
        return found

    def _write_isolating(self, records: Sequence[AttemptRecord], refusal: Exception) -> BatchResult:
        """Write ``records``, one of which the database refused, by halves; keep the refused apart."""
        if len(records) == 1:
            self._reject(records[0], refusal)
            return BatchResult()
        middle = len(records) // 2
        results = []
        for half in (records[:middle], records[middle:]):
            try:
                results.append(self._write_once(half))
            except Exception as exc:
                if not is_refusal(exc):
                    raise  # an outage in the middle: the caller spools the batch; writes are idempotent
                results.append(self._write_isolating(half, exc))
        return BatchResult(
            inserted=sum(r.inserted for r in results),
            revised=sum(r.revised for r in results),
            reclassified=sum(r.reclassified for r in results),
            before_cutoff=sum(r.before_cutoff for r in results),
        )

    def _reject(self, record: AttemptRecord, refusal: Exception) -> None:
        reason = refusal_reason(refusal)
        with self.engine.begin() as connection:
            insert_rejected(connection, [rejected_row(record, reason, datetime.now(timezone.utc))])
        with self._lock:
            self.rejected_records += 1
            first = not self._rejection_logged
            self._rejection_logged = True
        if first:
            log.error(
                "costwatch: the database refused attempt record %s (%s); it is kept in "
                "costwatch_rejected_attempts and never retried; the rest of its batch was written "
                "(further refusals are only counted, see `costwatch report`)",
                clean_text(record.attempt_id)[:64],
                reason,
            )

    def rejected(self, limit: int = 20) -> tuple[int, list[RejectedRecord]]:
        """How many records the database refused (all processes), and the latest ``limit`` of them."""
        table = REJECTED_ATTEMPTS
        with self._read() as connection:
            total = int(connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())
            rows = connection.execute(
                sa.select(table.c.attempt_id, table.c.revision, table.c.rejected_at, table.c.reason)
                .order_by(table.c.rejected_at.desc(), table.c.attempt_id)
                .limit(limit)
            ).mappings()
            return total, [RejectedRecord(**row) for row in rows]

    def shutdown(self) -> None:
        """Close the database connections."""
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    # -- retention ---------------------------------------------------------------------------
    def prune_before(
        self,
        moment: datetime,
        *,
        batch: int = PRUNE_BATCH,
        lock_wait_s: float | None = None,
        on_wait: Callable[[float], object] | None = None,
    ) -> int:
        """Remove raw attempt rows that started before ``moment``; rollups are kept. Returns the count.

        PostgreSQL detaches the day partitions wholly before ``moment`` (their disk space comes back
        at :meth:`drop_pruned`); what is left before it is deleted in transactions of at most
        ``batch`` rows, so writers beside it wait for one short transaction at a time (on SQLite,
        the write lock), never for the whole prune. Idempotent: a second call removes nothing. From
        then on the store keeps records that started before ``moment`` out of the attempts and the
        rollups (see ``costwatch.store.retention``). While other sessions hold the attempts table (a
        long read), the detach is tried again, holding writers at most 0.1 s a try, for up to
        ``lock_wait_s`` (default ``retention.PRUNE_LOCK_WAIT_S``, 5 min); then ``PruneLockTimeout``
        with nothing pruned (``on_wait`` is told at the first such try).
        """
        return prune_before(self.engine, moment, batch=batch, lock_wait_s=lock_wait_s, on_wait=on_wait)

    def drop_pruned(self) -> int:
        """Drop the day partitions that prunes detached, giving their disk space back (PostgreSQL;
        ``0`` on SQLite); returns the bytes. Run after :meth:`prune_before` (``costwatch db prune``
        and ``costwatch serve`` do); blocks no writer, and takes longer the more the days held."""
        return drop_pruned(self.engine)

    # -- the read side -----------------------------------------------------------------------
    def rollup_totals(
        self,
        start: datetime | None = None,
        end: datetime | None = None,
        *,
        group_by: Sequence[str] = (),
        where: Mapping[str, str | Sequence[str]] | None = None,
    ) -> list[RollupTotals]:
        """Sums from the hourly rollups for hours in ``[start, end)``, one entry per group.

        ``group_by`` and the keys of ``where`` are rollup dimensions: ``hour``, ``model``,
        ``outcome``, ``error_type``, ``waste_reason``, ``workflow``, ``platform``. With no
        ``group_by`` the result is one overall total (or nothing if no attempt matched).
        """
        query = rollup_totals_query(start, end, group_by=group_by, where=where)
        with self._read() as connection:
            return read_rollup_totals(connection, query, group_by)

    def retried_requests(
        self, start: datetime | None = None, end: datetime | None = None
    ) -> dict[str, list[AttemptRecord]]:
        """Every attempt of the logical requests with a retry that started in ``[start, end)``, by request.

        Reads the attempts table (not the rollups), scanning it by start time: for reports, not for
        every scrape.
        """
        retried = sa.select(ATTEMPTS.c.logical_request_id).where(ATTEMPTS.c.attempt_number > 1)
        if start is not None:
            retried = retried.where(ATTEMPTS.c.started_at >= start)
        if end is not None:
            retried = retried.where(ATTEMPTS.c.started_at < end)
        query = sa.select(ATTEMPTS).where(ATTEMPTS.c.logical_request_id.in_(retried.distinct()))
        requests: dict[str, list[AttemptRecord]] = {}
        with self._read() as connection:
            for row in connection.execute(query).mappings():
                record = record_from_row(row)
                requests.setdefault(record.logical_request_id, []).append(record)
        return requests

    def retried_prompts(
        self, start: datetime | None = None, end: datetime | None = None
    ) -> tuple[list[RetriedAlike], dict[str, RetriedRequest]]:
        """What the report's avoidable waste reads of the requests retried in ``[start, end)``: those
        with nothing to price one by one, summed, and the others by logical request, with their
        attempts' prompts (``costwatch.store.retried``). All time from the summaries the writer
        keeps, a range grouped in the database: for reports at any size."""
        with self._read() as connection:
            return retried_prompts(connection, start, end)

    def attempt(self, attempt_id: str) -> AttemptRecord | None:
        """The stored (latest) revision of one attempt, or ``None``."""
        with self._read() as connection:
            row = connection.execute(
                sa.select(ATTEMPTS).where(ATTEMPTS.c.attempt_id == attempt_id)
            ).mappings()
            found = row.first()
            if found is None:
                return None
            chars = connection.execute(
                sa.select(CALIBRATION_SAMPLES.c.chars).where(CALIBRATION_SAMPLES.c.attempt_id == attempt_id)
            ).scalar()
        record = record_from_row(found)
        # The output characters live with the calibration samples, not in the attempts table.
        return dataclasses.replace(record, output_chars=MappingProxyType(_chars(chars))) if chars else record

    def attempt_count(self) -> int:
        """How many raw attempt rows the store holds."""
        with self._read() as connection:
            return int(connection.execute(sa.select(sa.func.count()).select_from(ATTEMPTS)).scalar_one())

    def _read(self) -> sa.Connection:
        return self.engine.connect().execution_options(**{READ_ONLY_OPTION: True})

    def _after_fork_in_child(self) -> None:
        # Pooled connections belong to the parent; the child must open its own.
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._lock = threading.Lock()


@functools.cache
def _estimated_queries(by_until: bool, by_models: bool) -> tuple[sa.Select[Any], sa.Select[Any]]:
    """:meth:`SqlStore.estimated_attempts`' two reads, built once with named parameters: a pass of the
    estimate revision (at every flush) then binds its values, and SQLAlchemy neither builds nor keys
    a statement for it (that was most of what a pass that finds nothing cost the writer)."""
    table = CALIBRATION_SAMPLES
    moment = table.c.started_at.type
    wanted = [
        table.c.output_tokens.is_(None),
        table.c.started_at >= sa.bindparam("since", type_=moment),
        table.c.sample_id > sa.bindparam("after"),
    ]
    if by_until:
        wanted.append(table.c.sample_id <= sa.bindparam("until"))
    if by_models:
        wanted.append(table.c.model.in_(sa.bindparam("models", expanding=True)))
    page_ids = (
        sa.select(table.c.sample_id).where(*wanted).order_by(table.c.sample_id).limit(sa.bindparam("limit"))
    )
    page_rows = (
        sa.select(table.c.sample_id, table.c.chars, ATTEMPTS)
        # By start time too: on PostgreSQL the attempts are partitioned by day (only the window's
        # partitions are read) and keyed by attempt and start time.
        .join(
            ATTEMPTS,
            sa.and_(
                ATTEMPTS.c.attempt_id == table.c.attempt_id,
                ATTEMPTS.c.started_at == table.c.started_at,
            ),
        )
        .where(
            table.c.sample_id.in_(sa.bindparam("ids", expanding=True)),
            ATTEMPTS.c.started_at >= sa.bindparam("since", type_=moment),
            ATTEMPTS.c.output_estimated.is_(True),
        )
        .order_by(table.c.sample_id)
    )
    return page_ids, page_rows


class _OpenFile(NamedTuple):
    """A SQLite database file and the (device, inode) it had when its connections were opened."""

    path: str
    identity: tuple[int, int] | None


def _sqlite_file(url: URL) -> _OpenFile | None:
    """The store's SQLite file as it is now; None for PostgreSQL and in-memory SQLite."""
    path = sqlite_path(url)
    if path is None:
        return None
    path = os.path.abspath(path)
    return _OpenFile(path, _file_identity(path))


def _file_identity(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _chars(value: object) -> dict[str, int]:
    """Counts read back from JSON, anything unusable left out (a sample is advice, never trusted blindly)."""
    if not isinstance(value, Mapping):
        return {}
    return {
        str(key): count
        for key, count in value.items()
        if isinstance(count, int) and not isinstance(count, bool) and count > 0
    }


def _reset_stores_in_child() -> None:
    global _writer_id
    _writer_id = _new_writer_id()
    for store in list(_live_stores):
        store._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_stores_in_child)
