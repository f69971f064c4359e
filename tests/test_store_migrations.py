"""The store's schema: migrations up and down on SQLite and PostgreSQL, and agreement with its tables."""

from __future__ import annotations

import dataclasses
import logging
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import postgres_schema_url
from sqlalchemy.schema import CreateIndex

from costwatch.records import AttemptRecord, Outcome, Usage, WasteReason
from costwatch.store import SqlStore, create_store_engine, database_url, metadata, migrate, safe_url
from costwatch.store.database import sqlite_path
from costwatch.store.partitions import is_attempt_partition
from costwatch.store.rows import attempt_row
from costwatch.store.schema import ATTEMPTS, VERSION_TABLE

_ABANDONED_ATTEMPT = AttemptRecord(
    attempt_id="dropped",
    logical_request_id="first-worker",
    attempt_number=1,
    started_at=datetime(2026, 11, 1, 9, 59, tzinfo=timezone.utc),
    outcome=Outcome.DROPPED,
    model_requested="claude-sonnet-4-5",
    duration_s=30.0,
    usage=Usage(input_tokens=1000, output_tokens=10, output_estimated=True, estimated_output_tokens=10),
    wasted=True,
    waste_reason=WasteReason.ABANDONED,
    fingerprint="same-request",
)


def _tables(store_url: str) -> set[str]:
    engine = create_store_engine(store_url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_to_base_and_upgrade_again(store_url: str) -> None:
    assert migrate.current(store_url) is None

    migrate.upgrade(store_url)
    assert migrate.current(store_url) == migrate.head()
    assert {"costwatch_attempts", "costwatch_hourly_rollups"} <= _tables(store_url)

    migrate.downgrade(store_url, "base")
    assert migrate.current(store_url) is None
    assert not {"costwatch_attempts", "costwatch_hourly_rollups"} & _tables(store_url)

    migrate.upgrade(store_url, revision="head")
    assert migrate.current(store_url) == migrate.head()


# SQLite's expression index cannot be reflected, so Alembic skips it (and says so): the next test
# compares it on SQLite instead.
@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based index")
def test_models_and_migrations_agree(store_url: str) -> None:
    migrate.upgrade(store_url)
    engine = create_store_engine(store_url)
    try:
        with engine.connect() as connection:
            # As migrations/env.py does: the attempts table's partitions are made at run time.
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "version_table": VERSION_TABLE,
                    "include_name": lambda name, kind, _: kind != "table" or not is_attempt_partition(name),
                },
            )
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


def test_sqlite_indexes_are_the_ones_the_models_declare(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'costwatch.db'}"
    migrate.upgrade(store_url)
    engine = create_store_engine(store_url)
    try:
        with engine.connect() as connection:
            stored = dict(
                connection.exec_driver_sql(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
                ).all()
            )
        declared = {
            str(index.name): str(CreateIndex(index).compile(dialect=engine.dialect))
            for table in metadata.tables.values()
            for index in table.indexes
        }
    finally:
        engine.dispose()
    assert stored == declared
    assert "ix_costwatch_attempts_hour_fingerprint" in stored


@pytest.mark.parametrize("first", ["abandoned attempt", "resend"])
def test_migration_0004_keeps_attempts_stored_before_it_findable_by_fingerprint(
    store_url: str, first: str
) -> None:
    # Another worker resends the request a minute after the attempt dropped, in the next hour.
    resend = dataclasses.replace(
        _ABANDONED_ATTEMPT,
        attempt_id="resend",
        logical_request_id="other-worker",
        started_at=_ABANDONED_ATTEMPT.started_at + timedelta(minutes=1),
        outcome=Outcome.COMPLETED,
        wasted=False,
        waste_reason=None,
    )
    stored_before, landing_after = (
        (_ABANDONED_ATTEMPT, resend) if first == "abandoned attempt" else (resend, _ABANDONED_ATTEMPT)
    )
    migrate.upgrade(store_url, revision="0003")
    engine = create_store_engine(store_url)
    try:
        with engine.begin() as connection:
            # Only the columns the table has at 0003: later migrations add more.
            present = {c["name"] for c in sa.inspect(connection).get_columns(ATTEMPTS.name)}
            row = {k: v for k, v in attempt_row(stored_before).items() if k in present}
            connection.execute(sa.insert(ATTEMPTS).values(row))
    finally:
        engine.dispose()
    migrate.upgrade(store_url)
    store = SqlStore(store_url, auto_migrate=False)
    try:
        store.write([landing_after])
        dropped = store.attempt(_ABANDONED_ATTEMPT.attempt_id)
        assert dropped is not None and dropped.waste_reason is WasteReason.RETRIED
    finally:
        store.shutdown()
    migrate.downgrade(store_url, "0003")
    assert migrate.current(store_url) == "0003"


_COLUMNS_OF_0005 = ("prompt_bytes", "stable_prefix_bytes")
_COLUMNS_OF_0006 = ("server_tool_cost_usd", "inference_geo")
_COLUMNS_OF_0007 = ("platform",)
_COLUMNS_OF_0008 = ("tokens_clamped",)
_COLUMNS_OF_0011 = ("output_source",)
_COLUMNS_OF_0014 = ("endpoint",)


def _row_before_0005(record: AttemptRecord) -> dict[str, Any]:
    """An attempt's row as the tables before migration 0005 hold it."""
    later = (
        *_COLUMNS_OF_0005,
        *_COLUMNS_OF_0006,
        *_COLUMNS_OF_0007,
        *_COLUMNS_OF_0008,
        *_COLUMNS_OF_0011,
        *_COLUMNS_OF_0014,
    )
    return {k: v for k, v in attempt_row(record).items() if k not in later}


def test_migration_0007_reads_earlier_attempts_as_first_party(store_url: str) -> None:
    migrate.upgrade(store_url, revision="0006")
    engine = create_store_engine(store_url)
    try:
        with engine.begin() as connection:
            row = {
                k: v
                for k, v in attempt_row(_ABANDONED_ATTEMPT).items()
                if k not in (*_COLUMNS_OF_0007, *_COLUMNS_OF_0008, *_COLUMNS_OF_0011, *_COLUMNS_OF_0014)
            }
            connection.execute(sa.insert(ATTEMPTS).values(row))
    finally:
        engine.dispose()
    migrate.upgrade(store_url)
    store = SqlStore(store_url, auto_migrate=False)
    try:
        stored = store.attempt(_ABANDONED_ATTEMPT.attempt_id)
        assert stored is not None and stored.platform == "anthropic"
    finally:
        store.shutdown()
    migrate.downgrade(store_url, "0006")
    assert migrate.current(store_url) == "0006"


def test_migration_0005_reads_earlier_attempts_as_not_measured_and_keeps_measured_sizes(
    store_url: str,
) -> None:
    migrate.upgrade(store_url, revision="0004")
    engine = create_store_engine(store_url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.insert(ATTEMPTS).values(_row_before_0005(_ABANDONED_ATTEMPT)))
    finally:
        engine.dispose()
    migrate.upgrade(store_url)
    measured = dataclasses.replace(
        _ABANDONED_ATTEMPT,
        attempt_id="measured",
        attempt_number=2,
        prompt_bytes=40_000,
        stable_prefix_bytes=39_000,
    )
    store = SqlStore(store_url, auto_migrate=False)
    try:
        store.write([measured])
        earlier, later = store.attempt(_ABANDONED_ATTEMPT.attempt_id), store.attempt("measured")
        assert earlier is not None and (earlier.prompt_bytes, earlier.stable_prefix_bytes) == (None, None)
        assert later is not None and (later.prompt_bytes, later.stable_prefix_bytes) == (40_000, 39_000)
    finally:
        store.shutdown()
    migrate.downgrade(store_url, "0004")
    assert migrate.current(store_url) == "0004"
    migrate.upgrade(store_url)
    assert migrate.current(store_url) == migrate.head()


def test_upgrade_twice_is_a_no_op(store_url: str) -> None:
    migrate.upgrade(store_url)
    migrate.upgrade(store_url)
    assert migrate.current(store_url) == migrate.head()


def test_store_creates_and_migrates_its_database_on_first_use(store_url: str) -> None:
    store = SqlStore(store_url)
    try:
        assert store.attempt_count() == 0
        assert migrate.current(store_url) == migrate.head()
    finally:
        store.shutdown()


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///costwatch.db", "costwatch.db"),
        ("sqlite:////var/lib/costwatch.db", "/var/lib/costwatch.db"),
        ("sqlite:///file:costwatch.db?uri=true", "costwatch.db"),
        ("sqlite:///file:/var/lib/cost%20watch.db?mode=rwc&uri=true", "/var/lib/cost watch.db"),
        ("sqlite:///file:///var/lib/costwatch.db?uri=1", "/var/lib/costwatch.db"),
        ("sqlite:///file:costwatch.db", "file:costwatch.db"),  # not a URI to SQLite without uri=true
        ("sqlite:///file:shared?mode=memory&cache=shared&uri=true", None),
        ("sqlite:///file::memory:?cache=shared&uri=true", None),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("postgresql://costwatch@localhost/costwatch", None),
    ],
)
def test_a_url_names_a_sqlite_file_unless_in_memory_or_another_backend(url: str, path: str | None) -> None:
    """The one reading of a URL's SQLite file that the store, its engine and the CLI share."""
    assert sqlite_path(database_url(url)) == path


def test_default_url_is_a_sqlite_file_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COSTWATCH_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    store = SqlStore()
    try:
        assert store.attempt_count() == 0
    finally:
        store.shutdown()
    assert (tmp_path / "costwatch.db").exists()


def test_url_comes_from_the_environment_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSTWATCH_DATABASE_URL", "sqlite:////var/tmp/elsewhere.db")
    assert database_url().database == "/var/tmp/elsewhere.db"
    assert database_url("sqlite:///here.db").database == "here.db"


def test_postgresql_urls_are_normalised_to_psycopg() -> None:
    assert database_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert database_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert database_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"


def test_sqlite_file_is_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    engine = create_store_engine(f"sqlite:///{tmp_path / 'wal.db'}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_password_never_appears_in_logs_or_repr(
    postgres_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    store_url = postgres_schema_url(postgres_schema, password="s3cret-pw")
    caplog.set_level(logging.DEBUG, logger="costwatch")
    migrate.upgrade(store_url)
    store = SqlStore(store_url)
    try:
        assert store.attempt_count() == 0
        assert "s3cret-pw" not in repr(store)
    finally:
        store.shutdown()
    assert "migrated" in caplog.text
    assert "s3cret-pw" not in caplog.text
    assert "s3cret-pw" not in safe_url(store_url)


def test_migration_scripts_are_found_without_an_ini_file() -> None:
    scripts = migrate.migrations_path()
    assert (scripts / "env.py").is_file()
    assert any(scripts.glob("versions/0001_*.py"))


def _rows_of_0013(records: list[AttemptRecord]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The hourly and all-time rollup rows a writer before migration 0014 stored for ``records``:
    keyed without the platform, so every platform's attempts share their rows."""
    from costwatch.store.rows import rollup_delta_rows
    from costwatch.store.schema import ROLLUP_DIMENSIONS, ROLLUP_MEASURES

    width = len(ROLLUP_DIMENSIONS)
    hourly: dict[tuple[Any, ...], list[float]] = {}
    first: dict[tuple[Any, ...], datetime] = {}
    for row in rollup_delta_rows(records):
        key, values = row[: width - 1], row[width:]  # the platform is the last dimension
        known = hourly.setdefault(key, [0] * len(values))
        known[:] = [a + b for a, b in zip(known, values, strict=True)]
        first[key[1:]] = min(first.get(key[1:], key[0]), key[0])
    all_time: dict[tuple[Any, ...], list[float]] = {}
    for key, values in hourly.items():
        known = all_time.setdefault(key[1:], [0] * len(values))
        known[:] = [a + b for a, b in zip(known, values, strict=True)]
    names = ROLLUP_DIMENSIONS[: width - 1]
    return (
        [
            {**dict(zip(names, k, strict=True)), **dict(zip(ROLLUP_MEASURES, v, strict=True))}
            for k, v in hourly.items()
        ],
        [
            {
                **dict(zip(names[1:], k, strict=True)),
                "first_hour": first[k],
                **dict(zip(ROLLUP_MEASURES, v, strict=True)),
            }
            for k, v in all_time.items()
        ],
    )


def test_migration_0014_moves_each_platform_s_attempts_to_rollup_rows_of_their_own(
    store_url: str, tmp_path: Path
) -> None:
    from costwatch.records import Cost
    from costwatch.store.schema import ALL_TIME_ROLLUPS, ROLLUP_DIMENSIONS, ROLLUPS

    hour = datetime(2026, 11, 1, 9, tzinfo=timezone.utc)
    priced = Cost(input_usd=0.003, output_usd=0.0015)
    # A first-party and a Bedrock attempt of the same model, outcome and hour (one row before
    # 0014), a dropped Vertex attempt an hour later, and a Foundry one in the first hour.
    records = [
        dataclasses.replace(_ABANDONED_ATTEMPT, attempt_id=f"a{n}", logical_request_id=f"r{n}", **fields)
        for n, fields in enumerate(
            [
                {"outcome": Outcome.COMPLETED, "wasted": False, "waste_reason": None, "cost": priced},
                {"outcome": Outcome.COMPLETED, "wasted": False, "waste_reason": None, "platform": "bedrock"},
                {"started_at": hour + timedelta(hours=1, minutes=5), "platform": "vertex"},
                {"started_at": hour + timedelta(minutes=1), "platform": "foundry", "attempt_number": 2},
            ]
        )
    ]
    migrate.upgrade(store_url, revision="0013")
    hourly, all_time = _rows_of_0013(records)
    engine = create_store_engine(store_url)
    try:
        with engine.begin() as connection:
            rows = [attempt_row(r) for r in records]
            for row in rows:
                del row["endpoint"]  # migration 0014 adds it
            connection.execute(sa.insert(ATTEMPTS), rows)
            for table, rows in (
                (ROLLUPS, hourly),
                (ALL_TIME_ROLLUPS, all_time),
            ):
                # Typed as the store's columns, so timestamps are stored as the store stores them.
                columns = [sa.column(name, table.c[name].type) for name in rows[0]]
                connection.execute(sa.insert(sa.table(table.name, *columns)), rows)
    finally:
        engine.dispose()
    migrate.upgrade(store_url)

    # What a store of today writes for the same attempts.
    fresh_url = f"sqlite:///{tmp_path / 'fresh.db'}"
    fresh = SqlStore(fresh_url)
    migrated = SqlStore(store_url, auto_migrate=False)
    try:
        fresh.write(records)
        for table in (ROLLUPS, ALL_TIME_ROLLUPS):
            keys = [c.name for c in table.primary_key.columns]

            def rows(
                store: SqlStore, table: sa.Table = table, keys: list[str] = keys
            ) -> list[tuple[Any, ...]]:
                with store.engine.connect() as connection:
                    found = connection.execute(sa.select(table).order_by(*(table.c[k] for k in keys))).all()
                return [tuple(round(v, 9) if isinstance(v, float) else v for v in row) for row in found]

            expected = rows(fresh)
            assert rows(migrated) == expected
            assert {row[keys.index("platform")] for row in expected} == {
                "anthropic",
                "bedrock",
                "vertex",
                "foundry",
            }
        by_platform = migrated.rollup_totals(group_by=("platform",))
        assert {t.group["platform"]: t.attempts for t in by_platform} == {
            "anthropic": 1,
            "bedrock": 1,
            "vertex": 1,
            "foundry": 1,
        }
        assert ROLLUP_DIMENSIONS[-1] == "platform"
    finally:
        fresh.shutdown()
        migrated.shutdown()
    migrate.downgrade(store_url, "0013")
    assert migrate.current(store_url) == "0013"


def test_head_read_from_the_script_files_is_alembic_s_head() -> None:
    # The start-up check reads the head from the scripts' text instead of importing them through
    # Alembic: the two readings must never disagree.
    assert migrate._scripted_head() == migrate.head()


def test_a_database_at_head_is_checked_quietly_and_left_as_it_is(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    migrate.upgrade(store_url)
    engine = create_store_engine(store_url)
    caplog.set_level(logging.DEBUG)
    try:
        migrate.ensure_migrated(engine)
    finally:
        engine.dispose()
    assert not [r for r in caplog.records if r.name.startswith("alembic") or "migrated" in r.getMessage()]
    assert migrate.current(store_url) == migrate.head()


def test_a_database_behind_head_is_migrated_at_start_and_says_so(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    migrate.upgrade(store_url, revision="0014")
    engine = create_store_engine(store_url)
    caplog.set_level(logging.INFO, logger="costwatch")
    try:
        migrate.ensure_migrated(engine)
    finally:
        engine.dispose()
    assert migrate.current(store_url) == migrate.head()
    assert "from 0014 to " + migrate.head() in caplog.text


def test_a_fresh_database_is_migrated_at_start(store_url: str) -> None:
    engine = create_store_engine(store_url)
    try:
        migrate.ensure_migrated(engine)
    finally:
        engine.dispose()
    assert migrate.current(store_url) == migrate.head()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_database_that_cannot_be_reached_is_tried_once_by_the_start_up_check(
    backend: str, tmp_path: Path
) -> None:
    """Each try waits out the connect timeout where a server does not answer (5 s by default), and
    ``instrument()`` makes the check once for each of its reads: it does not try a second time."""
    with socket.socket() as bound:  # bound, never listening: a connection to it is refused
        bound.bind(("127.0.0.1", 0))
        url = {
            "sqlite": f"sqlite:///{tmp_path / 'no such directory' / 'costwatch.db'}",
            "postgresql": f"postgresql://costwatch@127.0.0.1:{bound.getsockname()[1]}/costwatch",
        }[backend]
        engine = create_store_engine(url)
        tries: list[object] = []
        sa.event.listen(engine, "do_connect", lambda *_: tries.append(None))
        try:
            with pytest.raises(sa.exc.OperationalError):
                migrate.ensure_migrated(engine)
        finally:
            engine.dispose()
    assert len(tries) == 1
