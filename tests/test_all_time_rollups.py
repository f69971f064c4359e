"""The all-time rollups: kept equal to the hourly rollups summed over every hour, and what a scrape reads.

Each all-time row must equal the grouping of its hourly rows (exact counts, the earliest hour, costs
up to float rounding) after any mix of writes, and the fleet exporter, which reads the all-time rows
plus the recent hours, must show what it would show by grouping every hourly row.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

import pytest
import sqlalchemy as sa

from costwatch.cli import main
from costwatch.exporter import FleetCollector, FleetSamples, fleet_samples, settled_before
from costwatch.records import AttemptRecord, Cost, Outcome, Usage, WasteReason
from costwatch.store import RollupTotals, SqlStore, create_store_engine, migrate
from costwatch.store.all_time import all_time_delta_rows
from costwatch.store.query import read_rollup_totals
from costwatch.store.schema import ALL_TIME_DIMENSIONS, ALL_TIME_ROLLUPS, ROLLUP_MEASURES, ROLLUPS

NOW = datetime(2025, 3, 2, 12, 30, tzinfo=timezone.utc)
WINDOW = timedelta(hours=1)
OLD = NOW - timedelta(hours=20)  # settled
RECENT = NOW - timedelta(minutes=10)  # not settled
MODELS = ("claude-sonnet-4-6", "claude-opus-4-6", "claude-haiku-4-5")
_FLOATS = frozenset(m for m in ROLLUP_MEASURES if m.endswith("_usd") or m == "duration_s")


def attempt(
    attempt_id: str,
    started_at: datetime,
    *,
    request: str | None = None,
    number: int = 1,
    dropped: bool = False,
    waste: WasteReason | None = None,
    model: str = MODELS[0],
    workflow: str = "nightly",
    fingerprint: str | None = None,
    tokens: int = 1000,
    priced: bool = True,
) -> AttemptRecord:
    return AttemptRecord(
        attempt_id=attempt_id,
        logical_request_id=request or attempt_id,
        attempt_number=number,
        started_at=started_at,
        outcome=Outcome.DROPPED if dropped else Outcome.COMPLETED,
        model_requested=model,
        model=model,
        error_type="RemoteProtocolError" if dropped else None,
        duration_s=0.1 * (tokens % 97) + 0.37,
        usage=Usage(
            input_tokens=tokens,
            output_tokens=tokens // 7,
            cache_read_tokens=tokens // 3,
            output_estimated=dropped,
            estimated_output_tokens=tokens // 7 if dropped else 0,
        ),
        # Costs that are not exact in binary, so float sums depend on their order.
        cost=Cost(input_usd=tokens * 3e-6, output_usd=tokens * 1.1e-6) if priced else None,
        wasted=waste is not None,
        waste_reason=waste,
        tags=MappingProxyType({"workflow": workflow}),
        fingerprint=fingerprint or f"fp-{attempt_id}",
    )


def abandoned(attempt_id: str, started_at: datetime, **kw: Any) -> AttemptRecord:
    return attempt(attempt_id, started_at, dropped=True, waste=WasteReason.ABANDONED, **kw)


@pytest.fixture
def store_url(new_store_url: str) -> str:
    """A store at the newest revision already (conftest's ``new_store_url``): these tests are of what a
    store's rollups hold; the upgrade test downgrades it to 0001 itself."""
    return new_store_url


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    sql_store = SqlStore(store_url, retry_window=WINDOW)
    yield sql_store
    sql_store.shutdown()


def write_a_mix(store_url: str, store: SqlStore) -> None:
    """Writes of every kind the store sees: spread, late, revised, redelivered, flipped across processes."""
    spread = [
        attempt(
            f"s{i}",
            OLD - timedelta(hours=i % 30, minutes=i),
            model=MODELS[i % 3],
            workflow=f"w{i % 5}",
            tokens=900 + 13 * i,
            priced=i % 11 != 0,
        )
        for i in range(120)
    ]
    store.write(spread)
    store.write(spread[:40])  # redelivered: changes nothing
    store.write(
        [
            abandoned("old-a", OLD, request="a"),
            abandoned("old-b", OLD - timedelta(hours=3), request="b", model=MODELS[1]),
            abandoned("old-c", OLD - timedelta(hours=2), request="c", workflow="w2"),
            abandoned("new-d", RECENT, request="d"),
            abandoned("new-e", RECENT - timedelta(minutes=5), request="e", model=MODELS[2]),
            attempt("now", RECENT, workflow="w4", tokens=777),
        ]
    )
    other_process = SqlStore(store_url, retry_window=WINDOW)
    try:
        other_process.write(
            [
                attempt("a-retry", OLD + timedelta(minutes=1), request="a", number=2),  # flips old-a
                attempt("d-retry", RECENT + timedelta(minutes=1), request="d", number=2),  # flips new-d
                # The same request sent again by a process that lost track of it: a retry by fingerprint.
                attempt("b-again", OLD - timedelta(hours=3, minutes=-2), fingerprint="fp-old-b"),
                # A retry stored before its abandoned attempt: the flip happens when that lands.
                attempt("f-retry", OLD - timedelta(hours=6, minutes=-1), request="f", number=2),
                attempt("late", OLD - timedelta(hours=40), workflow="batch", model="claude-3-late"),
            ]
        )
    finally:
        other_process.shutdown()
    store.write([abandoned("old-f", OLD - timedelta(hours=6), request="f")])
    revised = dataclasses.replace(spread[7], usage=Usage(input_tokens=5, output_tokens=1), revision=3)
    store.write([revised, spread[8].with_waste(WasteReason.RETRIED)])
    late_drop = abandoned("late-drop", OLD - timedelta(hours=1), workflow="w3")
    store.write([late_drop])
    store.write([late_drop.with_waste(WasteReason.RETRIED)])


def hourly_grouping(connection: sa.Connection) -> dict[tuple[str, ...], dict[str, Any]]:
    """The all-time grouping of every hourly rollup row, with its earliest hour."""
    dimensions = [ROLLUPS.c[name] for name in ALL_TIME_DIMENSIONS]
    query = sa.select(
        *dimensions,
        sa.func.min(ROLLUPS.c.hour).label("first_hour"),
        *(sa.func.sum(ROLLUPS.c[name]).label(name) for name in ROLLUP_MEASURES),
    ).group_by(*dimensions)
    return {tuple(row[: len(ALL_TIME_DIMENSIONS)]): dict(row._mapping) for row in connection.execute(query)}


def all_time_rows(connection: sa.Connection) -> dict[tuple[str, ...], dict[str, Any]]:
    width = len(ALL_TIME_DIMENSIONS)
    return {tuple(row[:width]): dict(row._mapping) for row in connection.execute(sa.select(ALL_TIME_ROLLUPS))}


def assert_same_rows(
    found: dict[tuple[str, ...], dict[str, Any]], wanted: dict[tuple[str, ...], dict[str, Any]]
):
    """Same keys, first hours and counts; float sums up to the order they were added in."""
    assert found.keys() == wanted.keys()
    for key, row in wanted.items():
        for name, value in row.items():
            if name in _FLOATS:
                assert found[key][name] == pytest.approx(value, rel=1e-12, abs=1e-12), (key, name)
            else:
                assert found[key][name] == value, (key, name)


def samples_from_every_hourly_row(store: SqlStore, **limits: int) -> FleetSamples:
    """What the exporter showed when it grouped every hourly rollup row (the rule the module states)."""
    boundary = settled_before(NOW, WINDOW)
    dimensions = ("model", "outcome", "error_type", "waste_reason", "workflow", "platform")

    def totals(*where: sa.ColumnElement[bool]) -> sa.Select[Any]:
        columns = [ROLLUPS.c[name] for name in dimensions]
        sums = [sa.func.sum(ROLLUPS.c[name]).label(name) for name in ROLLUP_MEASURES]
        query = sa.select(*columns, *sums).where(*where).group_by(*columns)
        return query.having(sa.func.sum(ROLLUPS.c.attempts) != 0)

    def first_seen(connection: sa.Connection, column: str) -> list[str]:
        query = (
            sa.select(ROLLUPS.c[column])
            .group_by(ROLLUPS.c[column])
            .order_by(sa.func.min(ROLLUPS.c.hour), ROLLUPS.c[column])
        )
        return list(connection.execute(query).scalars())

    with store.engine.connect() as connection:
        every: list[RollupTotals] = read_rollup_totals(connection, totals(), dimensions)
        settled_abandoned = read_rollup_totals(
            connection,
            totals(ROLLUPS.c.hour < boundary, ROLLUPS.c.waste_reason == WasteReason.ABANDONED.value),
            dimensions,
        )
        models, workflows = first_seen(connection, "model"), first_seen(connection, "workflow")
    return fleet_samples(
        every, settled_abandoned, models_first_seen=models, workflows_first_seen=workflows, **limits
    )


def assert_same_samples(found: FleetSamples, wanted: FleetSamples) -> None:
    """Equal series; counts exact, sums of floats up to the order they were added in."""
    # Refused records are counted from their own table, not the rollups: none are written here.
    found, wanted = (dataclasses.replace(one, counters=dict(one.counters)) for one in (found, wanted))
    for one in found, wanted:
        assert one.counters.pop("costwatch_store_rejected_records", None) in (None, {(): 0.0})
    assert found.counters.keys() == wanted.counters.keys()
    assert found.histograms.keys() == wanted.histograms.keys()
    for name, series in wanted.counters.items():
        assert found.counters[name] == pytest.approx(series, rel=1e-12, abs=1e-12), name
    for name, histogram in wanted.histograms.items():
        assert found.histograms[name].keys() == histogram.keys(), name
        for labels, (count, total) in histogram.items():
            assert found.histograms[name][labels] == (count, pytest.approx(total, rel=1e-12)), (name, labels)


def collector(store_url: str, **limits: int) -> FleetCollector:
    return FleetCollector(store_url, retry_window=WINDOW, clock=lambda: NOW, **limits)


# -- the deltas, pure ----------------------------------------------------------------------------------
def test_deltas_are_summed_over_hours_with_the_earliest_hour_in_key_order():
    h1, h2 = datetime(2025, 3, 1, 9, tzinfo=timezone.utc), datetime(2025, 3, 1, 7, tzinfo=timezone.utc)
    zeros = [0] * (len(ROLLUP_MEASURES) - 1)
    rows = [
        (h1, "m", "completed", "", "", "w", "anthropic", 2, *zeros),
        (h2, "m", "completed", "", "", "w", "anthropic", 3, *zeros),
        (h1, "a", "dropped", "E", "abandoned", "", "bedrock", -1, *zeros),
        (h2, "a", "dropped", "E", "retried", "", "bedrock", 1, *zeros),
    ]
    assert all_time_delta_rows(rows) == [
        ("a", "dropped", "E", "abandoned", "", "bedrock", h1, -1, *zeros),
        ("a", "dropped", "E", "retried", "", "bedrock", h2, 1, *zeros),
        ("m", "completed", "", "", "w", "anthropic", h2, 5, *zeros),
    ]


def test_a_key_whose_deltas_cancel_is_kept_for_its_hour():
    h1, h2 = datetime(2025, 3, 1, 9, tzinfo=timezone.utc), datetime(2025, 3, 1, 7, tzinfo=timezone.utc)
    zeros = [0] * (len(ROLLUP_MEASURES) - 1)
    key = ("m", "completed", "", "", "w", "anthropic")
    rows = [(h1, *key, 1, *zeros), (h2, *key, -1, *zeros)]
    assert all_time_delta_rows(rows) == [(*key, h2, 0, *zeros)]


# -- the store keeps them --------------------------------------------------------------------------
def test_every_all_time_row_equals_its_hourly_rows_summed_after_every_kind_of_write(store_url, store):
    write_a_mix(store_url, store)
    with store.engine.connect() as connection:
        wanted = hourly_grouping(connection)
        found = all_time_rows(connection)
    assert_same_rows(found, wanted)
    # The mix did flip attempts: across processes, by fingerprint, and a retry stored first.
    dropped = (MODELS[0], "dropped", "RemoteProtocolError")
    assert found[(*dropped, "retried", "nightly", "anthropic")]["attempts"] == 3
    assert found[(*dropped, "abandoned", "nightly", "anthropic")]["attempts"] == 0
    assert found[(*dropped, "abandoned", "w2", "anthropic")]["attempts"] == 1
    other_model = (MODELS[1], "dropped", "RemoteProtocolError")
    assert found[(*other_model, "retried", "nightly", "anthropic")]["attempts"] == 1


def test_hostile_label_values_are_keys_like_any_other(store_url, store):
    hostile = [
        "'; DROP TABLE costwatch_all_time_rollups; --",
        "say \"hi\" and 'bye' \\ back\\slash",
        "one\ntwo\r\nthree\ttab",
        "naïve 雪 🚀 \u202e reversed",
        "%s %d %(name)s {0} %%",
        "x" * 200,
    ]
    records = [attempt(f"h{i}", OLD, workflow=value, model=value) for i, value in enumerate(hostile)]
    store.write(records)
    with store.engine.connect() as connection:
        found = all_time_rows(connection)
        assert_same_rows(found, hourly_grouping(connection))
    assert {key[4] for key in found} == {record.workflow for record in records}
    (totals,) = store.rollup_totals(group_by=["workflow"], where={"workflow": hostile[0]})
    assert totals.attempts == 1


@pytest.mark.timeout(120)
def test_concurrent_writers_of_the_same_groups_neither_deadlock_nor_lose_a_delta(store_url, store):
    store.write([attempt("first", OLD)])  # migrated before the writers start

    def write(worker: int) -> None:
        own = SqlStore(store_url, retry_window=WINDOW)
        try:
            for batch in range(10):
                # Every worker writes every model and workflow, in a different order each time.
                own.write(
                    [
                        attempt(
                            f"c{worker}-{batch}-{i}",
                            OLD - timedelta(hours=(i * 7 + worker) % 24),
                            model=MODELS[(i + worker + batch) % 3],
                            workflow=f"w{(i * worker + batch) % 4}",
                        )
                        for i in range(40)
                    ]
                )
        finally:
            own.shutdown()

    workers = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(100)
    assert not any(thread.is_alive() for thread in workers)
    with store.engine.connect() as connection:
        wanted = hourly_grouping(connection)
        found = all_time_rows(connection)
    assert_same_rows(found, wanted)
    assert sum(row["attempts"] for row in found.values()) == 1 + 4 * 10 * 40


# -- what a scrape reads ---------------------------------------------------------------------------
def test_a_scrape_shows_what_grouping_every_hourly_row_shows_after_every_kind_of_write(store_url, store):
    write_a_mix(store_url, store)
    fleet = collector(store_url, model_label_limit=3, workflow_label_limit=4)
    try:
        assert_same_samples(
            fleet.read(), samples_from_every_hourly_row(store, model_label_limit=3, workflow_label_limit=4)
        )
    finally:
        fleet.close()


def test_a_scrape_after_more_writes_to_settled_and_recent_hours_still_matches_and_never_goes_down(
    store_url, store
):
    write_a_mix(store_url, store)
    fleet = collector(store_url)
    try:
        before = fleet.read()
        list(fleet.collect())
        store.write(
            [
                attempt("late-2", OLD - timedelta(hours=50), model="claude-older"),
                attempt("e-retry", RECENT, request="e", number=2, model=MODELS[2]),  # flips new-e
                # flips the settled old-c: the high mark must hold its abandoned waste
                attempt("c-retry", OLD - timedelta(hours=2, minutes=-1), request="c", number=2),
                abandoned("new-g", RECENT, request="g", workflow="w1"),
            ]
        )
        after = fleet.read()
        assert_same_samples(after, samples_from_every_hourly_row(store))
        list(fleet.collect())
        held = fleet._last
        assert held is not None
        for name, series in before.counters.items():
            for labels, value in series.items():
                assert held.counters[name][labels] >= value, (name, labels)
    finally:
        fleet.close()


# -- a database from before the table --------------------------------------------------------------
def test_upgrading_a_0001_database_with_data_fills_the_table_and_gives_the_same_scrape(
    store_url, store, capsys
):
    write_a_mix(store_url, store)
    with store.engine.connect() as connection:
        kept = all_time_rows(connection)
    fleet = collector(store_url)
    try:
        scraped = fleet.read()
    finally:
        fleet.close()
    store.shutdown()

    migrate.downgrade(store_url, "0001")  # as a costwatch from before the table left it
    engine = create_store_engine(store_url)
    try:
        assert ALL_TIME_ROLLUPS.name not in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()

    assert main(["db", "upgrade", "--db", store_url]) == 0
    capsys.readouterr()
    assert migrate.current(store_url) == migrate.head()
    upgraded = SqlStore(store_url, retry_window=WINDOW)
    fleet = collector(store_url)
    try:
        with upgraded.engine.connect() as connection:
            assert_same_rows(all_time_rows(connection), kept)
        assert_same_samples(fleet.read(), scraped)
        # Writes after the upgrade keep the filled table in step.
        upgraded.write([attempt("after", RECENT, workflow="w9"), attempt("late-3", OLD, tokens=3)])
        with upgraded.engine.connect() as connection:
            assert_same_rows(all_time_rows(connection), hourly_grouping(connection))
    finally:
        fleet.close()
        upgraded.shutdown()
