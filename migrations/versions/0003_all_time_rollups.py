"""All-time rollups: the hourly rollups summed over every hour, kept by the writer, filled from them now.

A fleet scrape groups the rollups by five dimensions over all time; at a million attempts that is
a grouping of ~200,000 hourly rows per scrape. The writer now keeps that grouping as a table of its
own (moved by the same deltas, in the same transaction, as the hourly rollups), and this migration
fills it from the hourly rollups already stored, in one ``INSERT ... SELECT ... GROUP BY``.

A writer of an older costwatch does not know the table: upgrade every writer of a database before
(or when) migrating it, or their attempts reach the hourly rollups only.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 21:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the names and types: a migration must not change when the models do later.
_TIMESTAMP = sa.DateTime(timezone=True)
_DIMENSIONS = ("model", "outcome", "error_type", "waste_reason", "workflow")
_COUNTS = (
    "attempts",
    "dropped_attempts",
    "logical_requests_started",
    "billed_input_tokens",
    "billed_output_tokens",
    "billed_cache_read_tokens",
    "billed_cache_write_tokens",
    "wasted_input_tokens",
    "wasted_output_tokens",
    "wasted_cache_read_tokens",
    "wasted_cache_write_tokens",
)
_MEASURES = (*_COUNTS, "billed_cost_usd", "wasted_cost_usd", "estimated_output_tokens", "duration_s")


def upgrade() -> None:
    """Create ``costwatch_all_time_rollups`` and fill it from ``costwatch_hourly_rollups``."""
    op.create_table(
        "costwatch_all_time_rollups",
        *(sa.Column(name, sa.String(), nullable=False) for name in _DIMENSIONS),
        sa.Column("first_hour", _TIMESTAMP, nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False) for name in _COUNTS),
        sa.Column("billed_cost_usd", sa.Double(), nullable=False),
        sa.Column("wasted_cost_usd", sa.Double(), nullable=False),
        sa.Column("estimated_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("duration_s", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint(*_DIMENSIONS, name=op.f("pk_costwatch_all_time_rollups")),
    )
    hourly = sa.table(
        "costwatch_hourly_rollups", *(sa.column(name) for name in ("hour", *_DIMENSIONS, *_MEASURES))
    )
    all_time = sa.table(
        "costwatch_all_time_rollups", *(sa.column(name) for name in (*_DIMENSIONS, "first_hour", *_MEASURES))
    )
    dimensions = [hourly.c[name] for name in _DIMENSIONS]
    # Groups that sum to zero are kept, as their hourly rows are: their first hour still counts.
    grouped = sa.select(
        *dimensions,
        sa.func.min(hourly.c.hour),
        *(sa.func.sum(hourly.c[name]) for name in _MEASURES),
    ).group_by(*dimensions)
    op.execute(sa.insert(all_time).from_select([*_DIMENSIONS, "first_hour", *_MEASURES], grouped))


def downgrade() -> None:
    """Drop ``costwatch_all_time_rollups`` (the hourly rollups hold everything it held)."""
    op.drop_table("costwatch_all_time_rollups")
