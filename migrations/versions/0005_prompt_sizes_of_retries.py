"""The sizes of a retry's prompt and of its stable prefix, for the avoidable waste of prompt caching.

Two nullable columns on ``costwatch_attempts``: attempts stored before this migration (and first
attempts, whose sizes are never measured) have NULL, which the report reads as "not known".

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 06:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Plain ALTER TABLE on both backends (SQLite has ADD and DROP COLUMN since 3.35): a batch copy of
# the table would take its expression index of migration 0004 with it.
def upgrade() -> None:
    op.add_column("costwatch_attempts", sa.Column("prompt_bytes", sa.BigInteger(), nullable=True))
    op.add_column("costwatch_attempts", sa.Column("stable_prefix_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("costwatch_attempts", "stable_prefix_bytes")
    op.drop_column("costwatch_attempts", "prompt_bytes")
