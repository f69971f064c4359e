"""Retention at scale: the attempts table partitioned by day on PostgreSQL (created ahead, dropped by a
prune, upgraded from an unpartitioned table), and a pruned attempt never counted twice on either
backend."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import postgres_schema_url
from test_store_writes import assert_rollups_match_raw_rows, attempt, dropped, rollup_rows

from costwatch.cli import main
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, WasteReason
from costwatch.reprice import repriced
from costwatch.spool import Spool
from costwatch.store import SqlStore, create_store_engine, migrate
from costwatch.store.partitions import (
    DAYS_AHEAD,
    DEFAULT_PARTITION,
    day_partitions,
    detach_day_partitions,
    detached_partitions,
    drop_detached_partitions,
    ensure_day_partitions,
    partition_name,
)
from costwatch.store.retention import cutoff_for_writing
from costwatch.store.rows import attempt_row
from costwatch.store.schema import ATTEMPTS
from costwatch.validation import storable

TODAY = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)


def on_day(n: int, day: int, **changes: object) -> AttemptRecord:
    """The ``n``-th attempt, started ``day`` days from today (negative: ago), ``n`` minutes past noon."""
    return attempt(n, started_at=TODAY + timedelta(days=day, hours=12, minutes=n), **changes)


@pytest.fixture
def postgres_store(postgres_schema: str) -> Iterator[SqlStore]:
    store = SqlStore(postgres_schema_url(postgres_schema))
    yield store
    store.shutdown()


def partition_days(store: SqlStore) -> list[date]:
    with store.engine.connect() as connection:
        return [partition.day for partition in day_partitions(connection)]


def rows_in(store: SqlStore, table: str) -> set[str]:
    with store.engine.connect() as connection:
        return set(connection.exec_driver_sql(f"SELECT attempt_id FROM {table}").scalars())


def make_days(store: SqlStore, first: int, last: int) -> None:
    """Partitions for the days ``first`` to ``last`` from today, as a store running then made them."""
    with store.engine.begin() as connection:
        ensure_day_partitions(
            connection, (TODAY + timedelta(days=first)).date(), (TODAY + timedelta(days=last)).date()
        )


def reprice(record: AttemptRecord) -> AttemptRecord:
    """The revision ``costwatch reprice`` writes for ``record`` with today's prices."""
    revision = repriced(record, load_prices())
    assert revision is not None
    return revision


# -- partitions -------------------------------------------------------------------------------------
@pytest.mark.postgres
def test_the_writer_creates_day_partitions_ahead_and_rows_land_in_their_day(postgres_store: SqlStore) -> None:
    postgres_store.export([on_day(1, 0), on_day(2, 3)])
    today = TODAY.date()
    assert set(partition_days(postgres_store)) >= {today + timedelta(days=n) for n in range(DAYS_AHEAD + 1)}
    assert rows_in(postgres_store, partition_name(today)) == {"att-1"}
    assert rows_in(postgres_store, partition_name(today + timedelta(days=3))) == {"att-2"}


@pytest.mark.postgres
def test_a_row_no_day_partition_covers_lands_in_the_default_partition_and_moves_out_when_its_day_is_made(
    postgres_store: SqlStore,
) -> None:
    far = on_day(1, 40)  # a clock far ahead, or a day nobody created yet: the insert never fails
    postgres_store.export([far, on_day(2, -400)])
    assert rows_in(postgres_store, DEFAULT_PARTITION) == {"att-1", "att-2"}

    make_days(postgres_store, 40, 40)

    assert rows_in(postgres_store, partition_name((TODAY + timedelta(days=40)).date())) == {"att-1"}
    assert rows_in(postgres_store, DEFAULT_PARTITION) == {"att-2"}
    assert postgres_store.attempt_count() == 2
    assert postgres_store.write([far]).inserted == 0  # still found where it moved


@pytest.mark.postgres
def test_a_long_read_holds_back_the_partitions_ahead_not_the_writes_and_a_later_batch_makes_them(
    postgres_store: SqlStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Creating a partition needs the table to itself: behind a reader holding it (a long report)
    the writer gives up after a moment rather than holding every writer queued behind it for
    seconds; its batch is written all the same (to the DEFAULT partition), and a batch a second or
    so later, the reader gone, makes the partition and moves the row into it."""
    last = TODAY.date() + timedelta(days=DAYS_AHEAD)
    with postgres_store.engine.begin() as connection:  # the store migrated, its partitions made
        connection.exec_driver_sql(f"DROP TABLE {partition_name(last)}")
    reader = create_store_engine(postgres_store.url)
    writer = SqlStore(postgres_store.url)  # a new process's writer: it makes the partitions first
    try:
        with reader.connect() as reading:
            reading.exec_driver_sql("SELECT count(*) FROM costwatch_attempts")  # held until it ends
            with caplog.at_level("WARNING", logger="costwatch"):
                writer.write([on_day(1, DAYS_AHEAD)])
            assert last not in partition_days(postgres_store)
            assert rows_in(postgres_store, DEFAULT_PARTITION) == {"att-1"}
            assert "could not create the attempts table's partitions ahead" in caplog.text
            reading.rollback()
        deadline = time.monotonic() + 60  # a hang detector: the next try is due a second later
        while last not in partition_days(postgres_store) and time.monotonic() < deadline:
            writer.write([on_day(2, 0)])
            time.sleep(0.2)
        assert rows_in(postgres_store, partition_name(last)) == {"att-1"}
        assert rows_in(postgres_store, DEFAULT_PARTITION) == set()
        assert postgres_store.attempt_count() == 2
    finally:
        writer.shutdown()
        reader.dispose()


def partitions_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.levelname for record in caplog.records if "partitions ahead" in record.getMessage()]


@pytest.mark.postgres
def test_a_store_that_finds_another_creating_the_partitions_warns_of_nothing_and_finds_them_made(
    postgres_store: SqlStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A fleet starting on a day without its partitions: all but one process find the creators' lock
    held; that is the normal case, a debug line, and a second later the partitions are there."""
    last = TODAY.date() + timedelta(days=DAYS_AHEAD)
    with postgres_store.engine.begin() as connection:  # the store migrated, its partitions made
        connection.exec_driver_sql(f"DROP TABLE {partition_name(last)}")
    writer = SqlStore(postgres_store.url)  # another process of the fleet, starting
    caplog.set_level("DEBUG", logger="costwatch")
    try:
        with postgres_store.engine.begin() as creating:  # the first process, creating them now
            ensure_day_partitions(creating, TODAY.date(), TODAY.date())  # holds the creators' lock
            writer.write([on_day(1, 0)])  # its try gives up after LOCK_TIMEOUT_MS; its batch is written
        postgres_store.ensure_partitions()  # the first process's creation, done
        time.sleep(1.1)  # the writer's next try is due a second later
        writer.write([on_day(2, 0)])
    finally:
        writer.shutdown()
    assert partitions_lines(caplog) == ["DEBUG"]
    assert last in partition_days(postgres_store) and postgres_store.attempt_count() == 2


@pytest.mark.postgres
def test_partitions_still_missing_after_another_creator_held_them_are_one_warning(
    postgres_store: SqlStore, caplog: pytest.LogCaptureFixture
) -> None:
    last = TODAY.date() + timedelta(days=DAYS_AHEAD)
    with postgres_store.engine.begin() as connection:
        connection.exec_driver_sql(f"DROP TABLE {partition_name(last)}")
    writer = SqlStore(postgres_store.url)
    caplog.set_level("DEBUG", logger="costwatch")
    try:
        with postgres_store.engine.begin() as creating:  # a creator that does not finish
            ensure_day_partitions(creating, TODAY.date(), TODAY.date())
            writer.write([on_day(1, 0)])
            for n in (2, 3):  # the tries a second, then two seconds later
                time.sleep(1.1 * (n - 1))
                writer.write([on_day(n, 0)])
    finally:
        writer.shutdown()
    assert partitions_lines(caplog) == ["DEBUG", "WARNING", "DEBUG"]
    assert last not in partition_days(postgres_store)


@pytest.mark.postgres
def test_redelivery_and_revisions_find_their_row_in_its_day_partition(postgres_store: SqlStore) -> None:
    make_days(postgres_store, -3, 0)
    batch = [on_day(1, -3), dropped(2, started_at=TODAY - timedelta(days=2)), on_day(3, 0)]
    postgres_store.export(batch)
    before = rollup_rows(postgres_store)

    assert postgres_store.write(batch).inserted == 0  # a redelivered batch
    assert rollup_rows(postgres_store) == before
    revised = batch[1].with_waste(WasteReason.RETRIED)
    assert postgres_store.write([revised, reprice(batch[0])]).revised == 2

    assert postgres_store.attempt_count() == 3
    stored = postgres_store.attempt("att-2")
    assert stored is not None and stored.waste_reason is WasteReason.RETRIED
    assert_rollups_match_raw_rows(postgres_store)


def test_every_revision_of_a_record_keeps_the_start_time_of_its_first() -> None:
    """The partitioned key is (attempt_id, started_at): a revision must name the same row."""
    first = dropped(1)
    revisions = [
        first.with_waste(WasteReason.RETRIED),
        reprice(first),
        AttemptRecord.from_dict(first.with_waste(WasteReason.RETRIED).to_dict()),  # through a spool
        storable(dataclasses.replace(first, revision=3, tags={"workflow": "a\x00b"})),
    ]
    assert all(r.started_at == first.started_at and r.revision > first.revision for r in revisions)


# -- prune ------------------------------------------------------------------------------------------
@pytest.mark.postgres
def test_prune_detaches_whole_days_deletes_from_the_day_of_the_cutoff_and_keeps_every_total(
    postgres_store: SqlStore,
) -> None:
    make_days(postgres_store, -5, 0)
    postgres_store.export([on_day(n, day) for day in range(-5, 1) for n in (day * 10 + 60, day * 10 + 65)])
    before = postgres_store.rollup_totals()
    cutoff = TODAY - timedelta(days=2) + timedelta(hours=12, minutes=45)  # between day -2's two attempts

    assert postgres_store.prune_before(cutoff) == 7

    days = partition_days(postgres_store)
    assert min(days) == (TODAY - timedelta(days=2)).date()  # days -5 to -3 are gone whole
    assert rows_in(postgres_store, partition_name(days[0])) == {"att-45"}
    assert postgres_store.attempt_count() == 5
    assert postgres_store.rollup_totals() == before
    assert postgres_store.prune_before(cutoff) == 0
    # Days -2 and -1 detached whole: day -2 holds one row, though its hours' rollups count both of its
    # attempts, so it is counted row by row; day -1, which no prune touched, from the rollups.
    assert postgres_store.prune_before(TODAY) == 1 + 2
    assert postgres_store.rollup_totals() == before


@pytest.mark.postgres
def test_the_detached_days_keep_their_disk_until_dropped_apart(postgres_store: SqlStore) -> None:
    make_days(postgres_store, -5, 0)
    postgres_store.export([on_day(n, day) for day in (-5, -4) for n in (day * 10 + 60, day * 10 + 65)])

    assert postgres_store.prune_before(TODAY - timedelta(days=3)) == 4

    with postgres_store.engine.connect() as connection:
        assert len(detached_partitions(connection)) == 2  # out of the table, still on disk
    assert postgres_store.drop_pruned() > 0
    with postgres_store.engine.connect() as connection:
        assert detached_partitions(connection) == []
    assert postgres_store.drop_pruned() == 0


def test_a_spool_replayed_after_a_prune_adds_nothing_the_rollups_counted(
    store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A spool older than the retention (its batch was written, then the process died before it let
    go of the spool) is replayed after a prune: the pruned attempts are kept apart, not counted again."""
    store = SqlStore(store_url)
    old, recent = [on_day(n, -100) for n in range(5)], [on_day(n, 0) for n in range(5, 8)]
    store.export([*old, *recent])
    spool = Spool(tmp_path / "spool")
    spool.append(store.name, [*old, old[0].with_waste(WasteReason.RETRIED), *recent, on_day(9, 0)])
    spool.close()
    assert main(["db", "prune", "--older-than", "90d", "--db", store_url]) == 0
    before = store.rollup_totals()

    assert main(["db", "replay", "--db", store_url, "--spool-dir", str(tmp_path / "spool")]) == 0

    totals = store.rollup_totals()
    assert totals[0].attempts == before[0].attempts + 1  # att-9 only: new, after the cutoff
    assert totals[0].billed_cost_usd == pytest.approx(before[0].billed_cost_usd + on_day(9, 0).cost.total_usd)
    assert store.attempt_count() == 4
    rejected, latest = store.rejected()
    assert rejected == 5 and {r.attempt_id for r in latest} == {r.attempt_id for r in old}
    assert all("retention cutoff" in r.reason for r in latest)
    assert "5 refused by the database or started before its retention cutoff" in " ".join(
        capsys.readouterr().out.split()
    )
    store.shutdown()


@pytest.mark.postgres
def test_a_writer_waits_for_no_partition_being_dropped(postgres_store: SqlStore) -> None:
    """The table is locked only while the old days are detached; removing their files, which grows
    with their size, locks only them, so writers go on meanwhile."""
    make_days(postgres_store, -5, 0)
    postgres_store.export([on_day(n, -4) for n in range(5)])
    with postgres_store.engine.begin() as connection:
        detach_day_partitions(connection, day_partitions(connection)[:2])
    wrote = threading.Event()

    def write() -> None:
        postgres_store.export([on_day(n, 0) for n in range(10, 15)])
        wrote.set()

    with postgres_store.engine.begin() as dropping:  # a prune dropping them, not yet committed
        assert drop_detached_partitions(dropping) > 0  # the bytes its commit gives back
        writer = threading.Thread(target=write)
        writer.start()
        writer.join(10)
        assert wrote.is_set(), "a writer waited for the partitions being dropped"
    assert postgres_store.attempt_count() == 5
    with postgres_store.engine.connect() as connection:
        assert detached_partitions(connection) == []


@pytest.mark.postgres
def test_what_a_prune_that_stopped_after_detaching_left_is_dropped_never_counted_again_and_no_other_table(
    postgres_store: SqlStore,
) -> None:
    make_days(postgres_store, -5, 0)
    postgres_store.export([on_day((day + 10) * 10 + n, day) for day in (-5, -4, -3) for n in range(3)])
    before = postgres_store.rollup_totals()
    with postgres_store.engine.begin() as connection:
        old = [p for p in day_partitions(connection) if p.day < (TODAY - timedelta(days=3)).date()]
        assert len(old) == 2
        detach_day_partitions(connection, old)  # then the prune died, before dropping them
        # A table an operator detached by hand to archive it: not the prune's to drop.
        kept = partition_name((TODAY - timedelta(days=3)).date())
        connection.exec_driver_sql(f"ALTER TABLE costwatch_attempts DETACH PARTITION {kept}")
    assert postgres_store.attempt_count() == 0

    # Their rows left the table when they were detached: a later prune does not count them again.
    assert postgres_store.prune_before(TODAY - timedelta(days=4)) == 0
    assert postgres_store.drop_pruned() > 0

    assert postgres_store.drop_pruned() == 0
    assert postgres_store.rollup_totals() == before
    with postgres_store.engine.connect() as connection:
        assert detached_partitions(connection) == []
        assert connection.exec_driver_sql(f"SELECT count(*) FROM {kept}").scalar() == 3


@pytest.mark.postgres
def test_db_prune_detaches_the_old_days_then_drops_them_and_says_what_disk_came_back(
    postgres_store: SqlStore, capsys: pytest.CaptureFixture[str]
) -> None:
    make_days(postgres_store, -100, -98)
    postgres_store.export([on_day(n, -100 + n // 4) for n in range(1, 7)])  # days -100 and -99
    url = postgres_store.engine.url.render_as_string(hide_password=False)

    assert main(["db", "prune", "--older-than", "90d", "--db", url]) == 0

    out = " ".join(capsys.readouterr().out.split())
    assert "pruned 6 attempt rows older than 90d" in out
    assert "dropped the pruned days' tables:" in out and "MB back on disk" in out
    with postgres_store.engine.connect() as connection:
        assert detached_partitions(connection) == []


@pytest.mark.postgres
def test_a_prune_waits_for_a_writer_that_read_the_old_cutoff(postgres_store: SqlStore) -> None:
    postgres_store.export([on_day(1, -100)])
    raised = threading.Event()

    def prune() -> None:
        postgres_store.prune_before(TODAY - timedelta(days=90))
        raised.set()

    with postgres_store.engine.begin() as writer:
        assert cutoff_for_writing(writer) is None  # a writer in flight: it may still store old records
        pruning = threading.Thread(target=prune)
        pruning.start()
        time.sleep(0.5)
        assert not raised.is_set()
        writer.execute(sa.insert(ATTEMPTS).values(attempt_row(on_day(2, -100))))
    pruning.join(10)
    assert raised.is_set()
    assert postgres_store.attempt_count() == 0  # what it stored meanwhile was pruned too


def _detach_waits(store: SqlStore) -> bool:
    """Whether a session waits for the attempts table's exclusive lock (a prune's detach)."""
    with store.engine.connect() as connection:
        return bool(
            connection.exec_driver_sql(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND mode = 'AccessExclusiveLock' "
                "AND relation = to_regclass('costwatch_attempts')"
            ).scalar()
        )


@pytest.mark.postgres
def test_a_prune_that_finds_the_table_held_by_a_long_read_lets_writers_by_and_prunes_when_it_ends(
    postgres_store: SqlStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A waiting detach queues every writer behind it: each try waits a moment, then lets them by."""
    make_days(postgres_store, -100, 0)
    postgres_store.export([on_day(n, -99) for n in range(3)])
    url = postgres_store.engine.url.render_as_string(hide_password=False)
    outcome: list[object] = []

    def prune() -> None:
        try:
            outcome.append(postgres_store.prune_before(TODAY - timedelta(days=90)))
        except Exception as exc:  # what the test reports
            outcome.append(exc)

    with postgres_store.engine.connect() as report:  # a long report: holds the table until it ends
        report.exec_driver_sql("SELECT count(*) FROM costwatch_attempts").scalar()
        monkeypatch.setattr("costwatch.store.retention.PRUNE_LOCK_WAIT_S", 0.5)
        assert main(["db", "prune", "--older-than", "90d", "--db", url]) == 2
        captured = capsys.readouterr()
        assert "other sessions hold the attempts table" in captured.out
        assert "nothing was pruned; run `costwatch db prune` again" in " ".join(captured.err.split())
        assert postgres_store.attempt_count() == 3  # nor was the cutoff raised
        monkeypatch.undo()

        pruning = threading.Thread(target=prune)
        pruning.start()
        while not _detach_waits(postgres_store) and pruning.is_alive():
            time.sleep(0.005)
        postgres_store.export([on_day(n, 0) for n in range(10, 13)])  # a writer gets by
        assert pruning.is_alive() and not outcome, outcome  # still trying
        report.rollback()
    pruning.join(30)
    assert outcome == [3]
    assert postgres_store.attempt_count() == 3  # the writer's, of today


# -- the upgrade from an unpartitioned table --------------------------------------------------------
@pytest.mark.postgres
def test_migration_0013_partitions_an_existing_table_keeping_every_row_and_downgrades(
    postgres_schema: str,
) -> None:
    url = postgres_schema_url(postgres_schema)
    migrate.upgrade(url, revision="0012")
    records = [
        on_day(1, -30),
        dropped(2, started_at=TODAY + timedelta(hours=12, minutes=4)),
        on_day(3, 0),
        on_day(4, -2000),
    ]
    engine = create_store_engine(url)
    try:
        with engine.begin() as connection:
            # Rows as revision 0012 holds them: without the endpoint column migration 0014 adds.
            rows = [{k: v for k, v in attempt_row(record).items() if k != "endpoint"} for record in records]
            connection.execute(sa.insert(ATTEMPTS), rows)

        migrate.upgrade(url)

        with engine.connect() as connection:
            kind = connection.exec_driver_sql(
                "SELECT relkind FROM pg_class WHERE oid = to_regclass('costwatch_attempts')"
            )
            assert kind.scalar() == "p"
            key = connection.exec_driver_sql(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = to_regclass('costwatch_attempts') AND contype = 'p'"
            ).scalar()
            assert key == "PRIMARY KEY (attempt_id, started_at)"
        store = SqlStore(url, auto_migrate=False)
        try:
            assert [store.attempt(r.attempt_id) for r in records] == records
            assert rows_in(store, partition_name((TODAY - timedelta(days=30)).date())) == {"att-1"}
            assert rows_in(store, DEFAULT_PARTITION) == {"att-4"}  # over two years back
            assert store.write(records).inserted == 0
            store.write([on_day(5, 0, logical_request_id="req-2", attempt_number=2)])
            retried = store.attempt("att-2")
            assert retried is not None and retried.waste_reason is WasteReason.RETRIED
        finally:
            store.shutdown()

        migrate.downgrade(url, "0012")

        with engine.connect() as connection:
            kind = connection.exec_driver_sql(
                "SELECT relkind FROM pg_class WHERE oid = to_regclass('costwatch_attempts')"
            )
            assert kind.scalar() == "r"
            ids = connection.exec_driver_sql("SELECT attempt_id FROM costwatch_attempts").scalars()
            assert sorted(ids) == ["att-1", "att-2", "att-3", "att-4", "att-5"]
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_costwatch_serve_creates_the_day_partitions_ahead(postgres_store: SqlStore) -> None:
    from costwatch.exporter import serve

    last = TODAY.date() + timedelta(days=DAYS_AHEAD)
    postgres_store.attempt_count()  # a migrated store, its partitions made by the migration
    with postgres_store.engine.begin() as connection:
        connection.exec_driver_sql(f"DROP TABLE {partition_name(last)}")
    server = serve(postgres_store.url.render_as_string(hide_password=False), 0, block=False)
    try:
        deadline = time.monotonic() + 10
        while last not in partition_days(postgres_store) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last in partition_days(postgres_store)
    finally:
        server.shutdown()
        server.server_close()
