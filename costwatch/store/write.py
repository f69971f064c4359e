"""Writing one batch of attempt records in one transaction: rows, reclassifications and rollups.

The rules, all applied inside the caller's transaction so that rows and rollups never disagree:

* a new attempt is inserted (insert-or-ignore on ``attempt_id``, so redelivery is harmless);
* a higher ``revision`` of a stored attempt replaces the row, and the rollups move by the difference;
* a stored attempt marked ``abandoned`` whose retry has now arrived (same logical request, or same
  fingerprint, started within the retry window after the failed attempt ended) becomes ``retried``,
  whichever process wrote either of them;
* rollup rows are upserted in key order, so concurrent writers lock them in the same order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..records import AttemptRecord, WasteReason
from .rows import RollupKey, attempt_row, record_from_row, rollup_deltas, rollup_row
from .schema import ATTEMPTS, ROLLUP_DIMENSIONS, ROLLUP_MEASURES, ROLLUPS

__all__ = ["BatchResult", "latest_revisions", "write_batch"]

_IN_CHUNK = 500
"""Bound on the values in one ``IN (...)`` list (SQLite limits bound parameters per statement)."""


@dataclass(frozen=True)
class BatchResult:
    """What one batch changed in the store."""

    inserted: int = 0
    """Attempts that were new to the store."""
    revised: int = 0
    """Stored attempts replaced by a higher revision from the batch."""
    reclassified: int = 0
    """Stored ``abandoned`` attempts turned ``retried`` because their retry arrived."""


def latest_revisions(records: Iterable[AttemptRecord]) -> list[AttemptRecord]:
    """One record per attempt, the highest revision, ordered by ``attempt_id`` (the lock order)."""
    latest: dict[str, AttemptRecord] = {}
    for record in records:
        seen = latest.get(record.attempt_id)
        if seen is None or record.revision > seen.revision:
            latest[record.attempt_id] = record
    return [latest[key] for key in sorted(latest)]


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


def _insert(connection: sa.Connection) -> Any:
    name = connection.dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise NotImplementedError(f"costwatch's store supports SQLite and PostgreSQL, not {name}")


def _select_rows(connection: sa.Connection, where: sa.ColumnElement[bool]) -> list[AttemptRecord]:
    query = sa.select(ATTEMPTS).where(where).order_by(ATTEMPTS.c.attempt_id).with_for_update()
    return [record_from_row(row) for row in connection.execute(query).mappings()]


def _insert_new(connection: sa.Connection, records: Sequence[AttemptRecord]) -> set[str]:
    insert = _insert(connection)
    statement = (
        insert(ATTEMPTS)
        .on_conflict_do_nothing(index_elements=["attempt_id"])
        .returning(ATTEMPTS.c.attempt_id)
    )
    result = connection.execute(statement, [attempt_row(record) for record in records])
    return set(result.scalars())


def _apply_revisions(
    connection: sa.Connection, records: Sequence[AttemptRecord]
) -> tuple[list[AttemptRecord], list[AttemptRecord]]:
    """Replace stored attempts with higher revisions; returns (new revisions, replaced revisions)."""
    incoming = {record.attempt_id: record for record in records}
    added: list[AttemptRecord] = []
    removed: list[AttemptRecord] = []
    for ids in _chunks(sorted(incoming)):
        for stored in _select_rows(connection, ATTEMPTS.c.attempt_id.in_(ids)):
            record = incoming[stored.attempt_id]
            if record.revision <= stored.revision:
                continue
            row = attempt_row(record)
            del row["attempt_id"]
            connection.execute(
                sa.update(ATTEMPTS).where(ATTEMPTS.c.attempt_id == record.attempt_id).values(row)
            )
            added.append(record)
            removed.append(stored)
    return added, removed


def _is_retry_of(later: AttemptRecord, abandoned: AttemptRecord, window: timedelta) -> bool:
    if later.attempt_id == abandoned.attempt_id:
        return False
    # The window runs from the end of the failed attempt: a stream may run for many minutes
    # before it drops, and its retry can only start after that.
    if later.started_at > abandoned.started_at + timedelta(seconds=abandoned.duration_s) + window:
        return False
    if later.logical_request_id == abandoned.logical_request_id:
        return (later.started_at, later.attempt_number) > (abandoned.started_at, abandoned.attempt_number)
    # The same request sent again by a process that lost track of the first one (a restart, a
    # different worker): a retry only when it follows closely, or every repeat would count.
    return (
        abandoned.fingerprint is not None
        and later.fingerprint == abandoned.fingerprint
        and abandoned.started_at < later.started_at
    )


def _ended_since(connection: sa.Connection, since: datetime) -> sa.ColumnElement[bool]:
    """Rows of attempts that ended (``started_at + duration_s``) at or after ``since``."""
    if connection.dialect.name == "postgresql":
        ended = ATTEMPTS.c.started_at + ATTEMPTS.c.duration_s * sa.literal_column("interval '1 second'")
        return ended >= since
    # SQLite keeps timestamps as text; julianday() reads them as (fractional) days. A second of
    # slack absorbs its rounding; _is_retry_of decides exactly.
    bound = sa.func.julianday(sa.literal(since - timedelta(seconds=1), ATTEMPTS.c.started_at.type))
    return sa.func.julianday(ATTEMPTS.c.started_at) + ATTEMPTS.c.duration_s / 86400.0 >= bound


def _keys_match(records: Sequence[AttemptRecord], recent: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
    """Rows sharing a logical request with ``records``, or a fingerprint with ``recent`` true."""
    request_ids = sorted({record.logical_request_id for record in records})
    fingerprints = sorted({record.fingerprint for record in records if record.fingerprint is not None})
    clauses: list[sa.ColumnElement[bool]] = [
        ATTEMPTS.c.logical_request_id.in_(ids) for ids in _chunks(request_ids)
    ]
    clauses += [sa.and_(ATTEMPTS.c.fingerprint.in_(fps), recent) for fps in _chunks(fingerprints)]
    return sa.or_(*clauses) if clauses else sa.false()


def _reclassify_retried(
    connection: sa.Connection, landed: Sequence[AttemptRecord], window: timedelta
) -> tuple[list[AttemptRecord], list[AttemptRecord]]:
    """Turn stored ``abandoned`` attempts whose retry is now stored into ``retried``."""
    if not landed:
        return [], []
    since = min(record.started_at for record in landed) - window
    abandoned = _select_rows(
        connection,
        sa.and_(
            ATTEMPTS.c.wasted.is_(True),
            ATTEMPTS.c.waste_reason == WasteReason.ABANDONED.value,
            _keys_match(landed, _ended_since(connection, since)),
        ),
    )
    if not abandoned:
        return [], []
    landed_ids = {record.attempt_id for record in landed}
    # A newly landed abandoned attempt may be the one whose retry was stored first, by another process.
    new_abandoned = [record for record in abandoned if record.attempt_id in landed_ids]
    others: list[AttemptRecord] = []
    if new_abandoned:
        # Their retries started after them, so after ``since``.
        query = sa.select(ATTEMPTS).where(_keys_match(new_abandoned, ATTEMPTS.c.started_at >= since))
        others = [record_from_row(row) for row in connection.execute(query).mappings()]
    candidates = {record.attempt_id: record for record in [*others, *landed]}.values()
    added: list[AttemptRecord] = []
    removed: list[AttemptRecord] = []
    for stored in abandoned:
        if not any(_is_retry_of(later, stored, window) for later in candidates):
            continue
        retried = stored.with_waste(WasteReason.RETRIED)
        connection.execute(
            sa.update(ATTEMPTS)
            .where(ATTEMPTS.c.attempt_id == stored.attempt_id)
            .values(wasted=True, waste_reason=WasteReason.RETRIED.value, revision=retried.revision)
        )
        added.append(retried)
        removed.append(stored)
    return added, removed


def _apply_rollups(connection: sa.Connection, deltas: dict[RollupKey, dict[str, float]]) -> None:
    if not deltas:
        return
    insert = _insert(connection)
    statement = insert(ROLLUPS)
    statement = statement.on_conflict_do_update(
        index_elements=list(ROLLUP_DIMENSIONS),
        set_={name: ROLLUPS.c[name] + statement.excluded[name] for name in ROLLUP_MEASURES},
    )
    connection.execute(statement, [rollup_row(key, deltas[key]) for key in sorted(deltas)])


def _request_key(kind: str, value: str) -> int:
    digest = hashlib.blake2b(f"costwatch:{kind}:{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _lock_requests(connection: sa.Connection, records: Sequence[AttemptRecord]) -> None:
    """On PostgreSQL, serialise writers of the same logical request or fingerprint.

    Under READ COMMITTED, an abandoned attempt and its retry written at the same moment by two
    processes would each miss the other's uncommitted row, and the attempt would stay abandoned.
    Transaction-scoped advisory locks, taken in one sorted order (so never deadlocking), make the
    second writer wait and then see the first. SQLite needs none: ``BEGIN IMMEDIATE`` already
    serialises writers.
    """
    if connection.dialect.name != "postgresql":
        return
    keys = {_request_key("request", record.logical_request_id) for record in records}
    keys |= {_request_key("fingerprint", record.fingerprint) for record in records if record.fingerprint}
    connection.execute(
        sa.text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:keys AS bigint[])) AS t(k)"),
        {"keys": sorted(keys)},
    )


def write_batch(
    connection: sa.Connection, records: Sequence[AttemptRecord], *, retry_window: timedelta
) -> BatchResult:
    """Write ``records`` inside the caller's open transaction and keep the rollups in step."""
    batch = latest_revisions(records)
    if not batch:
        return BatchResult()
    _lock_requests(connection, batch)
    inserted_ids = _insert_new(connection, batch)
    inserted = [record for record in batch if record.attempt_id in inserted_ids]
    revised, replaced = _apply_revisions(connection, [r for r in batch if r.attempt_id not in inserted_ids])
    retried, abandoned = _reclassify_retried(connection, [*inserted, *revised], retry_window)
    _apply_rollups(connection, rollup_deltas([*inserted, *revised, *retried], [*replaced, *abandoned]))
    return BatchResult(inserted=len(inserted), revised=len(revised), reclassified=len(retried))
