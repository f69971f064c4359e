"""Calibration samples: the characters and output tokens of measured attempts, shared by the fleet.

Every process loads the fleet's calibration of the output estimator from this table at
``instrument()`` and refreshes it as other processes add samples, so a new process estimates the
output of a dropped stream as well as a long-running one. Rows hold counts only, never text. A
writer of an older costwatch does not know the table and simply adds no samples.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 06:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``costwatch_calibration_samples``."""
    op.create_table(
        "costwatch_calibration_samples",
        sa.Column(
            "sample_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("attempt_id", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=True),
        sa.Column("chars", sa.JSON(), nullable=False),
        sa.Column("writer", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("sample_id", name=op.f("pk_costwatch_calibration_samples")),
        sa.UniqueConstraint("attempt_id", name=op.f("uq_costwatch_calibration_samples_attempt_id")),
    )


def downgrade() -> None:
    """Drop ``costwatch_calibration_samples``."""
    op.drop_table("costwatch_calibration_samples")
