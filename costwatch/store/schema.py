"""The store's tables: one row per attempt, and hourly rollups that reports and exporters read.

The tables carry a ``costwatch_`` prefix (and Alembic's version table is ``costwatch_alembic_version``)
so the store can live in an application's own database next to its own tables and migrations.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
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
    "AllTimeRollup",
    "Attempt",
    "Base",
    "CalibrationSample",
    "HourlyRollup",
    "Reconciliation",
    "RejectedAttempt",
    "Retention",
    "RetriedAlikeSums",
    "RetriedRequestSummary",
    "UtcDateTime",
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
"""The store's ``MetaData``; Alembic's autogenerate compares the migrations against it."""


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


class Base(DeclarativeBase):
    """Declarative base bound to the store's ``metadata``."""

    metadata = metadata


class Attempt(Base):
    """One HTTP attempt: every field of :class:`~costwatch.records.AttemptRecord`, latest revision.

    On PostgreSQL (migration 0013) the table is partitioned by day on ``started_at`` and its primary
    key is ``(attempt_id, started_at)`` (``costwatch.store.partitions``); the model keeps SQLite's.
    """

    __tablename__ = "costwatch_attempts"

    attempt_id: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    logical_request_id: Mapped[str] = mapped_column(sa.String(), index=True)
    attempt_number: Mapped[int] = mapped_column(sa.Integer())
    # Not indexed: nothing reads attempts by time but retention (migration 0002).
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    outcome: Mapped[str] = mapped_column(sa.String())
    model_requested: Mapped[str] = mapped_column(sa.String())
    model: Mapped[str | None] = mapped_column(sa.String())
    stream: Mapped[bool] = mapped_column(sa.Boolean())
    beta_features: Mapped[list[str]] = mapped_column(sa.JSON())
    request_id: Mapped[str | None] = mapped_column(sa.String())
    message_id: Mapped[str | None] = mapped_column(sa.String())
    sdk_retry: Mapped[int] = mapped_column(sa.Integer())
    http_status: Mapped[int | None] = mapped_column(sa.Integer())
    error_type: Mapped[str | None] = mapped_column(sa.String())
    api_error_type: Mapped[str | None] = mapped_column(sa.String())
    time_to_first_token_s: Mapped[float | None] = mapped_column(sa.Double())
    duration_s: Mapped[float] = mapped_column(sa.Double())
    input_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    cache_write_5m_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    cache_write_1h_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    cache_read_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    output_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    output_estimated: Mapped[bool] = mapped_column(sa.Boolean())
    estimated_output_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    server_tool_use: Mapped[dict[str, int]] = mapped_column(sa.JSON())
    stop_reason: Mapped[str | None] = mapped_column(sa.String())
    events_received: Mapped[int] = mapped_column(sa.BigInteger())
    bytes_received: Mapped[int] = mapped_column(sa.BigInteger())
    # NULL cost columns mean "no known price" (AttemptRecord.cost is None), not zero.
    input_cost_usd: Mapped[float | None] = mapped_column(sa.Double())
    cache_write_cost_usd: Mapped[float | None] = mapped_column(sa.Double())
    cache_read_cost_usd: Mapped[float | None] = mapped_column(sa.Double())
    output_cost_usd: Mapped[float | None] = mapped_column(sa.Double())
    wasted: Mapped[bool] = mapped_column(sa.Boolean())
    waste_reason: Mapped[str | None] = mapped_column(sa.String())
    tags: Mapped[dict[str, str]] = mapped_column(sa.JSON())
    fingerprint: Mapped[str | None] = mapped_column(sa.String())
    revision: Mapped[int] = mapped_column(sa.Integer())
    # Sizes of the prompt and its stable prefix, of retries only (migration 0005): avoidable waste.
    prompt_bytes: Mapped[int | None] = mapped_column(sa.BigInteger())
    stable_prefix_bytes: Mapped[int | None] = mapped_column(sa.BigInteger())
    # Migration 0006: server-tool fees (NULL on rows stored before: read as none) and where inference ran.
    server_tool_cost_usd: Mapped[float | None] = mapped_column(sa.Double())
    inference_geo: Mapped[str | None] = mapped_column(sa.String())
    platform: Mapped[str] = mapped_column(sa.String(), server_default="anthropic")
    """Where the attempt went (migration 0007): anthropic, bedrock, vertex or foundry."""
    # True when a token count beyond MAX_TOKENS_PER_ATTEMPT was clamped to it (migration 0008).
    tokens_clamped: Mapped[bool] = mapped_column(sa.Boolean(), server_default=sa.false())
    output_source: Mapped[str] = mapped_column(sa.String(), server_default="reported")
    """Where ``output_tokens`` came from (migration 0011): reported, estimated, counted or reconciled."""
    endpoint: Mapped[str | None] = mapped_column(sa.String())
    """Bedrock's and Vertex's endpoint kind, ``global`` or ``regional`` (migration 0014)."""

    # The writer finds attempts by fingerprint in two ways (migration 0004): abandoned ones, for
    # the retries landing now (a partial index: few rows, and those rows change), and any attempt
    # started in a given hour, for the retries of abandoned attempts landing now. Keyed by hour
    # first, an attempt's index entry lands next to those of the attempts of the same hour (a batch
    # dirties a few pages), where an index on the fingerprint alone, a hash, dirtied a page a row.
    __table_args__ = (
        sa.Index(
            "ix_costwatch_attempts_abandoned_fingerprint",
            "fingerprint",
            sqlite_where=sa.text("waste_reason = 'abandoned'"),
            postgresql_where=sa.text("waste_reason = 'abandoned'"),
        ),
        sa.Index("ix_costwatch_attempts_hour_fingerprint", utc_hour(sa.column("started_at")), "fingerprint"),
    )


class _RollupMeasures:
    """The additive columns every rollup table has, after its own key columns."""

    attempts: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    dropped_attempts: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    logical_requests_started: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    billed_input_tokens: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    billed_output_tokens: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    billed_cache_read_tokens: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    billed_cache_write_tokens: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    wasted_input_tokens: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    wasted_output_tokens: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    wasted_cache_read_tokens: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    wasted_cache_write_tokens: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    billed_cost_usd: Mapped[float] = mapped_column(sa.Double(), sort_order=1)
    wasted_cost_usd: Mapped[float] = mapped_column(sa.Double(), sort_order=1)
    estimated_output_tokens: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    duration_s: Mapped[float] = mapped_column(sa.Double(), sort_order=1)
    unpriced_attempts: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    unpriced_tokens: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    wasted_input_cost_usd: Mapped[float] = mapped_column(sa.Double(), sort_order=1)
    wasted_cache_read_cost_usd: Mapped[float] = mapped_column(sa.Double(), sort_order=1)
    wasted_cache_write_cost_usd: Mapped[float] = mapped_column(sa.Double(), sort_order=1)
    wasted_output_cost_usd: Mapped[float] = mapped_column(sa.Double(), sort_order=1)
    wasted_server_tool_cost_usd: Mapped[float] = mapped_column(sa.Double(), sort_order=1)
    # Billed output by where its count came from (migration 0011; OutputSource). The estimated
    # tokens are ``estimated_output_tokens`` above; the four token figures sum to billed_output_tokens.
    reported_output_tokens: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    counted_output_tokens: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    reconciled_output_tokens: Mapped[int] = mapped_column(sa.BigInteger(), sort_order=1)
    reported_output_cost_usd: Mapped[float] = mapped_column(sa.Double(), sort_order=1)
    estimated_output_cost_usd: Mapped[float] = mapped_column(sa.Double(), sort_order=1)
    counted_output_cost_usd: Mapped[float] = mapped_column(sa.Double(), sort_order=1)
    reconciled_output_cost_usd: Mapped[float] = mapped_column(sa.Double(), sort_order=1)


class HourlyRollup(_RollupMeasures, Base):
    """Sums over the attempts that started in one UTC hour, for one combination of dimensions."""

    __tablename__ = "costwatch_hourly_rollups"

    hour: Mapped[datetime] = mapped_column(UtcDateTime(), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    outcome: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    error_type: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    waste_reason: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    workflow: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    platform: Mapped[str] = mapped_column(sa.String(), primary_key=True, server_default="anthropic")
    """Where the attempts went (migration 0014): anthropic, bedrock, vertex or foundry."""


ATTEMPTS = cast(sa.Table, Attempt.__table__)
"""The attempts table, for Core statements."""

ROLLUPS = cast(sa.Table, HourlyRollup.__table__)
"""The hourly rollups table, for Core statements."""

ROLLUP_DIMENSIONS = tuple(column.name for column in ROLLUPS.primary_key.columns)
"""The columns a rollup row is keyed by (``hour``, ``model``, ``outcome``, ``error_type``,
``waste_reason``, ``workflow``, ``platform``); absent values are stored as ``""`` so they can be keys."""

ROLLUP_MEASURES = tuple(column.name for column in ROLLUPS.columns if not column.primary_key)
"""The additive columns of a rollup row, in the order :class:`HourlyRollup` declares them
(read from the table, so a new measure column is a new measure everywhere).

``unpriced_*`` count attempts on models without a known price (and their billed tokens), which
add nothing to the costs; ``wasted_*_cost_usd`` split ``wasted_cost_usd`` by the part of the bill
(migration 0006)."""


ALL_TIME_DIMENSIONS = ROLLUP_DIMENSIONS[1:]
"""The columns an all-time rollup row is keyed by: the hourly rollups' dimensions but the hour."""


class AllTimeRollup(_RollupMeasures, Base):
    """Sums over every attempt ever stored, for one combination of dimensions, and its first hour.

    The writer moves it by the same deltas as the hourly rollups, in the same transaction, so each
    row equals the sum of the hourly rows of its dimensions. ``first_hour`` is the earliest hour
    any of those hourly rows has (it orders label values by when they first appeared); rows that
    sum to zero attempts are kept for it, as the hourly rows are.
    """

    __tablename__ = "costwatch_all_time_rollups"

    model: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    outcome: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    error_type: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    waste_reason: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    workflow: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    platform: Mapped[str] = mapped_column(sa.String(), primary_key=True, server_default="anthropic")
    first_hour: Mapped[datetime] = mapped_column(UtcDateTime())


ALL_TIME_ROLLUPS = cast(sa.Table, AllTimeRollup.__table__)
"""The all-time rollups table, for Core statements."""


class RejectedAttempt(Base):
    """An attempt record the database refused, kept with the database's reason and never retried.

    ``record`` is the record's JSON (ASCII-escaped, so text any backend stores); the key is its
    ``attempt_id`` and ``revision``, so a refused record delivered twice is kept once.
    """

    __tablename__ = "costwatch_rejected_attempts"

    attempt_id: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    revision: Mapped[int] = mapped_column(sa.Integer(), primary_key=True)
    rejected_at: Mapped[datetime] = mapped_column(UtcDateTime())
    reason: Mapped[str] = mapped_column(sa.String())
    record: Mapped[str] = mapped_column(sa.Text())


REJECTED_ATTEMPTS = cast(sa.Table, RejectedAttempt.__table__)
"""The dead-letter table of refused attempt records, for Core statements."""


class CalibrationSample(Base):
    """The characters of output an attempt received, by content type and class, and its output tokens.

    Completed attempts measured to calibrate the output estimator (``output_tokens`` reported) are the
    fleet's calibration; dropped ones (``output_tokens`` NULL: estimated) keep what their estimate was
    made from. Counts only, never text. ``writer`` says which process wrote the row, so a process
    refreshing its calibration skips the samples it has already seen itself.
    """

    __tablename__ = "costwatch_calibration_samples"

    # An integer key in insertion order: the cursor of a refresh (ids drawn at an attempt's start
    # are written out of order, by as long as a stream lasts).
    sample_id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    attempt_id: Mapped[str] = mapped_column(sa.String(), unique=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    model: Mapped[str] = mapped_column(sa.String())
    output_tokens: Mapped[int | None] = mapped_column(sa.BigInteger())
    chars: Mapped[dict[str, int]] = mapped_column(sa.JSON())
    writer: Mapped[str] = mapped_column(sa.String())
    output_source: Mapped[str] = mapped_column(sa.String(), server_default="reported")
    """Where ``output_tokens`` came from (migration 0012): ``reported`` by the API for a completed
    attempt, ``estimated`` (no tokens yet), ``counted``, or ``reconciled``: the billed output
    ``costwatch reconcile`` found for a dropped attempt."""

    # The estimated attempts of a time window (migration 0015), for revising their estimates as the
    # calibration improves: a partial index, since completed samples are most rows and never revised.
    __table_args__ = (
        sa.Index(
            "ix_costwatch_calibration_samples_estimated_started_at",
            "started_at",
            sqlite_where=sa.text("output_tokens IS NULL"),
            postgresql_where=sa.text("output_tokens IS NULL"),
        ),
    )


CALIBRATION_SAMPLES = cast(sa.Table, CalibrationSample.__table__)
"""The calibration samples table, for Core statements."""


class Reconciliation(Base):
    """One time bucket and model of a ``costwatch reconcile`` run: Anthropic's figures beside the
    store's (migration 0010). Reconciling the bucket again replaces the row."""

    __tablename__ = "costwatch_reconciliations"

    bucket_start: Mapped[datetime] = mapped_column(UtcDateTime(), primary_key=True)
    bucket: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    """The bucket width: ``1m``, ``1h`` or ``1d``."""
    model: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    scope: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    """The ``--api-key-id`` filters, sorted and comma-joined (``""``: the whole organization)."""
    reported_input_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    reported_cache_read_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    reported_cache_write_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    reported_output_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    reported_requests: Mapped[int] = mapped_column(sa.BigInteger())
    reported_cost_usd: Mapped[float | None] = mapped_column(sa.Double())
    recorded_input_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    recorded_cache_read_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    recorded_cache_write_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    recorded_output_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    recorded_output_estimated_tokens: Mapped[int] = mapped_column(sa.BigInteger())
    # NULL: the model has no price (unseen dollars unknown) / the bucket's input was not all seen.
    unseen_cost_usd: Mapped[float | None] = mapped_column(sa.Double())
    residual_output_tokens: Mapped[int | None] = mapped_column(sa.BigInteger())
    reconciled_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # The estimates corrected by the bill (migration 0012): the row's correction status and why it
    # was left alone, the attempts that carry the billed output, what costwatch had estimated for
    # the dropped attempts' output, and their wasted dollars at the estimate and at the bill (NULL
    # unless every estimate of the row was corrected, or for an unpriced model).
    correction: Mapped[str] = mapped_column(sa.String(), server_default="none")
    correction_reason: Mapped[str | None] = mapped_column(sa.String())
    corrected_attempts: Mapped[int] = mapped_column(sa.BigInteger(), server_default="0")
    dropped_estimated_output_tokens: Mapped[int | None] = mapped_column(sa.BigInteger())
    estimated_wasted_cost_usd: Mapped[float | None] = mapped_column(sa.Double())
    billed_wasted_cost_usd: Mapped[float | None] = mapped_column(sa.Double())


RECONCILIATIONS = cast(sa.Table, Reconciliation.__table__)
"""The reconciliations table, for Core statements."""


class Retention(Base):
    """The cutoff of the latest prune (migration 0013): one row, ``id`` 1.

    Attempts that started before ``pruned_before`` may have been stored and pruned, so the writer
    does not store a record that started before it again (its rollups would count it twice): it
    keeps it with the refused records instead.
    """

    __tablename__ = "costwatch_retention"

    id: Mapped[int] = mapped_column(sa.Integer(), primary_key=True, autoincrement=False)
    pruned_before: Mapped[datetime] = mapped_column(UtcDateTime())
    pruned_at: Mapped[datetime] = mapped_column(UtcDateTime())


RETENTION = cast(sa.Table, Retention.__table__)
"""The retention cutoff table, for Core statements."""


class RetriedRequestSummary(Base):
    """One retried logical request (one with an attempt numbered 2 or more): what the report's
    avoidable waste reads of it, kept by the writer (migration 0016; ``costwatch.store.retried``).

    The sums are over the request's attempts (their latest revisions); the pricing keys are its last
    attempt's (by attempt number, then start, then id); ``prompts`` holds each attempt's prompt as
    pricing one by one reads it, by ``attempt_id``: ``[attempt_number, started_at in microseconds
    since 1970, prompt_tokens, prompt_bytes, stable_prefix_bytes]``. A prune leaves the rows, as it
    leaves the rollups.
    """

    __tablename__ = "costwatch_retried_requests"

    logical_request_id: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    attempts: Mapped[int] = mapped_column(sa.BigInteger())
    billed_attempts: Mapped[int] = mapped_column(sa.BigInteger())
    """Attempts that billed a prompt (input, cache reads or cache writes)."""
    cached_attempts: Mapped[int] = mapped_column(sa.BigInteger())
    """Attempts that billed a prompt and read or wrote the prompt cache."""
    measured_attempts: Mapped[int] = mapped_column(sa.BigInteger())
    """Attempts whose prompt and stable prefix sizes were measured."""
    wasted_cost_usd: Mapped[float] = mapped_column(sa.Double())
    last_attempt_number: Mapped[int] = mapped_column(sa.Integer())
    last_started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_attempt_id: Mapped[str] = mapped_column(sa.String())
    model: Mapped[str] = mapped_column(sa.String())
    workflow: Mapped[str] = mapped_column(sa.String())
    platform: Mapped[str] = mapped_column(sa.String())
    endpoint: Mapped[str | None] = mapped_column(sa.String())
    inference_geo: Mapped[str | None] = mapped_column(sa.String())
    # JSONB on PostgreSQL: a batch merges its attempts' entries into the stored ones (``||``).
    prompts: Mapped[dict[str, list[int | None]]] = mapped_column(
        sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    )

    # The requests the report prices one by one (billed a prompt twice, none cached, one measured):
    # the others are read summed from ``costwatch_retried_alike``, so the report never scans this table.
    __table_args__ = (
        sa.Index(
            "ix_costwatch_retried_requests_priced_one_by_one",
            "logical_request_id",
            sqlite_where=sa.text("billed_attempts >= 2 AND cached_attempts = 0 AND measured_attempts > 0"),
            postgresql_where=sa.text(
                "billed_attempts >= 2 AND cached_attempts = 0 AND measured_attempts > 0"
            ),
        ),
    )


RETRIED_REQUESTS = cast(sa.Table, RetriedRequestSummary.__table__)
"""The retried requests' summaries, for Core statements."""


class RetriedAlikeSums(Base):
    """The retried requests with nothing to price one by one, summed (migration 0016): those that billed
    a prompt twice or more and already read or wrote the prompt cache (``already_cached``), or none of
    whose attempts was measured; keyed by their last attempt's model, workflow, platform and endpoint
    (``""``: none). The writer moves it by each changed summary's old and new place, in the same
    transaction, so it always equals those summaries grouped; rows that sum to no request are kept.
    """

    __tablename__ = "costwatch_retried_alike"

    already_cached: Mapped[bool] = mapped_column(sa.Boolean(), primary_key=True)
    model: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    workflow: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    platform: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    endpoint: Mapped[str] = mapped_column(sa.String(), primary_key=True)
    requests: Mapped[int] = mapped_column(sa.BigInteger())
    attempts: Mapped[int] = mapped_column(sa.BigInteger())
    wasted_cost_usd: Mapped[float] = mapped_column(sa.Double())


RETRIED_ALIKE = cast(sa.Table, RetriedAlikeSums.__table__)
"""The sums of retried requests alike, for Core statements."""
