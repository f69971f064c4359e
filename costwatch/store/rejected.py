"""Records the database refuses: telling a refusal from an outage, and the dead-letter rows they become.

An outage (connection refused, timeout, lock) fails every record alike and is waited out through
the spool. A refusal (a value the database cannot store) fails one record every time it is tried, so
retrying it would stall its batch, and every batch spooled behind it, forever. The store isolates
such a record by bisecting its batch and keeps it in ``costwatch_rejected_attempts`` with the
database's reason, where replay never looks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..records import AttemptRecord
from ..validation import clean_text
from .schema import REJECTED_ATTEMPTS, insert_of

__all__ = ["RejectedRecord", "insert_rejected", "is_refusal", "refusal_reason", "rejected_row"]

_MAX_REASON = 500
_INT32 = 2**31 - 1


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` means the database refused a value, rather than that it is unreachable."""
    if isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError)):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        return False  # operational, interface, internal: the database or the link, not the data
    if isinstance(exc, sa.exc.StatementError) and exc.orig is not None:
        exc = exc.orig
    # Raised while binding, before the database saw anything (e.g. SQLite and an int beyond 64 bits).
    return isinstance(exc, (OverflowError, ValueError, TypeError))


def refusal_reason(exc: BaseException) -> str:
    """The database's reason in one line: the driver's error class and first line, never the SQL."""
    cause = exc.orig if isinstance(exc, sa.exc.StatementError) and exc.orig is not None else exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return clean_text(f"{type(cause).__name__}: {text}")[:_MAX_REASON]


def rejected_row(record: AttemptRecord, reason: str, now: datetime) -> dict[str, Any]:
    """The ``costwatch_rejected_attempts`` row for a refused record."""
    return {
        "attempt_id": clean_text(str(record.attempt_id))[:200],
        "revision": max(-_INT32, min(_INT32, int(record.revision))),
        "rejected_at": now,
        "reason": reason,
        # ASCII-escaped JSON: a NUL or a surrogate becomes a \\u escape, text every backend stores.
        "record": json.dumps(record.to_dict(), ensure_ascii=True, default=str),
    }


def insert_rejected(connection: sa.Connection, rows: list[dict[str, Any]]) -> None:
    """Insert dead-letter rows, ignoring any already kept (a refused record delivered again)."""
    dialect = connection.dialect.name
    insert = insert_of(dialect)
    connection.execute(insert(REJECTED_ATTEMPTS).on_conflict_do_nothing(), rows)


@dataclass(frozen=True)
class RejectedRecord:
    """One dead-letter row, as reports show it (the record's JSON is left in the table)."""

    attempt_id: str
    revision: int
    rejected_at: datetime
    reason: str
