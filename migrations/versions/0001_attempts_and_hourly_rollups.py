"""Attempts and hourly rollups.

Revision ID: 0001
Revises:
Create Date: 2026-11-25 18:47:07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the types: a migration must not change when the models do later.
_TIMESTAMP = sa.DateTime(timezone=True)


def _counts(*names: str) -> list[sa.Column[int]]:
    return [sa.Column(name, sa.BigInteger(), nullable=False) for name in names]


def upgrade() -> None:
    """Create the attempts table and the hourly rollups table."""
    op.create_table(
        "costwatch_attempts",
        sa.Column("attempt_id", sa.String(), nullable=False),
        sa.Column("logical_request_id", sa.String(), nullable=False),
        sa.Column("attempt_number", sa.Integer(), nullable=False),
        sa.Column("started_at", _TIMESTAMP, nullable=False),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("model_requested", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=True),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("beta_features", sa.JSON(), nullable=False),
        sa.Column("request_id", sa.String(), nullable=True),
        sa.Column("message_id", sa.String(), nullable=True),
        sa.Column("sdk_retry", sa.Integer(), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error_type", sa.String(), nullable=True),
        sa.Column("api_error_type", sa.String(), nullable=True),
        sa.Column("time_to_first_token_s", sa.Double(), nullable=True),
        sa.Column("duration_s", sa.Double(), nullable=False),
        *_counts(
            "input_tokens",
            "cache_write_5m_tokens",
            "cache_write_1h_tokens",
            "cache_read_tokens",
            "output_tokens",
        ),
        sa.Column("output_estimated", sa.Boolean(), nullable=False),
        sa.Column("estimated_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("server_tool_use", sa.JSON(), nullable=False),
        sa.Column("stop_reason", sa.String(), nullable=True),
        sa.Column("events_received", sa.BigInteger(), nullable=False),
        sa.Column("bytes_received", sa.BigInteger(), nullable=False),
        sa.Column("input_cost_usd", sa.Double(), nullable=True),
        sa.Column("cache_write_cost_usd", sa.Double(), nullable=True),
        sa.Column("cache_read_cost_usd", sa.Double(), nullable=True),
        sa.Column("output_cost_usd", sa.Double(), nullable=True),
        sa.Column("wasted", sa.Boolean(), nullable=False),
        sa.Column("waste_reason", sa.String(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("fingerprint", sa.String(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("attempt_id", name=op.f("pk_costwatch_attempts")),
    )
    for column in ("fingerprint", "logical_request_id", "started_at"):
        op.create_index(op.f(f"ix_costwatch_attempts_{column}"), "costwatch_attempts", [column])

    op.create_table(
        "costwatch_hourly_rollups",
        sa.Column("hour", _TIMESTAMP, nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("error_type", sa.String(), nullable=False),
        sa.Column("waste_reason", sa.String(), nullable=False),
        sa.Column("workflow", sa.String(), nullable=False),
        *_counts(
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
        ),
        sa.Column("billed_cost_usd", sa.Double(), nullable=False),
        sa.Column("wasted_cost_usd", sa.Double(), nullable=False),
        sa.Column("estimated_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("duration_s", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint(
            "hour",
            "model",
            "outcome",
            "error_type",
            "waste_reason",
            "workflow",
            name=op.f("pk_costwatch_hourly_rollups"),
        ),
    )


def downgrade() -> None:
    """Drop both tables (their indexes go with them)."""
    op.drop_table("costwatch_hourly_rollups")
    for column in ("started_at", "logical_request_id", "fingerprint"):
        op.drop_index(op.f(f"ix_costwatch_attempts_{column}"), table_name="costwatch_attempts")
    op.drop_table("costwatch_attempts")
