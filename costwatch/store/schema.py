"""The store's tables: one row per attempt, and hourly rollups that reports and exporters read.

The tables carry a ``costwatch_`` prefix (and Alembic's version table is ``costwatch_alembic_version``)
so the store can live in an application's own database next to its own tables and migrations.
They are SQLAlchemy Core tables on one ``MetaData``: every statement of the store is Core, and the
ORM's mapped classes would leave thousands of long-lived objects in every instrumented process
(benchmarks/README.md, "The install call without the ORM").
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = [
    "ALL_TIME_DIMENSIONS",
    "ALL_TIME_ROLLUPS",
    "ATTEMPTS",
    "CALIBRATION_SAMPLES",
    "NAMING_CONVENTION",
    "RECONCILIATIONS",
    "REJECTED_ATTEMPTS",
    "RETENTION",
    "RETRIED_ALIKE",
    "RETRIED_REQUESTS",
    "ROLLUPS",
    "ROLLUP_DIMENSIONS",
    "ROLLUP_MEASURES",
    "VERSION_TABLE",
    "JsonObject",
    "UtcDateTime",
    "declare_for",
    "insert_of",
    "metadata",
    "utc_hour",
]

VERSION_TABLE = "costwatch_alembic_version"
"""Alembic's version table for the store, named apart from an application's own ``alembic_version``."""

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Deterministic constraint names, so migrations written today can drop or alter them tomorrow on
every backend."""

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
"""The store's ``MetaData``, holding every table below; Alembic's autogenerate compares the migrations
against it."""


def declare_for(dialect_name: str) -> None:
    """Give the partial indexes their ``WHERE`` (``index.info["where"]``) in the DDL of
    ``dialect_name``. Naming a dialect's option (``postgresql_where``) loads that dialect, ~8k
    long-lived objects for PostgreSQL's, so only the backend a store uses is named: when its engine is
    created (``create_store_engine``) or its tables are (``metadata.create_all``). Idempotent."""
    if dialect_name not in ("sqlite", "postgresql") or dialect_name in _DECLARED:
        return
    for table in metadata.tables.values():
        for index in table.indexes:
            where = index.info.get("where")
            if where is not None:
                index.dialect_options[dialect_name]["where"] = sa.text(where)
    _DECLARED.add(dialect_name)


_DECLARED: set[str] = set()


def insert_of(dialect_name: str) -> Callable[..., Any]:
    """The ``insert`` with ``ON CONFLICT`` of ``dialect_name`` (``postgresql``, else SQLite's),
    imported at first use: a SQLite store never loads the PostgreSQL dialect."""
    if dialect_name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


@sa.event.listens_for(metadata, "before_create")
def _declare_before_create(_metadata: sa.MetaData, connection: sa.Connection, **_kw: Any) -> None:
    declare_for(connection.dialect.name)


class JsonObject(sa.types.TypeDecorator[Any]):
    """JSON, as ``JSONB`` on PostgreSQL (whose ``||`` merges objects) and ``JSON`` elsewhere; the
    PostgreSQL type is looked up only on PostgreSQL."""

    impl = sa.JSON()
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        """``JSONB`` on PostgreSQL, else the generic ``JSON``."""
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(sa.JSON())


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """A timestamp that goes in and comes out as timezone-aware UTC on every backend.

    PostgreSQL keeps it as ``timestamptz``. SQLite has no time zones, so it stores naive UTC text,
    which then sorts and compares correctly as text.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC (naive input is taken as UTC); drop the zone where the backend has none."""
        if value is None:
            return None
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        """Return timezone-aware UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        result: datetime = value.astimezone(timezone.utc)
        return result


class utc_hour(sa.sql.functions.FunctionElement[Any]):
    """``utc_hour(column)``: the UTC hour a :class:`UtcDateTime` column falls in, as each backend can
    index it (an expression index must be queried with the very expression it was built on).

    SQLite: the stored text up to the hour, ``'YYYY-MM-DD HH'``. PostgreSQL: a ``timestamp`` (without
    time zone) truncated to the hour; ``AT TIME ZONE 'UTC'`` makes it immutable, as an index needs.
    """

    inherit_cache = True
    name = "utc_hour"


@compiles(utc_hour)
def _utc_hour_elsewhere(element: utc_hour, compiler: SQLCompiler, **kw: Any) -> str:
    backend = compiler.dialect.name
    raise NotImplementedError(f"costwatch's store supports SQLite and PostgreSQL, not {backend}")


@compiles(utc_hour, "sqlite")
def _utc_hour_sqlite(element: utc_hour, compiler: SQLCompiler, **kw: Any) -> str:
    return f"substr({compiler.process(element.clauses, **kw)}, 1, 13)"


@compiles(utc_hour, "postgresql")
def _utc_hour_postgresql(element: utc_hour, compiler: SQLCompiler, **kw: Any) -> str:
    # Written as PostgreSQL prints it back, so Alembic's autogenerate sees the index unchanged.
    return f"date_trunc('hour'::text, ({compiler.process(element.clauses, **kw)} AT TIME ZONE 'UTC'::text))"


def _rollup_measures() -> list[sa.Column[Any]]:
    """The additive columns every rollup table has, after its own key columns (new objects each call:
    a column belongs to one table)."""
    return [
        sa.Column("attempts", sa.BigInteger(), nullable=False),
        sa.Column("dropped_attempts", sa.BigInteger(), nullable=False),
        sa.Column("logical_requests_started", sa.BigInteger(), nullable=False),
        sa.Column("billed_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("billed_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("billed_cache_read_tokens", sa.BigInteger(), nullable=False),
        sa.Column("billed_cache_write_tokens", sa.BigInteger(), nullable=False),
        sa.Column("wasted_input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("wasted_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("wasted_cache_read_tokens", sa.BigInteger(), nullable=False),
        sa.Column("wasted_cache_write_tokens", sa.BigInteger(), nullable=False),
        sa.Column("billed_cost_usd", sa.Double(), nullable=False),
        sa.Column("wasted_cost_usd", sa.Double(), nullable=False),
        sa.Column("estimated_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("duration_s", sa.Double(), nullable=False),
        sa.Column("unpriced_attempts", sa.BigInteger(), nullable=False),
        sa.Column("unpriced_tokens", sa.BigInteger(), nullable=False),
        sa.Column("wasted_input_cost_usd", sa.Double(), nullable=False),
        sa.Column("wasted_cache_read_cost_usd", sa.Double(), nullable=False),
        sa.Column("wasted_cache_write_cost_usd", sa.Double(), nullable=False),
        sa.Column("wasted_output_cost_usd", sa.Double(), nullable=False),
        sa.Column("wasted_server_tool_cost_usd", sa.Double(), nullable=False),
        # Billed output by where its count came from (migration 0011; OutputSource). The estimated
        # tokens are ``estimated_output_tokens`` above; the four token figures sum to billed_output_tokens.
        sa.Column("reported_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("counted_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reconciled_output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reported_output_cost_usd", sa.Double(), nullable=False),
        sa.Column("estimated_output_cost_usd", sa.Double(), nullable=False),
        sa.Column("counted_output_cost_usd", sa.Double(), nullable=False),
        sa.Column("reconciled_output_cost_usd", sa.Double(), nullable=False),
    ]


ATTEMPTS = sa.Table(
    "costwatch_attempts",
    metadata,
    sa.Column("attempt_id", sa.String(), primary_key=True),
    sa.Column("logical_request_id", sa.String(), index=True, nullable=False),
    sa.Column("attempt_number", sa.Integer(), nullable=False),
    # Not indexed: nothing reads attempts by time but retention (migration 0002).
    sa.Column("started_at", UtcDateTime(), nullable=False),
    sa.Column("outcome", sa.String(), nullable=False),
    sa.Column("model_requested", sa.String(), nullable=False),
    sa.Column("model", sa.String()),
    sa.Column("stream", sa.Boolean(), nullable=False),
    sa.Column("beta_features", sa.JSON(), nullable=False),
    sa.Column("request_id", sa.String()),
    sa.Column("message_id", sa.String()),
    sa.Column("sdk_retry", sa.Integer(), nullable=False),
    sa.Column("http_status", sa.Integer()),
    sa.Column("error_type", sa.String()),
    sa.Column("api_error_type", sa.String()),
    sa.Column("time_to_first_token_s", sa.Double()),
    sa.Column("duration_s", sa.Double(), nullable=False),
    sa.Column("input_tokens", sa.BigInteger(), nullable=False),
    sa.Column("cache_write_5m_tokens", sa.BigInteger(), nullable=False),
    sa.Column("cache_write_1h_tokens", sa.BigInteger(), nullable=False),
    sa.Column("cache_read_tokens", sa.BigInteger(), nullable=False),
    sa.Column("output_tokens", sa.BigInteger(), nullable=False),
    sa.Column("output_estimated", sa.Boolean(), nullable=False),
    sa.Column("estimated_output_tokens", sa.BigInteger(), nullable=False),
    sa.Column("server_tool_use", sa.JSON(), nullable=False),
    sa.Column("stop_reason", sa.String()),
    sa.Column("events_received", sa.BigInteger(), nullable=False),
    sa.Column("bytes_received", sa.BigInteger(), nullable=False),
    # NULL cost columns mean "no known price" (AttemptRecord.cost is None), not zero.
    sa.Column("input_cost_usd", sa.Double()),
    sa.Column("cache_write_cost_usd", sa.Double()),
    sa.Column("cache_read_cost_usd", sa.Double()),
    sa.Column("output_cost_usd", sa.Double()),
    sa.Column("wasted", sa.Boolean(), nullable=False),
    sa.Column("waste_reason", sa.String()),
    sa.Column("tags", sa.JSON(), nullable=False),
    sa.Column("fingerprint", sa.String()),
    sa.Column("revision", sa.Integer(), nullable=False),
    # Sizes of the prompt and its stable prefix, of retries only (migration 0005): avoidable waste.
    sa.Column("prompt_bytes", sa.BigInteger()),
    sa.Column("stable_prefix_bytes", sa.BigInteger()),
    # Migration 0006: server-tool fees (NULL on rows stored before: read as none) and where inference ran.
    sa.Column("server_tool_cost_usd", sa.Double()),
    sa.Column("inference_geo", sa.String()),
    # Where the attempt went (migration 0007): anthropic, bedrock, vertex or foundry.
    sa.Column("platform", sa.String(), server_default="anthropic", nullable=False),
    # True when a token count beyond MAX_TOKENS_PER_ATTEMPT was clamped to it (migration 0008).
    sa.Column("tokens_clamped", sa.Boolean(), server_default=sa.false(), nullable=False),
    # Where output_tokens came from (migration 0011): reported, estimated, counted or reconciled.
    sa.Column("output_source", sa.String(), server_default="reported", nullable=False),
    # Bedrock's and Vertex's endpoint kind, global or regional (migration 0014).
    sa.Column("endpoint", sa.String()),
    # The writer finds attempts by fingerprint in two ways (migration 0004): abandoned ones, for
    # the retries landing now (a partial index: few rows, and those rows change), and any attempt
    # started in a given hour, for the retries of abandoned attempts landing now. Keyed by hour
    # first, an attempt's index entry lands next to those of the attempts of the same hour (a batch
    # dirties a few pages), where an index on the fingerprint alone, a hash, dirtied a page a row.
    sa.Index(
        "ix_costwatch_attempts_abandoned_fingerprint",
        "fingerprint",
        info={"where": "waste_reason = 'abandoned'"},
    ),
    sa.Index("ix_costwatch_attempts_hour_fingerprint", utc_hour(sa.column("started_at")), "fingerprint"),
)
"""One row per HTTP attempt: every field of :class:`~costwatch.records.AttemptRecord`, latest revision.

On PostgreSQL (migration 0013) the table is partitioned by day on ``started_at`` and its primary
key is ``(attempt_id, started_at)`` (``costwatch.store.partitions``); this definition keeps SQLite's.
"""

ROLLUPS = sa.Table(
    "costwatch_hourly_rollups",
    metadata,
    sa.Column("hour", UtcDateTime(), primary_key=True),
    sa.Column("model", sa.String(), primary_key=True),
    sa.Column("outcome", sa.String(), primary_key=True),
    sa.Column("error_type", sa.String(), primary_key=True),
    sa.Column("waste_reason", sa.String(), primary_key=True),
    sa.Column("workflow", sa.String(), primary_key=True),
    # Where the attempts went (migration 0014): anthropic, bedrock, vertex or foundry.
    sa.Column("platform", sa.String(), primary_key=True, server_default="anthropic"),
    *_rollup_measures(),
)
"""Sums over the attempts that started in one UTC hour, for one combination of dimensions."""

ROLLUP_DIMENSIONS = tuple(column.name for column in ROLLUPS.primary_key.columns)
"""The columns a rollup row is keyed by (``hour``, ``model``, ``outcome``, ``error_type``,
``waste_reason``, ``workflow``, ``platform``); absent values are stored as ``""`` so they can be keys."""

ROLLUP_MEASURES = tuple(column.name for column in ROLLUPS.columns if not column.primary_key)
"""The additive columns of a rollup row, in the order the table declares them
(read from the table, so a new measure column is a new measure everywhere).

``unpriced_*`` count attempts on models without a known price (and their billed tokens), which
add nothing to the costs; ``wasted_*_cost_usd`` split ``wasted_cost_usd`` by the part of the bill
(migration 0006)."""


ALL_TIME_DIMENSIONS = ROLLUP_DIMENSIONS[1:]
"""The columns an all-time rollup row is keyed by: the hourly rollups' dimensions but the hour."""

ALL_TIME_ROLLUPS = sa.Table(
    "costwatch_all_time_rollups",
    metadata,
    sa.Column("model", sa.String(), primary_key=True),
    sa.Column("outcome", sa.String(), primary_key=True),
    sa.Column("error_type", sa.String(), primary_key=True),
    sa.Column("waste_reason", sa.String(), primary_key=True),
    sa.Column("workflow", sa.String(), primary_key=True),
    sa.Column("platform", sa.String(), primary_key=True, server_default="anthropic"),
    sa.Column("first_hour", UtcDateTime(), nullable=False),
    *_rollup_measures(),
)
"""Sums over every attempt ever stored, for one combination of dimensions, and its first hour.

The writer moves it by the same deltas as the hourly rollups, in the same transaction, so each
row equals the sum of the hourly rows of its dimensions. ``first_hour`` is the earliest hour
any of those hourly rows has (it orders label values by when they first appeared); rows that
sum to zero attempts are kept for it, as the hourly rows are.
"""

REJECTED_ATTEMPTS = sa.Table(
    "costwatch_rejected_attempts",
    metadata,
    sa.Column("attempt_id", sa.String(), primary_key=True),
    sa.Column("revision", sa.Integer(), primary_key=True),
    sa.Column("rejected_at", UtcDateTime(), nullable=False),
    sa.Column("reason", sa.String(), nullable=False),
    sa.Column("record", sa.Text(), nullable=False),
)
"""The dead-letter table: attempt records the database refused, kept with its reason, never retried.

``record`` is the record's JSON (ASCII-escaped, so text any backend stores); the key is its
``attempt_id`` and ``revision``, so a refused record delivered twice is kept once.
"""

CALIBRATION_SAMPLES = sa.Table(
    "costwatch_calibration_samples",
    metadata,
    # An integer key in insertion order: the cursor of a refresh (ids drawn at an attempt's start
    # are written out of order, by as long as a stream lasts).
    sa.Column(
        "sample_id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("attempt_id", sa.String(), unique=True, nullable=False),
    sa.Column("started_at", UtcDateTime(), nullable=False),
    sa.Column("model", sa.String(), nullable=False),
    sa.Column("output_tokens", sa.BigInteger()),
    sa.Column("chars", sa.JSON(), nullable=False),
    sa.Column("writer", sa.String(), nullable=False),
    # Where output_tokens came from (migration 0012): reported by the API for a completed attempt,
    # estimated (no tokens yet), counted, or reconciled: the billed output `costwatch reconcile`
    # found for a dropped attempt.
    sa.Column("output_source", sa.String(), server_default="reported", nullable=False),
    # The estimated attempts of a time window (migration 0015), for revising their estimates as the
    # calibration improves: a partial index, since completed samples are most rows and never revised.
    sa.Index(
        "ix_costwatch_calibration_samples_estimated_started_at",
        "started_at",
        info={"where": "output_tokens IS NULL"},
    ),
)
"""The characters of output an attempt received, by content type and class, and its output tokens.

Completed attempts measured to calibrate the output estimator (``output_tokens`` reported) are the
fleet's calibration; dropped ones (``output_tokens`` NULL: estimated) keep what their estimate was
made from. Counts only, never text. ``writer`` says which process wrote the row, so a process
refreshing its calibration skips the samples it has already seen itself.
"""

RECONCILIATIONS = sa.Table(
    "costwatch_reconciliations",
    metadata,
    sa.Column("bucket_start", UtcDateTime(), primary_key=True),
    # The bucket width: 1m, 1h or 1d.
    sa.Column("bucket", sa.String(), primary_key=True),
    sa.Column("model", sa.String(), primary_key=True),
    # The --api-key-id filters, sorted and comma-joined ("": the whole organization).
    sa.Column("scope", sa.String(), primary_key=True),
    sa.Column("reported_input_tokens", sa.BigInteger(), nullable=False),
    sa.Column("reported_cache_read_tokens", sa.BigInteger(), nullable=False),
    sa.Column("reported_cache_write_tokens", sa.BigInteger(), nullable=False),
    sa.Column("reported_output_tokens", sa.BigInteger(), nullable=False),
    sa.Column("reported_requests", sa.BigInteger(), nullable=False),
    sa.Column("reported_cost_usd", sa.Double()),
    sa.Column("recorded_input_tokens", sa.BigInteger(), nullable=False),
    sa.Column("recorded_cache_read_tokens", sa.BigInteger(), nullable=False),
    sa.Column("recorded_cache_write_tokens", sa.BigInteger(), nullable=False),
    sa.Column("recorded_output_tokens", sa.BigInteger(), nullable=False),
    sa.Column("recorded_output_estimated_tokens", sa.BigInteger(), nullable=False),
    # NULL: the model has no price (unseen dollars unknown) / the bucket's input was not all seen.
    sa.Column("unseen_cost_usd", sa.Double()),
    sa.Column("residual_output_tokens", sa.BigInteger()),
    sa.Column("reconciled_at", UtcDateTime(), nullable=False),
    # The estimates corrected by the bill (migration 0012): the row's correction status and why it
    # was left alone, the attempts that carry the billed output, what costwatch had estimated for
    # the dropped attempts' output, and their wasted dollars at the estimate and at the bill (NULL
    # unless every estimate of the row was corrected, or for an unpriced model).
    sa.Column("correction", sa.String(), server_default="none", nullable=False),
    sa.Column("correction_reason", sa.String()),
    sa.Column("corrected_attempts", sa.BigInteger(), server_default="0", nullable=False),
    sa.Column("dropped_estimated_output_tokens", sa.BigInteger()),
    sa.Column("estimated_wasted_cost_usd", sa.Double()),
    sa.Column("billed_wasted_cost_usd", sa.Double()),
)
"""One time bucket and model of a ``costwatch reconcile`` run: Anthropic's figures beside the
store's (migration 0010). Reconciling the bucket again replaces the row."""

RETENTION = sa.Table(
    "costwatch_retention",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("pruned_before", UtcDateTime(), nullable=False),
    sa.Column("pruned_at", UtcDateTime(), nullable=False),
)
"""The cutoff of the latest prune (migration 0013): one row, ``id`` 1.

Attempts that started before ``pruned_before`` may have been stored and pruned, so the writer
does not store a record that started before it again (its rollups would count it twice): it
keeps it with the refused records instead.
"""


RETRIED_REQUESTS = sa.Table(
    "costwatch_retried_requests",
    metadata,
    sa.Column("logical_request_id", sa.String(), primary_key=True),
    sa.Column("attempts", sa.BigInteger(), nullable=False),
    # Attempts that billed a prompt; of those, that read or wrote the prompt cache; whose prompt and
    # stable prefix sizes were measured.
    sa.Column("billed_attempts", sa.BigInteger(), nullable=False),
    sa.Column("cached_attempts", sa.BigInteger(), nullable=False),
    sa.Column("measured_attempts", sa.BigInteger(), nullable=False),
    sa.Column("wasted_cost_usd", sa.Double(), nullable=False),
    sa.Column("last_attempt_number", sa.Integer(), nullable=False),
    sa.Column("last_started_at", UtcDateTime(), nullable=False),
    sa.Column("last_attempt_id", sa.String(), nullable=False),
    sa.Column("model", sa.String(), nullable=False),
    sa.Column("workflow", sa.String(), nullable=False),
    sa.Column("platform", sa.String(), nullable=False),
    sa.Column("endpoint", sa.String()),
    sa.Column("inference_geo", sa.String()),
    # JSONB on PostgreSQL: a batch merges its attempts' entries into the stored ones (``||``).
    sa.Column("prompts", JsonObject(), nullable=False),
    # The requests the report prices one by one: the others are read summed from
    # ``costwatch_retried_alike``, so the report never scans this table.
    sa.Index(
        "ix_costwatch_retried_requests_priced_one_by_one",
        "logical_request_id",
        info={"where": "billed_attempts >= 2 AND cached_attempts = 0 AND measured_attempts > 0"},
    ),
)
"""One retried logical request (one with an attempt numbered 2 or more): what the report's avoidable
waste reads of it, kept by the writer (migration 0016; ``costwatch.store.retried``).

The sums are over the request's attempts (their latest revisions); the pricing keys are its last
attempt's (by attempt number, then start, then id); ``prompts`` holds each attempt's prompt as
pricing one by one reads it, by ``attempt_id``: ``[attempt_number, started_at in microseconds since
1970, prompt_tokens, prompt_bytes, stable_prefix_bytes]``. A prune leaves the rows, as it leaves the
rollups."""

RETRIED_ALIKE = sa.Table(
    "costwatch_retried_alike",
    metadata,
    sa.Column("already_cached", sa.Boolean(), primary_key=True),
    sa.Column("model", sa.String(), primary_key=True),
    sa.Column("workflow", sa.String(), primary_key=True),
    sa.Column("platform", sa.String(), primary_key=True),
    sa.Column("endpoint", sa.String(), primary_key=True),
    sa.Column("requests", sa.BigInteger(), nullable=False),
    sa.Column("attempts", sa.BigInteger(), nullable=False),
    sa.Column("wasted_cost_usd", sa.Double(), nullable=False),
)
"""The retried requests with nothing to price one by one, summed (migration 0016): those that billed a
prompt twice or more and already read or wrote the prompt cache (``already_cached``), or none of whose
attempts was measured; keyed by their last attempt's model, workflow, platform and endpoint (``""``:
none). The writer moves it by each changed summary's old and new place, in the same transaction, so
it always equals those summaries grouped; rows that sum to no request are kept."""
