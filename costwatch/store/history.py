"""Reading the raw attempt rows: a window's attempts in pages, and one logical request's attempts.

Reports read the rollups; these reads are for what the rollups cannot answer: grouping or filtering
by any tag, pricing history with another price table, the logical requests that wasted the most,
and one request's timeline. Attempts are not indexed by time (only retention reads them so), so a
window read scans the table; it is done in pages of ``page_size`` rows by ``attempt_id``, so memory
stays flat however large the store is.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import sqlalchemy as sa

from ..records import AttemptRecord
from .rows import record_from_row
from .schema import ATTEMPTS

__all__ = ["attempts_of_request", "iter_attempts"]


def iter_attempts(
    connection: sa.Connection,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    wasted_only: bool = False,
    after: str = "",
    page_size: int = 2000,
) -> Iterator[list[AttemptRecord]]:
    """The stored attempts that started in ``[start, end)``, in pages ordered by ``attempt_id``.

    ``wasted_only`` keeps the wasted ones; ``after`` starts past that ``attempt_id`` (to resume).
    """
    conditions: list[sa.ColumnElement[bool]] = []
    if start is not None:
        conditions.append(ATTEMPTS.c.started_at >= start)
    if end is not None:
        conditions.append(ATTEMPTS.c.started_at < end)
    if wasted_only:
        conditions.append(ATTEMPTS.c.wasted.is_(True))
    while True:
        query = (
            sa.select(ATTEMPTS)
            .where(ATTEMPTS.c.attempt_id > after, *conditions)
            .order_by(ATTEMPTS.c.attempt_id)
            .limit(page_size)
        )
        page = [record_from_row(row) for row in connection.execute(query).mappings()]
        if not page:
            return
        yield page
        after = page[-1].attempt_id


def attempts_of_request(connection: sa.Connection, logical_request_ids: list[str]) -> list[AttemptRecord]:
    """Every stored attempt of these logical requests, in the order they were made."""
    if not logical_request_ids:
        return []
    query = sa.select(ATTEMPTS).where(ATTEMPTS.c.logical_request_id.in_(logical_request_ids))
    records = [record_from_row(row) for row in connection.execute(query).mappings()]
    return sorted(records, key=lambda r: (r.logical_request_id, r.started_at, r.attempt_number, r.attempt_id))
