"""Drop the index on attempts' start time: nothing reads by it, and every insert paid for it.

Reports, the fleet exporter and the dashboards read the hourly rollups; the writer finds attempts by
logical request and fingerprint. Only retention (``SqlStore.prune_before``) filters raw attempts by
``started_at``, and a rare full scan there costs less than a random index insert per attempt. On
PostgreSQL the index also led the planner to scan a whole time range while looking for the retries
of a few abandoned attempts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 21:25:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Drop ``ix_costwatch_attempts_started_at``."""
    op.drop_index(op.f("ix_costwatch_attempts_started_at"), table_name="costwatch_attempts")


def downgrade() -> None:
    """Create ``ix_costwatch_attempts_started_at`` again."""
    op.create_index(op.f("ix_costwatch_attempts_started_at"), "costwatch_attempts", ["started_at"])
