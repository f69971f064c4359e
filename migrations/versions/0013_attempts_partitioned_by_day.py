"""Attempts partitioned by day on PostgreSQL, and the retention cutoff on every backend.

PostgreSQL: ``costwatch_attempts`` becomes range-partitioned on ``started_at``, one partition per
UTC day plus a DEFAULT partition, so a prune drops whole days instead of deleting rows. A partitioned
table's unique keys must hold its partition key, so the primary key becomes
``(attempt_id, started_at)``: every revision of an attempt carries the start time of its first
(revisions are copies of the record), so it still names one row. The existing table is renamed, a
partitioned one created like it, partitions made for every day that holds attempts (within two
years back and one ahead; other rows go to the DEFAULT partition) and for the days ahead, the rows
copied, the indexes built, and the old table dropped, all in this migration's one transaction:
on a large table this takes a while (minutes at ten million attempts) and blocks writers meanwhile.
Downgrade does the reverse (keeping the highest revision, should an attempt be stored twice).

Every backend: ``costwatch_retention`` keeps the cutoff of the latest prune. A record that started
before it is not written again (a pruned attempt replayed from an old spool would be counted in the
rollups twice): it goes to ``costwatch_rejected_attempts`` with that reason.

SQLite's attempts table is unchanged.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 09:30:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIMESTAMP = sa.DateTime(timezone=True)

# Frozen copies of the attempts table's indexes as of 0012 (0001 and 0004; 0011 and 0012 add none).
_INDEXES = (
    "CREATE INDEX ix_costwatch_attempts_logical_request_id ON {table} (logical_request_id)",
    "CREATE INDEX ix_costwatch_attempts_abandoned_fingerprint ON {table} (fingerprint) "
    "WHERE waste_reason = 'abandoned'",
    "CREATE INDEX ix_costwatch_attempts_hour_fingerprint ON {table} "
    "(date_trunc('hour'::text, (started_at AT TIME ZONE 'UTC'::text)), fingerprint)",
)
_INDEX_NAMES = (
    "ix_costwatch_attempts_logical_request_id",
    "ix_costwatch_attempts_abandoned_fingerprint",
    "ix_costwatch_attempts_hour_fingerprint",
)
_DAYS_AHEAD = 7  # as costwatch.store.partitions.DAYS_AHEAD then
_DAYS_BACK_KEPT_APART = 2 * 366  # days with attempts further back go to the DEFAULT partition


def _bound(day: date) -> str:
    return f"'{day.isoformat()} 00:00:00+00'"


def upgrade() -> None:
    op.create_table(
        "costwatch_retention",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pruned_before", _TIMESTAMP, nullable=False),
        sa.Column("pruned_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_costwatch_retention")),
    )
    if op.get_bind().dialect.name == "postgresql":
        _partition()


def _partition() -> None:
    run = op.get_bind().exec_driver_sql
    run("ALTER TABLE costwatch_attempts RENAME TO costwatch_attempts_unpartitioned")
    run(
        "ALTER TABLE costwatch_attempts_unpartitioned "
        "RENAME CONSTRAINT pk_costwatch_attempts TO pk_costwatch_attempts_unpartitioned"
    )
    for name in _INDEX_NAMES:  # index names are per schema: the new table takes them over
        run(f"DROP INDEX IF EXISTS {name}")
    run(
        "CREATE TABLE costwatch_attempts (LIKE costwatch_attempts_unpartitioned "
        "INCLUDING DEFAULTS INCLUDING CONSTRAINTS) PARTITION BY RANGE (started_at)"
    )
    run(
        "ALTER TABLE costwatch_attempts "
        "ADD CONSTRAINT pk_costwatch_attempts PRIMARY KEY (attempt_id, started_at)"
    )
    run("CREATE TABLE costwatch_attempts_default PARTITION OF costwatch_attempts DEFAULT")
    today = datetime.now(timezone.utc).date()
    days = set(
        run(
            "SELECT DISTINCT (started_at AT TIME ZONE 'UTC')::date FROM costwatch_attempts_unpartitioned "
            "WHERE started_at >= %(first)s AND started_at < %(last)s",
            {
                "first": datetime.combine(today, datetime.min.time(), timezone.utc)
                - timedelta(days=_DAYS_BACK_KEPT_APART),
                "last": datetime.combine(today, datetime.min.time(), timezone.utc) + timedelta(days=366),
            },
        ).scalars()
    )
    days.update(today + timedelta(days=n) for n in range(-1, _DAYS_AHEAD + 1))
    for day in sorted(days):
        run(
            f"CREATE TABLE costwatch_attempts_p{day:%Y%m%d} PARTITION OF costwatch_attempts "
            f"FOR VALUES FROM ({_bound(day)}) TO ({_bound(day + timedelta(days=1))})"
        )
    run("INSERT INTO costwatch_attempts SELECT * FROM costwatch_attempts_unpartitioned")
    for index in _INDEXES:  # after the rows: one sort per index instead of a tree grown row by row
        run(index.format(table="costwatch_attempts"))
    run("DROP TABLE costwatch_attempts_unpartitioned")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _unpartition()
    op.drop_table("costwatch_retention")


def _unpartition() -> None:
    run = op.get_bind().exec_driver_sql
    run("ALTER TABLE costwatch_attempts RENAME TO costwatch_attempts_partitioned")
    run(
        "ALTER TABLE costwatch_attempts_partitioned "
        "RENAME CONSTRAINT pk_costwatch_attempts TO pk_costwatch_attempts_partitioned"
    )
    for name in _INDEX_NAMES:
        run(f"DROP INDEX IF EXISTS {name}")
    run(
        "CREATE TABLE costwatch_attempts (LIKE costwatch_attempts_partitioned "
        "INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )
    # One row per attempt, its highest revision (the partitioned key would allow one per start time).
    run(
        "INSERT INTO costwatch_attempts SELECT DISTINCT ON (attempt_id) * "
        "FROM costwatch_attempts_partitioned ORDER BY attempt_id, revision DESC"
    )
    run("ALTER TABLE costwatch_attempts ADD CONSTRAINT pk_costwatch_attempts PRIMARY KEY (attempt_id)")
    for index in _INDEXES:
        run(index.format(table="costwatch_attempts"))
    run("DROP TABLE costwatch_attempts_partitioned")
