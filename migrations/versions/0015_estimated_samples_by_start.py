"""Estimated attempts by start time: the revision pass finds a window's estimates without a scan.

A dropped attempt's character counts are kept as a calibration sample with ``output_tokens`` NULL
(migration 0009). As the fleet's calibration improves, costwatch re-estimates the dropped attempts
of the last ``COSTWATCH_REVISION_WINDOW`` seconds and writes a new revision of those whose estimate
moved materially (docs/estimation.md). This partial index holds only those samples, by start time:
completed samples, the bulk of the table, are never revised.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03 09:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_costwatch_calibration_samples_estimated_started_at"


def upgrade() -> None:
    """Create the partial index of estimated samples by ``started_at``."""
    op.create_index(
        _INDEX,
        "costwatch_calibration_samples",
        ["started_at"],
        sqlite_where=sa.text("output_tokens IS NULL"),
        postgresql_where=sa.text("output_tokens IS NULL"),
    )


def downgrade() -> None:
    """Drop the index."""
    op.drop_index(_INDEX, table_name="costwatch_calibration_samples")
