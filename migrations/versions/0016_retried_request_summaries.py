"""Retried requests kept per request: the all-time avoidable waste without reading the attempts.

The report's avoidable waste (docs/report.md) reads, for every retried logical request, its sums
and each attempt's prompt. Over all time that was a read of every attempt of every retried request
(seconds at a million attempts on PostgreSQL). The writer now keeps one row per retried request in
``costwatch_retried_requests`` (``costwatch.store.retried``), and the requests with nothing to price
one by one summed by their last attempt's model, workflow, platform and endpoint in
``costwatch_retried_alike``, in the batch's transaction; this migration fills the first from the
attempts already stored, in one ``INSERT ... SELECT ... GROUP BY``, and the second from the first.

What it locks: on PostgreSQL the attempts table in ``SHARE`` mode from the fill to the commit, so
writers wait (their pipelines queue, then spool: nothing is lost) while reads go on; a write
between the fill's read and the commit would otherwise be missing from its request's row. On
SQLite the migration holds the database's write lock anyway. A writer of an older costwatch does
not know the table: upgrade every writer of a database with it, or the requests it retries are
missing from the all-time avoidable waste.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-03 18:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLE = "costwatch_retried_requests"
_ALIKE = "costwatch_retried_alike"
_PRICED_ONE_BY_ONE = "billed_attempts >= 2 AND cached_attempts = 0 AND measured_attempts > 0"
_TIMESTAMP = sa.DateTime(timezone=True)
_COLUMNS = (
    "logical_request_id",
    "attempts",
    "billed_attempts",
    "cached_attempts",
    "measured_attempts",
    "wasted_cost_usd",
    "last_attempt_number",
    "last_started_at",
    "last_attempt_id",
    "model",
    "workflow",
    "platform",
    "endpoint",
    "inference_geo",
    "prompts",
)

# Frozen here (a migration must not change when the code does): what costwatch.store.retried reads
# of an attempt, as AttemptRecord and PromptAttempt compute it. {workflow}, {started_us} and
# {entries} are the backend's JSON and time functions.
_FILL = """
INSERT INTO costwatch_retried_requests ({columns})
SELECT logical_request_id, count(*), sum(billed), sum(cached), sum(measured), sum(wasted_usd),
    max(CASE WHEN from_last = 1 THEN attempt_number END),
    max(CASE WHEN from_last = 1 THEN started_at END),
    max(CASE WHEN from_last = 1 THEN attempt_id END),
    max(CASE WHEN from_last = 1 THEN model END),
    max(CASE WHEN from_last = 1 THEN workflow END),
    max(CASE WHEN from_last = 1 THEN platform END),
    max(CASE WHEN from_last = 1 THEN endpoint END),
    max(CASE WHEN from_last = 1 THEN inference_geo END),
    {entries}
FROM (
    SELECT attempt_id, logical_request_id, attempt_number, started_at,
        coalesce(nullif(model, ''), model_requested) AS model,
        coalesce(substr({workflow}, 1, 64), '') AS workflow,
        platform, endpoint, inference_geo, prompt_tokens, prompt_bytes, stable_prefix_bytes,
        CASE WHEN prompt_tokens > 0 THEN 1 ELSE 0 END AS billed,
        CASE WHEN prompt_tokens > 0 AND cache_tokens > 0 THEN 1 ELSE 0 END AS cached,
        CASE WHEN prompt_bytes IS NOT NULL AND prompt_bytes != 0 AND stable_prefix_bytes IS NOT NULL
            THEN 1 ELSE 0 END AS measured,
        CASE WHEN wasted AND input_cost_usd IS NOT NULL AND cache_write_cost_usd IS NOT NULL
                AND cache_read_cost_usd IS NOT NULL AND output_cost_usd IS NOT NULL
            THEN input_cost_usd + cache_write_cost_usd + cache_read_cost_usd + output_cost_usd
                + coalesce(server_tool_cost_usd, 0.0)
            ELSE 0.0 END AS wasted_usd,
        row_number() OVER (
            PARTITION BY logical_request_id ORDER BY attempt_number DESC, started_at DESC, attempt_id DESC
        ) AS from_last
    FROM (
        SELECT *,
            cache_read_tokens + cache_write_5m_tokens + cache_write_1h_tokens AS cache_tokens,
            input_tokens + cache_read_tokens + cache_write_5m_tokens + cache_write_1h_tokens AS prompt_tokens
        FROM costwatch_attempts
        WHERE logical_request_id IN (
            SELECT logical_request_id FROM costwatch_attempts WHERE attempt_number > 1
        )
    ) AS retried_attempt
) AS attempt
GROUP BY logical_request_id
"""

_FILL_ALIKE = f"""
INSERT INTO {_ALIKE}
    (already_cached, model, workflow, platform, endpoint, requests, attempts, wasted_cost_usd)
SELECT cached_attempts > 0, model, workflow, platform, coalesce(endpoint, ''), count(*), sum(attempts),
    sum(wasted_cost_usd)
FROM {_TABLE}
WHERE billed_attempts >= 2 AND NOT ({_PRICED_ONE_BY_ONE})
GROUP BY cached_attempts > 0, model, workflow, platform, coalesce(endpoint, '')
"""

_BACKEND = {
    "postgresql": {
        "workflow": "tags ->> 'workflow'",
        "entries": "jsonb_object_agg(attempt_id, jsonb_build_array(attempt_number, "
        "CAST(extract(epoch FROM started_at) * 1000000 AS bigint), prompt_tokens, prompt_bytes, "
        "stable_prefix_bytes))",
    },
    # SQLite stores timestamps as naive UTC text, always with microseconds; its time functions would
    # round the fraction to milliseconds, so the whole seconds are read without it.
    "sqlite": {
        "workflow": "json_extract(tags, '$.\"workflow\"')",
        "entries": "json_group_object(attempt_id, json_array(attempt_number, "
        "CAST(strftime('%s', substr(started_at, 1, 19)) AS INTEGER) * 1000000 "
        "+ CAST(substr(started_at, 21, 6) AS INTEGER), "
        "prompt_tokens, prompt_bytes, stable_prefix_bytes))",
    },
}


def upgrade() -> None:
    """Create ``costwatch_retried_requests`` and ``costwatch_retried_alike`` and fill them from the
    attempts stored."""
    op.create_table(
        _TABLE,
        sa.Column("logical_request_id", sa.String(), nullable=False),
        sa.Column("attempts", sa.BigInteger(), nullable=False),
        sa.Column("billed_attempts", sa.BigInteger(), nullable=False),
        sa.Column("cached_attempts", sa.BigInteger(), nullable=False),
        sa.Column("measured_attempts", sa.BigInteger(), nullable=False),
        sa.Column("wasted_cost_usd", sa.Double(), nullable=False),
        sa.Column("last_attempt_number", sa.Integer(), nullable=False),
        sa.Column("last_started_at", _TIMESTAMP, nullable=False),
        sa.Column("last_attempt_id", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("workflow", sa.String(), nullable=False),
        sa.Column("platform", sa.String(), nullable=False),
        sa.Column("endpoint", sa.String(), nullable=True),
        sa.Column("inference_geo", sa.String(), nullable=True),
        sa.Column("prompts", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.PrimaryKeyConstraint("logical_request_id", name=op.f(f"pk_{_TABLE}")),
    )
    op.create_index(
        "ix_costwatch_retried_requests_priced_one_by_one",
        _TABLE,
        ["logical_request_id"],
        sqlite_where=sa.text(_PRICED_ONE_BY_ONE),
        postgresql_where=sa.text(_PRICED_ONE_BY_ONE),
    )
    op.create_table(
        _ALIKE,
        sa.Column("already_cached", sa.Boolean(), nullable=False),
        *(
            sa.Column(name, sa.String(), nullable=False)
            for name in ("model", "workflow", "platform", "endpoint")
        ),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.BigInteger(), nullable=False),
        sa.Column("wasted_cost_usd", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint(
            "already_cached", "model", "workflow", "platform", "endpoint", name=op.f(f"pk_{_ALIKE}")
        ),
    )
    bind = op.get_bind()
    backend = bind.dialect.name
    if backend == "postgresql":
        # Writers wait from here to the commit (reads go on), so no attempt lands between the fill's
        # read and the commit. The plan as the report's range read states it: the partitioned table
        # has no statistics of its own, and JIT compiles the plan once per day partition.
        op.execute("LOCK TABLE costwatch_attempts IN SHARE MODE")
        op.execute("SET LOCAL enable_nestloop = off")
        op.execute("SET LOCAL work_mem = '64MB'")
        op.execute("SET LOCAL jit = off")
    op.execute(_FILL.format(columns=", ".join(_COLUMNS), **_BACKEND[backend]))
    op.execute(_FILL_ALIKE)


def downgrade() -> None:
    """Drop both tables (the attempts hold what they were made from, but not what a prune removed
    since)."""
    op.drop_table(_ALIKE)
    op.drop_index("ix_costwatch_retried_requests_priced_one_by_one", table_name=_TABLE)
    op.drop_table(_TABLE)
