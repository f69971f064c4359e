"""Keeping reconciliations: the rows of a ``costwatch reconcile`` run, and the attempts the bill corrected.

A run replaces, in one transaction, every stored row of its window, bucket width and API-key scope
with the rows it computed, so reconciling the same buckets again (as ``--watch`` does while the
API's data settles) leaves exactly one row per bucket and model, with the latest figures. In the
same transaction the dropped attempts whose estimates the bill corrected get their new revisions
(through the writer's own path, so the rollups move with them) and their calibration samples the
billed output: a run is stored whole or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import sqlalchemy as sa

from ..records import AttemptRecord
from .schema import RECONCILIATIONS
from .write import reconcile_calibration_samples, write_batch

__all__ = ["AttemptsChanged", "scope_of", "write_reconciliation"]


class AttemptsChanged(Exception):
    """An attempt the bill corrected was revised by another writer since it was read: the run's
    transaction is rolled back, and reading again gives a consistent picture."""


def scope_of(api_key_ids: Sequence[str]) -> str:
    """The stored scope of a run: its API key ids, sorted and comma-joined (``""``: the organization)."""
    return ",".join(sorted(set(api_key_ids)))


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def write_reconciliation(
    connection: sa.Connection,
    result: Mapping[str, Any],
    *,
    reconciled_at: datetime,
    revisions: Sequence[AttemptRecord] = (),
    retry_window: timedelta = timedelta(0),
    writer: str = "",
) -> int:
    """Store ``result`` (:func:`costwatch.reconcile.reconcile`'s dict) in the caller's transaction,
    replacing the rows of its window, with the ``revisions`` of the attempts the bill corrected
    (stored as the writer stores any revision; ``retry_window`` as the writer's) and their calibration
    samples (marked as ``writer``'s); returns the rows written. Raises :class:`AttemptsChanged`,
    having written nothing the caller cannot roll back, if a revision was not the next of its attempt.
    """
    if revisions:
        written = write_batch(connection, revisions, retry_window=retry_window)
        if written.revised != len(revisions):
            raise AttemptsChanged(
                f"{len(revisions) - written.revised} of the attempts the bill corrected changed meanwhile"
            )
        reconcile_calibration_samples(connection, revisions, writer)
    scope = scope_of(result["api_key_ids"])
    table = RECONCILIATIONS
    connection.execute(
        sa.delete(table).where(
            table.c.bucket == result["bucket"],
            table.c.scope == scope,
            table.c.bucket_start >= _moment(result["start"]),
            table.c.bucket_start < _moment(result["end"]),
        )
    )
    rows = [
        {
            "bucket_start": _moment(row["bucket_start"]),
            "bucket": result["bucket"],
            "model": row["model"],
            "scope": scope,
            "reported_input_tokens": row["reported"]["input_tokens"],
            "reported_cache_read_tokens": row["reported"]["cache_read_tokens"],
            "reported_cache_write_tokens": row["reported"]["cache_write_tokens"],
            "reported_output_tokens": row["reported"]["output_tokens"],
            "reported_requests": row["reported"]["requests"],
            "reported_cost_usd": row["reported"]["cost_usd"],
            "recorded_input_tokens": row["recorded"]["input_tokens"],
            "recorded_cache_read_tokens": row["recorded"]["cache_read_tokens"],
            "recorded_cache_write_tokens": row["recorded"]["cache_write_tokens"],
            "recorded_output_tokens": row["recorded"]["output_tokens"],
            "recorded_output_estimated_tokens": row["recorded"]["output_estimated_tokens"],
            "unseen_cost_usd": row["unseen"]["usd"],
            "residual_output_tokens": row["dropped_output"]["residual_tokens"],
            "reconciled_at": reconciled_at,
            "correction": row["correction"]["status"],
            "correction_reason": row["correction"]["reason"],
            "corrected_attempts": row["correction"]["attempts"],
            "dropped_estimated_output_tokens": row["dropped_output"]["estimated_tokens"],
            "estimated_wasted_cost_usd": row["correction"]["wasted_usd_at_estimate"],
            "billed_wasted_cost_usd": row["correction"]["wasted_usd_at_bill"],
        }
        for row in result["rows"]
    ]
    if rows:
        connection.execute(sa.insert(table), rows)
    return len(rows)
