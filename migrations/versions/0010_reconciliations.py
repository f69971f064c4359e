"""Reconciliations: Anthropic's usage figures beside the store's, per time bucket and model.

Adds ``costwatch_reconciliations``, written by ``costwatch reconcile`` (one row per bucket, bucket
width, model and API-key scope; reconciling a bucket again replaces its row) and read by
``costwatch serve``.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 07:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "costwatch_reconciliations",
        sa.Column("bucket_start", _TIMESTAMP, nullable=False),
        sa.Column("bucket", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("scope", sa.String(), nullable=False),
        sa.Column("reported_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reported_cache_read_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reported_cache_write_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reported_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reported_requests", sa.BigInteger(), nullable=False),
        sa.Column("reported_cost_usd", sa.Double(), nullable=True),
        sa.Column("recorded_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("recorded_cache_read_tokens", sa.BigInteger(), nullable=False),
        sa.Column("recorded_cache_write_tokens", sa.BigInteger(), nullable=False),
        sa.Column("recorded_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("recorded_output_estimated_tokens", sa.BigInteger(), nullable=False),
        sa.Column("unseen_cost_usd", sa.Double(), nullable=True),
        sa.Column("residual_output_tokens", sa.BigInteger(), nullable=True),
        sa.Column("reconciled_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint(
            "bucket_start", "bucket", "model", "scope", name=op.f("pk_costwatch_reconciliations")
        ),
    )


def downgrade() -> None:
    op.drop_table("costwatch_reconciliations")
