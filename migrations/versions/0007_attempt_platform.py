"""The platform each attempt went to: the first-party API, Bedrock, Vertex or Foundry.

Adds ``costwatch_attempts.platform``; rows written before read ``anthropic``, the only platform
costwatch recognised then.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 06:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "costwatch_attempts",
        sa.Column("platform", sa.String(), nullable=False, server_default="anthropic"),
    )


def downgrade() -> None:
    # Plain ALTER TABLE, which SQLite (3.35+) and PostgreSQL both run: a batch copy of the table
    # would lose the expression indexes of migration 0004 on SQLite, which cannot reflect them.
    op.execute("ALTER TABLE costwatch_attempts DROP COLUMN platform")
