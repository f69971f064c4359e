"""Keeping reconciliations: the rows of a ``costwatch reconcile`` run, and the recent ones for the exporter.

A run replaces, in one transaction, every stored row of its window, bucket width and API-key scope
with the rows it computed, so reconciling the same buckets again (as ``--watch`` does while the
API's data settles) leaves exactly one row per bucket and model, with the latest figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa

from .schema import RECONCILIATIONS

__all__ = ["scope_of", "write_reconciliation"]


def scope_of(api_key_ids: Sequence[str]) -> str:
    """The stored scope of a run: its API key ids, sorted and comma-joined (``""``: the organization)."""
    return ",".join(sorted(set(api_key_ids)))


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def write_reconciliation(
    connection: sa.Connection, result: Mapping[str, Any], *, reconciled_at: datetime
) -> int:
    """Store ``result`` (:func:`costwatch.reconcile.reconcile`'s dict) in the caller's transaction,
    replacing the rows of its window; returns the rows written."""
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
        }
        for row in result["rows"]
    ]
    if rows:
        connection.execute(sa.insert(table), rows)
    return len(rows)
