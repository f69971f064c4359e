"""Where each output figure came from: ``output_source`` on the attempts, and output by source in the rollups.

An attempt's output tokens were either reported by the API or, for a stream cut before the API said,
estimated (``output_estimated``). They may now also be ``counted`` exactly by the Messages API's
``count_tokens`` endpoint, or ``reconciled`` from Anthropic's usage report. The attempts gain
``output_source`` (``estimated`` where the row's output is flagged estimated, else ``reported``);
both rollup tables gain the billed output tokens and dollars of each source (the estimated tokens
are the existing ``estimated_output_tokens``). The tokens are filled from the rollups themselves, the
dollars from the stored attempts in one pass over the priced ones with output, so the rollups stay
equal to the sums over the attempts.

Upgrade every writer of a database before (or when) migrating it: an older writer does not know
the columns, and its attempts would not reach them.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 09:20:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the names: a migration must not change when the models do later.
_TOKENS = ("reported_output_tokens", "counted_output_tokens", "reconciled_output_tokens")
_COSTS = (
    "reported_output_cost_usd",
    "estimated_output_cost_usd",
    "counted_output_cost_usd",
    "reconciled_output_cost_usd",
)
_TABLES = ("costwatch_hourly_rollups", "costwatch_all_time_rollups")
_DIMENSIONS = ("model", "outcome", "error_type", "waste_reason", "workflow")
_WORKFLOW_LABEL_LENGTH = 64
_READ_BATCH = 5000


def _hour(moment: datetime) -> datetime:
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return datetime(moment.year, moment.month, moment.day, moment.hour, tzinfo=timezone.utc)


def _key(row: Any) -> tuple[Any, ...]:
    """The rollup key of an attempt row, as the writer of this revision computes it."""
    tags = row.tags or {}
    return (
        _hour(row.started_at),
        row.model or row.model_requested,
        row.outcome,
        row.error_type or row.api_error_type or "",
        row.waste_reason if (row.wasted and row.waste_reason is not None) else "",
        str(tags.get("workflow") or "")[:_WORKFLOW_LABEL_LENGTH],
    )


def upgrade() -> None:
    """Add and fill the attempts' ``output_source`` and the rollups' output by source."""
    # Plain ADD COLUMN on both backends (see 0006: a batch copy on SQLite would lose an index).
    op.add_column(
        "costwatch_attempts",
        sa.Column("output_source", sa.String(), server_default="reported", nullable=False),
    )
    attempts = sa.table(
        "costwatch_attempts",
        sa.column("attempt_id", sa.String()),
        sa.column("started_at", sa.DateTime(timezone=True)),
        *(
            sa.column(name, sa.String())
            for name in (
                "model",
                "model_requested",
                "outcome",
                "error_type",
                "api_error_type",
                "waste_reason",
                "output_source",
            )
        ),
        sa.column("wasted", sa.Boolean()),
        sa.column("output_estimated", sa.Boolean()),
        sa.column("tags", sa.JSON()),
        sa.column("output_cost_usd", sa.Double()),
    )
    connection = op.get_bind()
    connection.execute(
        sa.update(attempts).where(attempts.c.output_estimated.is_(True)).values(output_source="estimated")
    )
    for table in _TABLES:
        for name in _TOKENS:
            op.add_column(table, sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
        for name in _COSTS:
            op.add_column(table, sa.Column(name, sa.Double(), nullable=False, server_default="0"))
        rollups = sa.table(
            table,
            sa.column("billed_output_tokens", sa.BigInteger()),
            sa.column("estimated_output_tokens", sa.BigInteger()),
            sa.column("reported_output_tokens", sa.BigInteger()),
        )
        connection.execute(
            sa.update(rollups).values(
                reported_output_tokens=rollups.c.billed_output_tokens - rollups.c.estimated_output_tokens
            )
        )
    sums: dict[tuple[Any, ...], list[float]] = {}
    after = ""
    wanted = attempts.c.output_cost_usd > 0
    while True:  # keyset pages, so a large store is never held in memory at once
        page = connection.execute(
            sa.select(attempts)
            .where(wanted, attempts.c.attempt_id > after)
            .order_by(attempts.c.attempt_id)
            .limit(_READ_BATCH)
        ).all()
        if not page:
            break
        after = page[-1].attempt_id
        for row in page:
            values = sums.setdefault(_key(row), [0.0, 0.0])
            values[1 if row.output_source == "estimated" else 0] += row.output_cost_usd
    hourly = sa.table(
        "costwatch_hourly_rollups",
        sa.column("hour", sa.DateTime(timezone=True)),
        *(sa.column(n) for n in (*_DIMENSIONS, *_COSTS[:2])),
    )
    all_time = sa.table("costwatch_all_time_rollups", *(sa.column(n) for n in (*_DIMENSIONS, *_COSTS[:2])))
    for table, keyed in ((hourly, True), (all_time, False)):
        merged: dict[tuple[Any, ...], list[float]] = {}
        for key, values in sums.items():
            known = merged.setdefault(key if keyed else key[1:], [0.0, 0.0])
            known[0] += values[0]
            known[1] += values[1]
        columns = (
            [table.c.hour, *(table.c[d] for d in _DIMENSIONS)] if keyed else [table.c[d] for d in _DIMENSIONS]
        )
        for key, values in sorted(merged.items()):
            where = [column == value for column, value in zip(columns, key, strict=True)]
            connection.execute(
                sa.update(table).where(*where).values(dict(zip(_COSTS[:2], values, strict=True)))
            )


def downgrade() -> None:
    """Drop the columns (``output_estimated`` still says which outputs were estimated)."""
    # ALTER TABLE ... DROP COLUMN on both backends (SQLite 3.35 and later), as in 0006.
    for table in _TABLES:
        for name in (*_TOKENS, *_COSTS):
            op.execute(f"ALTER TABLE {table} DROP COLUMN {name}")
    op.execute("ALTER TABLE costwatch_attempts DROP COLUMN output_source")
