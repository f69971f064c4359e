"""Reading the all-time rollups with the recent hourly rollups in one statement, and reports over all time."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType

import pytest
import sqlalchemy as sa

from costwatch.records import AttemptRecord, Outcome, Usage, WasteReason
from costwatch.store import ROLLUP_MEASURES, RollupTotals, SqlStore
from costwatch.store.query import all_time_with_recent_query, rollup_totals_query
from costwatch.store.schema import ROLLUPS

BOUNDARY = datetime(2025, 3, 1, 11, tzinfo=timezone.utc)


def attempt(attempt_id: str, started_at: datetime, *, model: str = "m", number: int = 1) -> AttemptRecord:
    return AttemptRecord(
        attempt_id=attempt_id,
        logical_request_id=attempt_id,
        attempt_number=number,
        started_at=started_at,
        outcome=Outcome.COMPLETED,
        model_requested=model,
        model=model,
        duration_s=2.0,
        usage=Usage(input_tokens=100, output_tokens=10),
        tags=MappingProxyType({}),
    )


def dropped(record: AttemptRecord, reason: WasteReason) -> AttemptRecord:
    return dataclasses.replace(record, outcome=Outcome.DROPPED, wasted=True, waste_reason=reason)


def all_time_and_recent(
    store: SqlStore, **where: str
) -> dict[tuple[str, str, bool], tuple[datetime, int, int]]:
    """(model, waste_reason, recent) -> (first hour, attempts, billed input tokens)."""
    query = all_time_with_recent_query(
        BOUNDARY, measures=("attempts", "billed_input_tokens"), recent_where=where
    )
    with store.engine.connect() as connection:
        rows = connection.execute(query).all()
    return {
        (model, waste_reason, bool(recent)): (first, int(count), int(tokens))
        for model, _, _, waste_reason, _, _, recent, first, count, tokens in rows
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlStore]:
    sql_store = SqlStore(f"sqlite:///{tmp_path / 'store.db'}")
    yield sql_store
    sql_store.shutdown()


def test_all_time_rows_sum_every_hour_and_recent_rows_only_the_hours_from_the_boundary_on(store):
    store.write(
        [
            attempt("a", BOUNDARY - timedelta(hours=3, minutes=10)),
            attempt("b", BOUNDARY - timedelta(minutes=1)),
            attempt("c", BOUNDARY),
            attempt("d", BOUNDARY + timedelta(minutes=20), model="n"),
        ]
    )
    assert all_time_and_recent(store) == {
        ("m", "", False): (BOUNDARY - timedelta(hours=4), 3, 300),
        ("m", "", True): (BOUNDARY, 1, 100),
        ("n", "", False): (BOUNDARY, 1, 100),
        ("n", "", True): (BOUNDARY, 1, 100),
    }


def test_recent_rows_can_be_limited_to_chosen_dimension_values(store):
    store.write([attempt("a", BOUNDARY), dropped(attempt("b", BOUNDARY), WasteReason.ABANDONED)])
    rows = all_time_and_recent(store, waste_reason="abandoned")
    assert {key for key in rows if key[2]} == {("m", "abandoned", True)}
    assert {key for key in rows if not key[2]} == {("m", "", False), ("m", "abandoned", False)}


def test_a_group_whose_attempts_all_moved_elsewhere_is_still_read_with_its_first_hour(store):
    abandoned = dropped(attempt("a", BOUNDARY - timedelta(hours=2)), WasteReason.ABANDONED)
    store.write([abandoned])
    store.write([abandoned.with_waste(WasteReason.RETRIED)])
    hour = BOUNDARY - timedelta(hours=2)
    assert all_time_and_recent(store) == {
        ("m", "abandoned", False): (hour, 0, 0),
        ("m", "retried", False): (hour, 1, 100),
    }


def test_filtering_recent_rows_by_the_hour_or_summing_an_unknown_measure_is_refused():
    with pytest.raises(ValueError, match="hour"):
        all_time_with_recent_query(BOUNDARY, recent_where={"hour": "x"})
    with pytest.raises(ValueError, match="tokens"):
        all_time_with_recent_query(BOUNDARY, measures=("tokens",))


def test_totals_over_all_time_come_from_the_all_time_rollups_and_bounded_ones_from_the_hourly():
    def table_of(query: object) -> str:
        return " ".join(str(query).split()).split(" FROM ")[1].split()[0]

    assert table_of(rollup_totals_query(group_by=("model", "outcome"))) == "costwatch_all_time_rollups"
    assert table_of(rollup_totals_query(where={"workflow": "w"})) == "costwatch_all_time_rollups"
    assert table_of(rollup_totals_query(BOUNDARY, group_by=("model",))) == "costwatch_hourly_rollups"
    assert table_of(rollup_totals_query(end=BOUNDARY)) == "costwatch_hourly_rollups"
    assert table_of(rollup_totals_query(group_by=("hour", "model"))) == "costwatch_hourly_rollups"
    assert table_of(rollup_totals_query(where={"hour": "x"})) == "costwatch_hourly_rollups"


def test_a_report_over_all_time_equals_the_sum_of_every_hour(store):
    abandoned = dropped(attempt("d", BOUNDARY - timedelta(hours=5)), WasteReason.ABANDONED)
    store.write(
        [attempt(f"a{i}", BOUNDARY - timedelta(hours=i), model=f"m{i % 3}") for i in range(12)] + [abandoned]
    )
    store.write([abandoned.with_waste(WasteReason.RETRIED)])
    for group_by in [(), ("model",), ("model", "outcome"), ("waste_reason", "workflow")]:
        every_hour = store.rollup_totals(datetime(2000, 1, 1, tzinfo=timezone.utc), group_by=group_by)
        assert store.rollup_totals(group_by=group_by) == every_hour, group_by


def test_rollup_totals_has_a_field_per_rollup_column_typed_as_its_column() -> None:
    """Made from the rollup table: a new measure column is a new field, zero unless given."""
    fields = {field.name: field.type for field in dataclasses.fields(RollupTotals)}
    assert list(fields) == ["group", *ROLLUP_MEASURES]
    empty = RollupTotals()
    for name in ROLLUP_MEASURES:
        integer = isinstance(ROLLUPS.c[name].type, sa.Integer)
        assert fields[name] is (int if integer else float)
        assert getattr(empty, name) == 0 and type(getattr(empty, name)) is fields[name]
    totals = RollupTotals(group={"model": "m"}, billed_input_tokens=3, wasted_output_tokens=2)
    assert (totals.billed_tokens, totals.wasted_tokens) == (3, 2)
