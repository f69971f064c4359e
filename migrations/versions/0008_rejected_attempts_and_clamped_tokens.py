"""Refused records and clamped token counts: a dead-letter table, and a flag on attempts.

``costwatch_rejected_attempts`` keeps each attempt record the database refused (a value it cannot
store), with the database's reason, so one bad record no longer fails its whole batch forever.
``costwatch_attempts.tokens_clamped`` marks attempts whose absurd token counts were clamped when the
record was built; existing rows were never clamped, hence the server default.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 06:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``costwatch_rejected_attempts`` and add ``costwatch_attempts.tokens_clamped``."""
    op.create_table(
        "costwatch_rejected_attempts",
        sa.Column("attempt_id", sa.String(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("attempt_id", "revision", name=op.f("pk_costwatch_rejected_attempts")),
    )
    # A plain ADD COLUMN on both backends (no batch copy of a table that may hold millions of rows).
    op.add_column(
        "costwatch_attempts",
        sa.Column("tokens_clamped", sa.Boolean(), server_default=sa.false(), nullable=False),
    )


def downgrade() -> None:
    """Drop the flag and the dead-letter table (the refused records in it are lost)."""
    op.drop_column("costwatch_attempts", "tokens_clamped")
    op.drop_table("costwatch_rejected_attempts")
