"""The retention benchmark's bulk fill (``benchmarks/bulk_fill.py``) makes the store the writer makes:
one day written through the writer and copied to later days in SQL holds the same attempts and
rollups, reports the same and prunes the same as the same copies written through the writer."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import POSTGRES, postgres_schema_url

from costwatch import cli
from costwatch.pricing import load_prices
from costwatch.store import SqlStore
from costwatch.store.partitions import ensure_day_partitions
from costwatch.store.schema import metadata

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bulk_fill import UnknownTable, copy_day, replicated
from store_scale import synthetic_attempts

NOW = datetime.now(timezone.utc)
FIRST = (NOW - timedelta(days=4)).replace(hour=0, minute=0, second=0, microsecond=0)
DAYS = 3  # the template day and two copies; then the days up to now through the writer


@pytest.fixture
def two_stores(postgres_schema: str) -> Iterator[tuple[SqlStore, SqlStore]]:
    """Two empty stores on PostgreSQL with day partitions from ``FIRST`` to today."""
    other = f"{postgres_schema}_w"
    admin = sa.create_engine(POSTGRES)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{other}"')
    stores = (SqlStore(postgres_schema_url(postgres_schema)), SqlStore(postgres_schema_url(other)))
    try:
        for store in stores:
            with store.engine.begin() as connection:
                ensure_day_partitions(connection, FIRST.date(), NOW.date())
        yield stores
    finally:
        for store in stores:
            store.shutdown()
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{other}" CASCADE')
        admin.dispose()


def table_rows(store: SqlStore, table: sa.Table, key: Sequence[str]) -> list[tuple[Any, ...]]:
    with store.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.select(table).order_by(*key))]


def report(store: SqlStore) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["report", "--by", "model", "--db", store.engine.url.render_as_string(False)]) == 0
    return out.getvalue()


@pytest.mark.postgres
def test_a_day_copied_in_sql_is_the_store_the_writer_makes_of_the_same_copies(
    two_stores: tuple[SqlStore, SqlStore],
) -> None:
    bulk, writer = two_stores
    prices = load_prices()
    template = synthetic_attempts(
        150, seed=3, start=FIRST, end=FIRST + timedelta(days=1, minutes=-1), prices=prices
    )
    later = synthetic_attempts(
        60, seed=4, start=FIRST + timedelta(days=DAYS), end=NOW - timedelta(minutes=1), prices=prices
    )
    assert any(r.waste_reason is not None for r in template) and any(r.attempt_number > 1 for r in template)

    bulk.export(template)
    assert copy_day(bulk.engine, FIRST.date(), DAYS - 1) == 2 * len(template)
    bulk.export(later)
    writer.export(template)
    for days in range(1, DAYS):
        writer.export([replicated(record, days) for record in template])
    writer.export(later)

    assert bulk.attempt_count() == writer.attempt_count() == DAYS * len(template) + len(later)
    # Every table: the attempts, the hourly and all-time rollups, and whatever else the writer keeps.
    # Sums made in SQL against sums made batch by batch: the same to the last few bits of a dollar.
    for table in metadata.sorted_tables:
        key = [column.name for column in table.primary_key.columns]
        assert table_rows(bulk, table, key) == [
            tuple(pytest.approx(value, rel=1e-12) if isinstance(value, float) else value for value in row)
            for row in table_rows(writer, table, key)
        ], table.name
    assert report(bulk) == report(writer)

    cutoff = FIRST + timedelta(days=2)
    assert bulk.prune_before(cutoff) == writer.prune_before(cutoff) == 2 * len(template)
    assert report(bulk) == report(writer)


@pytest.mark.postgres
def test_a_day_that_filled_a_table_the_copy_does_not_know_is_refused(
    two_stores: tuple[SqlStore, SqlStore],
) -> None:
    bulk, _ = two_stores
    bulk.export(
        synthetic_attempts(10, seed=3, start=FIRST, end=FIRST + timedelta(hours=1), prices=load_prices())
    )
    with bulk.engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO costwatch_rejected_attempts VALUES ('a', 1, now(), 'refused', '{}')"
        )

    with pytest.raises(UnknownTable, match="costwatch_rejected_attempts"):
        copy_day(bulk.engine, FIRST.date(), 1)
