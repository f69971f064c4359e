"""Estimates corrected by the bill: what each reconciliation did to the dropped attempts' estimates.

``costwatch_reconciliations`` gains, per bucket and model, the correction's status (``corrected``,
``settled``, ``left_alone``, ``none``) and the reason a row was left alone, the attempts that carry
the billed output, costwatch's estimate of the dropped attempts' output (the estimate an attempt
had before the bill replaced it), and their wasted dollars at the estimate and at the bill.
``costwatch_calibration_samples`` gains ``output_source``: ``reported`` for the completed attempts'
samples, ``estimated`` for the dropped attempts' (no output tokens yet), ``reconciled`` once the
bill gave them their output.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 09:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RECONCILIATIONS = "costwatch_reconciliations"
_SAMPLES = "costwatch_calibration_samples"


def upgrade() -> None:
    """Add the correction's columns and the samples' output source."""
    # Plain ADD COLUMN on both backends (see 0006: a batch copy on SQLite would lose an index).
    op.add_column(
        _RECONCILIATIONS, sa.Column("correction", sa.String(), server_default="none", nullable=False)
    )
    op.add_column(_RECONCILIATIONS, sa.Column("correction_reason", sa.String(), nullable=True))
    op.add_column(
        _RECONCILIATIONS,
        sa.Column("corrected_attempts", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.add_column(
        _RECONCILIATIONS, sa.Column("dropped_estimated_output_tokens", sa.BigInteger(), nullable=True)
    )
    op.add_column(_RECONCILIATIONS, sa.Column("estimated_wasted_cost_usd", sa.Double(), nullable=True))
    op.add_column(_RECONCILIATIONS, sa.Column("billed_wasted_cost_usd", sa.Double(), nullable=True))
    op.add_column(
        _SAMPLES, sa.Column("output_source", sa.String(), server_default="reported", nullable=False)
    )
    samples = sa.table(_SAMPLES, sa.column("output_tokens", sa.BigInteger()), sa.column("output_source"))
    op.get_bind().execute(
        sa.update(samples).where(samples.c.output_tokens.is_(None)).values(output_source="estimated")
    )


def downgrade() -> None:
    """Drop the columns."""
    # ALTER TABLE ... DROP COLUMN on both backends (SQLite 3.35 and later), as in 0006.
    op.execute(f"ALTER TABLE {_SAMPLES} DROP COLUMN output_source")
    for name in (
        "billed_wasted_cost_usd",
        "estimated_wasted_cost_usd",
        "dropped_estimated_output_tokens",
        "corrected_attempts",
        "correction_reason",
        "correction",
    ):
        op.execute(f"ALTER TABLE {_RECONCILIATIONS} DROP COLUMN {name}")
