"""Where each output figure came from: reported, estimated, counted or reconciled, from record to report."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Iterator
from datetime import datetime, timezone
from types import MappingProxyType

import pytest
import sqlalchemy as sa
from conftest import sample_value as value
from prometheus_client import CollectorRegistry
from rich.console import Console

from costwatch.exporter import FleetCollector
from costwatch.metrics import MetricsSink
from costwatch.records import AttemptRecord, Cost, Outcome, OutputSource, Usage, WasteReason
from costwatch.report import build_report, render_csv, render_table, rollup_group_by, totals_from_attempts
from costwatch.store import SqlStore, migrate
from costwatch.store.schema import ALL_TIME_ROLLUPS, ATTEMPTS, ROLLUPS


@pytest.fixture
def store_url(new_store_url: str) -> str:
    """A store at the newest revision already (conftest's ``new_store_url``): these tests start from
    the newest schema (the migration's own test downgrades it first), never from an empty database."""
    return new_store_url


MODEL = "claude-sonnet-4-6"
HOUR = datetime(2026, 11, 25, 9, tzinfo=timezone.utc)


def attempt(attempt_id: str, source: OutputSource, output: int, output_usd: float) -> AttemptRecord:
    failed = source is not OutputSource.REPORTED
    return AttemptRecord(
        attempt_id=attempt_id,
        logical_request_id=attempt_id,
        attempt_number=1,
        started_at=HOUR.replace(minute=5),
        outcome=Outcome.DROPPED if failed else Outcome.COMPLETED,
        model_requested=MODEL,
        model=MODEL,
        duration_s=3.0,
        usage=Usage(input_tokens=1000, output_tokens=output, output_source=source),
        cost=Cost(input_usd=0.003, output_usd=output_usd),
        wasted=failed,
        waste_reason=WasteReason.ABANDONED if failed else None,
        tags=MappingProxyType({"workflow": "nightly"}),
    )


ONE_OF_EACH = [
    attempt("a-reported", OutputSource.REPORTED, 800, 0.012),
    attempt("a-estimated", OutputSource.ESTIMATED, 130, 0.00196),
    attempt("a-counted", OutputSource.COUNTED, 121, 0.00182),
    attempt("a-reconciled", OutputSource.RECONCILED, 90, 0.00136),
]
EXPECTED_SPLIT = {
    "reported": {"tokens": 800, "cost_usd": 0.012},
    "estimated": {"tokens": 130, "cost_usd": 0.00196},
    "counted": {"tokens": 121, "cost_usd": 0.00182},
    "reconciled": {"tokens": 90, "cost_usd": 0.00136},
}


def split(report: dict[str, object]) -> dict[str, float]:
    """The report's output by source, flat: ``{"counted tokens": 121, "counted cost_usd": ...}``."""
    by_source = report["output_by_source"]
    assert isinstance(by_source, dict)
    return {
        f"{source} {name}": figure
        for source, figures in by_source.items()
        for name, figure in figures.items()
    }


FLAT_SPLIT = {
    f"{source} {name}": figure
    for source, figures in EXPECTED_SPLIT.items()
    for name, figure in figures.items()
}


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    sql_store = SqlStore(store_url)
    yield sql_store
    sql_store.shutdown()


# -- the record --------------------------------------------------------------------------------
def test_usage_with_only_the_estimated_flag_is_estimated_and_a_source_decides_the_flag():
    assert Usage(output_tokens=5, output_estimated=True).output_source is OutputSource.ESTIMATED
    assert Usage(output_tokens=5).output_source is OutputSource.REPORTED
    estimated = Usage(output_tokens=5, output_source=OutputSource.ESTIMATED)
    assert estimated.output_estimated and estimated.estimated_output_tokens == 5
    counted = dataclasses.replace(
        Usage(output_tokens=5, output_estimated=True, estimated_output_tokens=5),
        output_tokens=4,
        output_source=OutputSource.COUNTED,
    )
    assert not counted.output_estimated and counted.output_source is OutputSource.COUNTED


def test_output_source_survives_json_and_an_older_line_reads_it_from_the_flag():
    for record in ONE_OF_EACH:
        line = json.dumps(record.to_dict())
        assert json.loads(line)["usage"]["output_source"] == record.output_source.value
        assert AttemptRecord.from_dict(json.loads(line)) == record
    older = ONE_OF_EACH[1].to_dict()
    del older["usage"]["output_source"]
    older["usage"]["output_estimated"] = True
    assert AttemptRecord.from_dict(older).output_source is OutputSource.ESTIMATED


def test_an_unknown_output_source_is_refused_as_a_malformed_record():
    line = ONE_OF_EACH[0].to_dict()
    line["usage"]["output_source"] = "guessed"
    with pytest.raises(ValueError, match="malformed attempt record"):
        AttemptRecord.from_dict(line)


# -- the store and the report ------------------------------------------------------------------
def test_store_keeps_each_source_and_the_report_splits_output_tokens_and_dollars_by_it(store):
    store.write(ONE_OF_EACH)
    for record in ONE_OF_EACH:
        stored = store.attempt(record.attempt_id)
        assert stored is not None and stored.output_source is record.output_source
    for start in (HOUR, None):  # the hourly rollups, and the all-time ones
        report = build_report(store.rollup_totals(start, None, group_by=rollup_group_by("model")), "model")
        assert split(report) == pytest.approx(FLAT_SPLIT)
        assert (
            sum(s["tokens"] for s in report["output_by_source"].values()) == report["billed_tokens"]["output"]
        )
        assert split(report["groups"][0]) == pytest.approx(FLAT_SPLIT)


def test_a_revision_that_counts_an_estimate_moves_its_tokens_and_dollars_between_sources(store):
    estimated = attempt("a", OutputSource.ESTIMATED, 130, 0.00196)
    store.write([estimated])
    counted = dataclasses.replace(
        estimated,
        usage=dataclasses.replace(estimated.usage, output_tokens=121, output_source=OutputSource.COUNTED),
        cost=Cost(input_usd=0.003, output_usd=0.00182),
        revision=1,
    )
    store.write([counted])
    report = build_report(store.rollup_totals(group_by=rollup_group_by("model")), "model")
    assert report["output_by_source"]["estimated"] == {"tokens": 0, "cost_usd": 0.0}
    assert report["output_by_source"]["counted"] == pytest.approx({"tokens": 121, "cost_usd": 0.00182})
    assert report["estimated_output_tokens"] == 0 and report["billed_tokens"]["output"] == 121


def test_report_from_attempt_rows_splits_output_as_the_rollups_do():
    totals, _ = totals_from_attempts(ONE_OF_EACH, "tag:team")
    assert split(build_report(totals, "tag:team")) == pytest.approx(FLAT_SPLIT)


def test_report_text_and_csv_say_where_the_output_came_from():
    totals, _ = totals_from_attempts(ONE_OF_EACH, "model")
    report = build_report(totals, "model")
    out = Console(record=True, width=400)
    render_table(report, out)
    text = out.export_text()
    assert "output tokens: 800 ($0.01) reported by the API, 130 ($0.0020) estimated from cut streams" in text
    assert "121 ($0.0018) counted by the API from cut streams" in text
    assert "90 ($0.0014) corrected by reconciliation" in text
    row = next(csv.DictReader(io.StringIO(render_csv(report))))
    assert (row["counted_output_tokens"], row["estimated_output_cost_usd"]) == ("121", "0.00196")


def test_report_text_has_no_source_line_when_every_output_was_reported():
    totals, _ = totals_from_attempts(ONE_OF_EACH[:1], "model")
    out = Console(record=True, width=400)
    render_table(build_report(totals, "model"), out)
    assert "output tokens:" not in out.export_text()


def test_migration_0011_fills_sources_and_output_by_source_from_the_attempts_stored_before_it(store_url):
    store = SqlStore(store_url)
    try:
        store.write(ONE_OF_EACH[:2])  # what a store before 0011 can hold: reported and estimated
        with store.engine.connect() as connection:
            before = {
                table.name: connection.execute(sa.select(table)).mappings().all()
                for table in (ROLLUPS, ALL_TIME_ROLLUPS)
            }
    finally:
        store.shutdown()
    migrate.downgrade(store_url, "0010")
    migrate.upgrade(store_url)
    store = SqlStore(store_url, auto_migrate=False)
    try:
        with store.engine.connect() as connection:
            sources = dict(
                connection.execute(sa.select(ATTEMPTS.c.attempt_id, ATTEMPTS.c.output_source)).all()
            )
            assert sources == {"a-reported": "reported", "a-estimated": "estimated"}
            for table in (ROLLUPS, ALL_TIME_ROLLUPS):
                after = connection.execute(sa.select(table)).mappings().all()
                assert len(after) == len(before[table.name])
                for found, wanted in zip(after, before[table.name], strict=True):
                    for name, figure in wanted.items():
                        if isinstance(figure, float):
                            assert found[name] == pytest.approx(figure), name
                        else:
                            assert found[name] == figure, name
    finally:
        store.shutdown()


# -- the metrics -------------------------------------------------------------------------------
def test_in_process_metrics_count_output_tokens_by_source():
    registry = CollectorRegistry()
    sink = MetricsSink(registry=registry, retry_window_s=60, workflow_label_limit=5, model_label_limit=5)
    sink.export(ONE_OF_EACH)
    for source, figures in EXPECTED_SPLIT.items():
        assert (
            value(registry, "costwatch_output_tokens_total", model=MODEL, source=source) == figures["tokens"]
        )
    assert value(registry, "costwatch_estimated_output_tokens_total", model=MODEL) == 130


def test_fleet_exporter_serves_output_tokens_by_source(store, store_url):
    store.write(ONE_OF_EACH)
    registry = CollectorRegistry()
    registry.register(FleetCollector(store_url, workflow_label_limit=5))
    for source, figures in EXPECTED_SPLIT.items():
        assert (
            value(registry, "costwatch_output_tokens_total", model=MODEL, source=source) == figures["tokens"]
        )
