"""The rollups keyed by platform too, so reports and the fleet exporter can slice by it.

Adds ``platform`` to the primary key of both rollup tables (``anthropic`` on every row, the
first-party API), then moves the share of the attempts stored with another platform (migration
0007 keeps it on each attempt) from their ``anthropic`` rows to rows of their own platform, in one
pass over those attempts only, so each rollup row stays the sum over its attempts. Rollup rows
whose attempts are gone (retention) stay ``anthropic``: their platform is no longer known.

Upgrade every writer of a database before (or when) migrating it: an older writer upserts on the
old key, which no longer exists.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 09:40:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the names and of how a writer of this revision counts an attempt into the
# rollups (costwatch.store.rows): a migration must not change when the models do later.
_FIRST_PARTY = "anthropic"
_HOURLY, _ALL_TIME = "costwatch_hourly_rollups", "costwatch_all_time_rollups"
_DIMENSIONS = ("model", "outcome", "error_type", "waste_reason", "workflow")
_MEASURES = (
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
    "billed_cost_usd",
    "wasted_cost_usd",
    "estimated_output_tokens",
    "duration_s",
    "unpriced_attempts",
    "unpriced_tokens",
    "wasted_input_cost_usd",
    "wasted_cache_read_cost_usd",
    "wasted_cache_write_cost_usd",
    "wasted_output_cost_usd",
    "wasted_server_tool_cost_usd",
    "reported_output_tokens",
    "counted_output_tokens",
    "reconciled_output_tokens",
    "reported_output_cost_usd",
    "estimated_output_cost_usd",
    "counted_output_cost_usd",
    "reconciled_output_cost_usd",
)
_TOKEN_SOURCES = ("reported", "counted", "reconciled")
_COST_SOURCES = ("reported", "estimated", "counted", "reconciled")
_WORKFLOW_LABEL_LENGTH = 64
_READ_BATCH = 5000


def _hour(moment: datetime) -> datetime:
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    return datetime(moment.year, moment.month, moment.day, moment.hour, tzinfo=timezone.utc)


def _key(row: Any) -> tuple[Any, ...]:
    """The hourly rollup key of an attempt row, without its platform."""
    tags = row.tags or {}
    return (
        _hour(row.started_at),
        row.model or row.model_requested,
        row.outcome,
        row.error_type or row.api_error_type or "",
        row.waste_reason if (row.wasted and row.waste_reason is not None) else "",
        str(tags.get("workflow") or "")[:_WORKFLOW_LABEL_LENGTH],
    )


def _measures(row: Any) -> tuple[float, ...]:
    """What one stored attempt adds to its rollup row, in the order of ``_MEASURES``."""
    parts = (row.input_cost_usd, row.cache_read_cost_usd, row.cache_write_cost_usd, row.output_cost_usd)
    priced = all(part is not None for part in parts)
    costs = (*parts, row.server_tool_cost_usd or 0.0) if priced else (0.0,) * 5
    billed_cost = sum(costs)
    wasted = bool(row.wasted)
    cache_write = row.cache_write_5m_tokens + row.cache_write_1h_tokens
    tokens = (row.input_tokens, row.output_tokens, row.cache_read_tokens, cache_write)
    output_usd = row.output_cost_usd if priced else 0.0
    source = row.output_source
    return (
        1,
        1 if row.outcome == "dropped" else 0,
        1 if row.attempt_number == 1 else 0,
        *tokens,
        *(t if wasted else 0 for t in tokens),
        billed_cost,
        billed_cost if wasted else 0.0,
        row.estimated_output_tokens if row.output_estimated else 0,
        row.duration_s,
        0 if priced else 1,
        0 if priced else sum(tokens),
        *(c if wasted else 0.0 for c in costs),
        *(row.output_tokens if source == s else 0 for s in _TOKEN_SOURCES),
        *(output_usd if source == s else 0.0 for s in _COST_SOURCES),
    )


def _rekey(table: str, keys: Sequence[str]) -> None:
    """Add ``platform`` (``anthropic`` on every row) to ``table`` and to its primary key."""
    column = sa.Column("platform", sa.String(), nullable=False, server_default=_FIRST_PARTY)
    name = f"pk_{table}"
    if op.get_bind().dialect.name == "sqlite":
        # SQLite cannot alter a primary key: the table is copied (the rollups have no other index).
        with op.batch_alter_table(table, recreate="always") as batch:
            batch.add_column(column)
            batch.drop_constraint(name, type_="primary")
            batch.create_primary_key(name, [*keys, "platform"])
        return
    op.add_column(table, column)
    op.drop_constraint(name, table, type_="primary")
    op.create_primary_key(name, table, [*keys, "platform"])


def upgrade() -> None:
    """Key both rollup tables by platform and move the other platforms' attempts to their own rows;
    add the attempts' endpoint kind (NULL on the rows stored before: not known)."""
    # Plain ADD COLUMN (SQLite takes a nullable column in place; a batch copy of the attempts would
    # lose migration 0004's expression index).
    op.add_column("costwatch_attempts", sa.Column("endpoint", sa.String(), nullable=True))
    _rekey(_HOURLY, ("hour", *_DIMENSIONS))
    _rekey(_ALL_TIME, _DIMENSIONS)
    attempts = sa.table(
        "costwatch_attempts",
        sa.column("attempt_id", sa.String()),
        sa.column("started_at", sa.DateTime(timezone=True)),
        sa.column("tags", sa.JSON()),
        *(
            sa.column(name)
            for name in (
                "platform",
                "model",
                "model_requested",
                "outcome",
                "error_type",
                "api_error_type",
                "waste_reason",
                "wasted",
                "attempt_number",
                "input_tokens",
                "output_tokens",
                "cache_read_tokens",
                "cache_write_5m_tokens",
                "cache_write_1h_tokens",
                "estimated_output_tokens",
                "output_estimated",
                "duration_s",
                "input_cost_usd",
                "cache_read_cost_usd",
                "cache_write_cost_usd",
                "output_cost_usd",
                "server_tool_cost_usd",
                "output_source",
            )
        ),
    )
    connection = op.get_bind()
    moved: dict[tuple[Any, ...], list[float]] = {}  # (hour, *dimensions, platform) -> sums
    after = ""
    while True:  # keyset pages, so a large store is never held in memory at once
        page = connection.execute(
            sa.select(attempts)
            .where(attempts.c.platform != _FIRST_PARTY, attempts.c.attempt_id > after)
            .order_by(attempts.c.attempt_id)
            .limit(_READ_BATCH)
        ).all()
        if not page:
            break
        after = page[-1].attempt_id
        for row in page:
            key = (*_key(row), row.platform)
            known = moved.get(key)
            values = _measures(row)
            moved[key] = (
                list(values) if known is None else [a + b for a, b in zip(known, values, strict=True)]
            )
    if not moved:
        return
    hourly = sa.table(
        _HOURLY,
        sa.column("hour", sa.DateTime(timezone=True)),
        *(sa.column(n) for n in (*_DIMENSIONS, "platform", *_MEASURES)),
    )
    all_time = sa.table(
        _ALL_TIME,
        sa.column("first_hour", sa.DateTime(timezone=True)),
        *(sa.column(n) for n in (*_DIMENSIONS, "platform", *_MEASURES)),
    )
    by_dimensions: dict[tuple[Any, ...], tuple[datetime, list[float]]] = {}
    for key, values in sorted(moved.items()):
        hour, dimensions, platform = key[0], key[1:-1], key[-1]
        _move(
            connection,
            hourly,
            {"hour": hour, **dict(zip(_DIMENSIONS, dimensions, strict=True))},
            platform,
            values,
        )
        first, sums = by_dimensions.get((*dimensions, platform), (hour, [0.0] * len(_MEASURES)))
        by_dimensions[(*dimensions, platform)] = (
            min(first, hour),
            [a + b for a, b in zip(sums, values, strict=True)],
        )
    for key, (first, values) in sorted(by_dimensions.items()):
        dimensions, platform = key[:-1], key[-1]
        where = dict(zip(_DIMENSIONS, dimensions, strict=True))
        _move(connection, all_time, where, platform, values, first_hour=first)


def _move(
    connection: sa.Connection,
    table: Any,
    where: dict[str, Any],
    platform: str,
    values: Sequence[float],
    **extra: Any,
) -> None:
    """Take ``values`` off the ``anthropic`` row of ``where`` and give them to its ``platform`` row."""
    column = table.c
    matches = [column[name] == value for name, value in where.items()]
    connection.execute(
        sa.update(table)
        .where(*matches, column.platform == _FIRST_PARTY)
        .values({name: column[name] - value for name, value in zip(_MEASURES, values, strict=True)})
    )
    # A row left with no attempt held only what moved (or float dust of it): a writer of this
    # revision would never have written it.
    connection.execute(
        sa.delete(table).where(*matches, column.platform == _FIRST_PARTY, column.attempts == 0)
    )
    connection.execute(
        sa.insert(table).values(
            {**where, **extra, "platform": platform, **dict(zip(_MEASURES, values, strict=True))}
        )
    )


def downgrade() -> None:
    """Fold every platform's rows back into the ``anthropic`` rows and drop the columns."""
    connection = op.get_bind()
    op.execute("ALTER TABLE costwatch_attempts DROP COLUMN endpoint")
    for table, keys, first in ((_HOURLY, ("hour", *_DIMENSIONS), False), (_ALL_TIME, _DIMENSIONS, True)):
        columns = [sa.column(n) for n in (*keys, "platform", *_MEASURES)]
        if first:
            columns.append(sa.column("first_hour", sa.DateTime(timezone=True)))
        target = sa.table(table, *columns)
        others = connection.execute(sa.select(target).where(target.c.platform != _FIRST_PARTY)).all()
        for row in others:
            values = [getattr(row, name) for name in _MEASURES]
            where = [target.c[name] == getattr(row, name) for name in keys]
            sums: dict[str, Any] = {
                name: target.c[name] + value for name, value in zip(_MEASURES, values, strict=True)
            }
            if first:
                earlier = target.c.first_hour > row.first_hour
                sums["first_hour"] = sa.case((earlier, row.first_hour), else_=target.c.first_hour)
            found = connection.execute(
                sa.update(target).where(*where, target.c.platform == _FIRST_PARTY).values(sums)
            )
            if found.rowcount == 0:
                extra = {"first_hour": row.first_hour} if first else {}
                connection.execute(
                    sa.insert(target).values(
                        {
                            **{name: getattr(row, name) for name in keys},
                            **extra,
                            "platform": _FIRST_PARTY,
                            **dict(zip(_MEASURES, values, strict=True)),
                        }
                    )
                )
        connection.execute(sa.delete(target).where(target.c.platform != _FIRST_PARTY))
        name = f"pk_{table}"
        if connection.dialect.name == "sqlite":
            with op.batch_alter_table(table, recreate="always") as batch:
                batch.drop_constraint(name, type_="primary")
                batch.drop_column("platform")
                batch.create_primary_key(name, list(keys))
        else:
            op.drop_constraint(name, table, type_="primary")
            op.drop_column(table, "platform")
            op.create_primary_key(name, table, list(keys))
