"""Find attempts by fingerprint through indexes that grow where the new attempts are.

The index on ``fingerprint`` alone was keyed by a hash: every attempt written dirtied a page of its
own somewhere in it, and at a million attempts that index was most of what a batch wrote to disk.
The writer looks attempts up by fingerprint in two ways only, and each now has its own index:

* abandoned attempts whose retry may be landing (``waste_reason = 'abandoned'``): a partial index,
  small, since most failed attempts become ``retried`` soon after;
* attempts that started in given hours, whose fingerprint an abandoned attempt landing now may
  share: keyed by the UTC hour of ``started_at`` first, so new entries go next to each other.

Building the new indexes reads the whole table once (seconds at a million attempts; PostgreSQL
blocks writes to the table meanwhile). A writer of an older costwatch still works on the migrated
database, but its lookups by fingerprint find no index and read the whole table: upgrade every
writer of a database when migrating it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 00:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the expressions the store's models use (costwatch.store.schema.utc_hour).
_UTC_HOUR = {
    "sqlite": "substr(started_at, 1, 13)",
    "postgresql": "date_trunc('hour'::text, (started_at AT TIME ZONE 'UTC'::text))",
}
_ABANDONED = "waste_reason = 'abandoned'"


def upgrade() -> None:
    """Replace ``ix_costwatch_attempts_fingerprint`` by the abandoned and by-hour fingerprint indexes."""
    op.create_index(
        "ix_costwatch_attempts_abandoned_fingerprint",
        "costwatch_attempts",
        ["fingerprint"],
        sqlite_where=sa.text(_ABANDONED),
        postgresql_where=sa.text(_ABANDONED),
    )
    backend = op.get_bind().dialect.name
    if backend not in _UTC_HOUR:
        raise NotImplementedError(f"costwatch's store supports SQLite and PostgreSQL, not {backend}")
    op.create_index(
        "ix_costwatch_attempts_hour_fingerprint",
        "costwatch_attempts",
        [sa.text(_UTC_HOUR[backend]), "fingerprint"],
    )
    op.drop_index("ix_costwatch_attempts_fingerprint", table_name="costwatch_attempts")


def downgrade() -> None:
    """Create ``ix_costwatch_attempts_fingerprint`` again and drop the two that replaced it."""
    op.create_index("ix_costwatch_attempts_fingerprint", "costwatch_attempts", ["fingerprint"])
    op.drop_index("ix_costwatch_attempts_hour_fingerprint", table_name="costwatch_attempts")
    op.drop_index("ix_costwatch_attempts_abandoned_fingerprint", table_name="costwatch_attempts")
