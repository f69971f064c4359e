"""Repricing history: new revisions through the store's write path, rollups consistent, idempotent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from costwatch.cli import main
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, Outcome, Usage, WasteReason
from costwatch.reprice import reprice_store
from costwatch.store import SqlStore
from costwatch.store.query import rollup_totals_query
from costwatch.store.rows import rollup_delta_rows
from costwatch.store.schema import ALL_TIME_DIMENSIONS, ROLLUP_DIMENSIONS, ROLLUP_MEASURES


@pytest.fixture
def store_url(new_store_url: str) -> str:
    """A store at the newest revision already (conftest's ``new_store_url``): these tests are of what
    a store does, not of how it is created."""
    return new_store_url


PRICES = load_prices()
UNKNOWN = "claude-unreleased-9"
SONNET = "claude-sonnet-5-5"
START = datetime(2026, 11, 20, 8, tzinfo=timezone.utc)
USAGE = Usage(input_tokens=10_000, cache_read_tokens=50_000, output_tokens=1_000)


def attempt(n: int, model: str, *, waste: WasteReason | None = None) -> AttemptRecord:
    return AttemptRecord(
        attempt_id=f"att-{n:03d}",
        logical_request_id=f"req-{n:03d}",
        attempt_number=1,
        started_at=START + timedelta(minutes=7 * n),
        outcome=Outcome.DROPPED if waste else Outcome.COMPLETED,
        model_requested=model,
        model=model,
        usage=USAGE,
        cost=PRICES.cost(model, USAGE),
        wasted=waste is not None,
        waste_reason=waste,
        tags={"workflow": "nightly"},
    )


RECORDS = [
    attempt(n, UNKNOWN if n % 3 == 0 else SONNET, waste=WasteReason.RETRIED if n % 2 else None)
    for n in range(24)
]


@pytest.fixture
def prices_file(tmp_path: Path) -> Path:
    """A contract: the unknown model priced, and Sonnet 5.5 cache reads at the cut rate."""
    path = tmp_path / "contract.json"
    path.write_text(
        json.dumps(
            {
                "models": {
                    UNKNOWN: {
                        "input_usd_per_mtok": 1.0,
                        "output_usd_per_mtok": 5.0,
                        "cache_write_5m_multiplier": 1.25,
                        "cache_write_1h_multiplier": 2.0,
                        "cache_read_multiplier": 0.1,
                        "batch_discount": 0.5,
                    },
                    SONNET: {**_entry(SONNET), "cache_read_multiplier": 0.05},
                }
            }
        ),
        encoding="utf-8",
    )
    return path


def _entry(model: str) -> dict:
    price = PRICES.lookup(model)
    assert price is not None
    return {
        "input_usd_per_mtok": price.input_usd_per_mtok,
        "output_usd_per_mtok": price.output_usd_per_mtok,
        "cache_write_5m_multiplier": price.cache_write_5m_multiplier,
        "cache_write_1h_multiplier": price.cache_write_1h_multiplier,
        "cache_read_multiplier": price.cache_read_multiplier,
        "batch_discount": price.batch_discount,
    }


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    sql_store = SqlStore(store_url)
    sql_store.write(RECORDS)
    yield sql_store
    sql_store.shutdown()


def stored(store: SqlStore) -> list[AttemptRecord]:
    return [r for r in (store.attempt(record.attempt_id) for record in RECORDS) if r is not None]


def assert_rollups_are_the_sums_of_the_rows(store: SqlStore) -> None:
    wanted = {
        tuple(row[: len(ROLLUP_DIMENSIONS)]): row[len(ROLLUP_DIMENSIONS) :]
        for row in rollup_delta_rows(stored(store))
    }
    for start, dimensions in ((START, ROLLUP_DIMENSIONS), (None, ALL_TIME_DIMENSIONS)):
        with store.engine.connect() as connection:
            rows = connection.execute(rollup_totals_query(start, None, group_by=dimensions)).mappings().all()
        for row in rows:
            key = tuple(row[d] for d in dimensions)
            expected = [
                sum(values[i] for k, values in wanted.items() if k[-len(dimensions) :] == key)
                for i in range(len(ROLLUP_MEASURES))
            ]
            assert [row[m] for m in ROLLUP_MEASURES] == pytest.approx(expected, rel=1e-9, abs=1e-9), key


def test_reprice_writes_a_new_revision_of_each_changed_attempt_and_keeps_rollups_consistent(
    store, prices_file
):
    table = load_prices(prices_file)
    summary = reprice_store(store, table, batch_size=5)
    assert summary.read == 24 and summary.batches == 5 and summary.skipped == 0
    assert summary.changed == 24  # every unknown-model attempt gets a price, every Sonnet one a cheaper read
    assert summary.models[UNKNOWN].newly_priced == 8
    for record in stored(store):
        assert record.revision == 1
        assert record.cost == table.cost(record.model_name, record.usage)
    assert_rollups_are_the_sums_of_the_rows(store)
    totals = store.rollup_totals(group_by=("model",))
    assert sum(t.unpriced_attempts for t in totals) == 0


def test_reprice_twice_changes_nothing_the_second_time(store, prices_file):
    table = load_prices(prices_file)
    reprice_store(store, table)
    again = reprice_store(store, table)
    assert (again.read, again.changed) == (24, 0)
    assert all(record.revision == 1 for record in stored(store))


def test_a_reprice_stopped_half_way_is_finished_by_running_it_again(store, prices_file):
    table = load_prices(prices_file)
    first = reprice_store(store, table, end=START + timedelta(minutes=7 * 12))
    assert first.changed == 12
    rest = reprice_store(store, table)
    assert rest.changed == 12
    assert all(record.revision == 1 for record in stored(store))
    assert_rollups_are_the_sums_of_the_rows(store)


def test_reprice_by_model_and_dry_run(store, prices_file):
    table = load_prices(prices_file)
    dry = reprice_store(store, table, models=[UNKNOWN], dry_run=True)
    assert dry.changed == 8 and all(r.revision == 0 for r in stored(store))
    done = reprice_store(store, table, models=[UNKNOWN])
    assert done.changed == 8
    assert {r.model_name for r in stored(store) if r.revision == 1} == {UNKNOWN}


def test_an_abandoned_attempt_repriced_still_turns_retried_when_its_retry_lands(store_url, prices_file):
    dropped = attempt(1, UNKNOWN, waste=WasteReason.ABANDONED)
    sql_store = SqlStore(store_url)
    try:
        sql_store.write([dropped])
        reprice_store(sql_store, load_prices(prices_file))
        retry = AttemptRecord(
            **{
                **{
                    f: getattr(attempt(2, UNKNOWN), f)
                    for f in ("usage", "model", "model_requested", "tags", "cost")
                },
                "attempt_id": "retry",
                "logical_request_id": dropped.logical_request_id,
                "attempt_number": 2,
                "started_at": dropped.started_at + timedelta(seconds=30),
                "outcome": Outcome.COMPLETED,
            }
        )
        sql_store.write([retry])
        flipped = sql_store.attempt(dropped.attempt_id)
        assert flipped is not None and flipped.waste_reason is WasteReason.RETRIED and flipped.revision == 2
        assert flipped.cost is not None
        wasted = sum(t.wasted_cost_usd for t in sql_store.rollup_totals(group_by=("waste_reason",)))
        assert wasted == pytest.approx(flipped.cost.total_usd)
    finally:
        sql_store.shutdown()


def test_the_reprice_command_prints_what_changed_and_report_prices_file_is_the_same_what_if(
    capsys, tmp_path, prices_file
):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    sql_store = SqlStore(url)
    sql_store.write(RECORDS)
    sql_store.shutdown()
    assert main(["report", "--format", "json", "--db", url, "--prices-file", str(prices_file)]) == 0
    what_if = json.loads(capsys.readouterr().out)
    assert what_if["prices"]["what_if"] is True and what_if["unpriced_attempts"] == 0
    assert main(["report", "--format", "json", "--db", url]) == 0
    assert json.loads(capsys.readouterr().out)["unpriced_attempts"] == 8  # the what-if wrote nothing

    assert main(["reprice", "--db", url, "--prices-file", str(prices_file), "--batch-size", "10"]) == 0
    out = capsys.readouterr().out
    assert "Read 24 attempts; changed the price of 24." in out and UNKNOWN in out
    assert main(["report", "--format", "json", "--db", url]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["billed_cost_usd"] == pytest.approx(what_if["billed_cost_usd"])
    assert after["wasted_cost_usd_by_part"] == pytest.approx(what_if["wasted_cost_usd_by_part"])
    assert main(["reprice", "--db", url, "--prices-file", str(prices_file)]) == 0
    assert "changed the price of 0 (already priced with this table)" in capsys.readouterr().out
    assert main(["reprice", "--db", url, "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
