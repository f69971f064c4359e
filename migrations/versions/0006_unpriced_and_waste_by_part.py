"""Rollup measures for unpriced attempts and for wasted dollars by part of the bill, filled from the attempts.

An attempt on a model without a known price used to add nothing to the rollups' costs and leave no
other trace there, so reports showed it as $0.00. The rollups now count such attempts and their
billed tokens (``unpriced_attempts``, ``unpriced_tokens``), and split ``wasted_cost_usd`` into the
wasted input, cache read, cache write and output dollars. This migration adds the columns (zero)
and fills them from the stored attempts that are unpriced or wasted, in one pass over those rows,
so the rollups stay equal to the sums over the attempts. The attempts gain the fee for server tools
the API reported (web searches; ``server_tool_cost_usd``, NULL before: no fee was priced) and where
inference ran (``inference_geo``).

Upgrade every writer of a database before (or when) migrating it: an older writer does not know
the columns, and its attempts would not reach them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 06:20:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the names: a migration must not change when the models do later.
_COUNTS = ("unpriced_attempts", "unpriced_tokens")
_COSTS = (
    "wasted_input_cost_usd",
    "wasted_cache_read_cost_usd",
    "wasted_cache_write_cost_usd",
    "wasted_output_cost_usd",
    "wasted_server_tool_cost_usd",
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
    """Add the columns to both rollup tables and fill them from the unpriced or wasted attempts;
    add the attempts' server-tool fee and inference geo (NULL on the rows stored before)."""
    # Plain ADD COLUMN on both backends (SQLite takes a nullable column, or one with a default, in
    # place): a batch "move and copy" on SQLite would lose the attempts' expression index of 0004.
    op.add_column("costwatch_attempts", sa.Column("server_tool_cost_usd", sa.Double(), nullable=True))
    op.add_column("costwatch_attempts", sa.Column("inference_geo", sa.String(), nullable=True))
    for table in _TABLES:
        for name in _COUNTS:
            op.add_column(table, sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
        for name in _COSTS:
            op.add_column(table, sa.Column(name, sa.Double(), nullable=False, server_default="0"))
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
            )
        ),
        sa.column("wasted", sa.Boolean()),
        sa.column("tags", sa.JSON()),
        *(
            sa.column(name, sa.BigInteger())
            for name in (
                "input_tokens",
                "cache_write_5m_tokens",
                "cache_write_1h_tokens",
                "cache_read_tokens",
                "output_tokens",
            )
        ),
        *(
            sa.column(name, sa.Double())
            for name in ("input_cost_usd", "cache_read_cost_usd", "cache_write_cost_usd", "output_cost_usd")
        ),
    )
    connection = op.get_bind()
    sums: dict[tuple[Any, ...], list[float]] = {}
    wanted = sa.or_(attempts.c.input_cost_usd.is_(None), attempts.c.wasted.is_(True))
    after = ""
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
            values = sums.setdefault(_key(row), [0, 0, 0.0, 0.0, 0.0, 0.0, 0.0])
            if row.input_cost_usd is None:
                values[0] += 1
                values[1] += (
                    row.input_tokens
                    + row.cache_write_5m_tokens
                    + row.cache_write_1h_tokens
                    + row.cache_read_tokens
                    + row.output_tokens
                )
            elif row.wasted:
                values[2] += row.input_cost_usd
                values[3] += row.cache_read_cost_usd
                values[4] += row.cache_write_cost_usd
                values[5] += row.output_cost_usd
    names = (*_COUNTS, *_COSTS)
    hourly = sa.table(
        "costwatch_hourly_rollups",
        sa.column("hour", sa.DateTime(timezone=True)),
        *(sa.column(n) for n in (*_DIMENSIONS, *names)),
    )
    all_time = sa.table("costwatch_all_time_rollups", *(sa.column(n) for n in (*_DIMENSIONS, *names)))
    for table, keyed in ((hourly, True), (all_time, False)):
        merged: dict[tuple[Any, ...], list[float]] = {}
        for key, values in sums.items():
            target = key if keyed else key[1:]
            known = merged.setdefault(target, [0, 0, 0.0, 0.0, 0.0, 0.0, 0.0])
            for i, value in enumerate(values):
                known[i] += value
        columns = (
            [table.c.hour, *(table.c[d] for d in _DIMENSIONS)] if keyed else [table.c[d] for d in _DIMENSIONS]
        )
        for key, values in sorted(merged.items()):
            where = [column == value for column, value in zip(columns, key, strict=True)]
            connection.execute(sa.update(table).where(*where).values(dict(zip(names, values, strict=True))))


def downgrade() -> None:
    """Drop the columns (the attempts still hold what they were computed from)."""
    # ALTER TABLE ... DROP COLUMN on both backends (SQLite 3.35 and later), for the same reason.
    for table in (*_TABLES, "costwatch_attempts"):
        names = (
            ("server_tool_cost_usd", "inference_geo")
            if table == "costwatch_attempts"
            else (*_COUNTS, *_COSTS)
        )
        for name in names:
            op.execute(f"ALTER TABLE {table} DROP COLUMN {name}")
