"""Attempts on models without a known price are visible everywhere: records, store, report, metrics."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import sample_value
from prometheus_client import CollectorRegistry
from rich.console import Console

from costwatch.exporter import FleetCollector
from costwatch.metrics import MetricsSink
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, Outcome, Usage, WasteReason
from costwatch.report import build_report, render_csv, render_json, render_table, rollup_group_by
from costwatch.store import SqlStore, create_store_engine, migrate
from costwatch.store.rows import attempt_row, rollup_delta_rows
from costwatch.store.schema import (
    ALL_TIME_DIMENSIONS,
    ALL_TIME_ROLLUPS,
    ATTEMPTS,
    ROLLUP_DIMENSIONS,
    ROLLUP_MEASURES,
    ROLLUPS,
)

PRICES = load_prices()
HOUR = datetime(2026, 11, 25, 9, tzinfo=timezone.utc)
UNKNOWN = "claude-unreleased-9"
USAGE = Usage(input_tokens=1_000, cache_read_tokens=4_000, output_tokens=200)


def attempt(
    attempt_id: str,
    model: str,
    *,
    outcome: Outcome = Outcome.COMPLETED,
    waste: WasteReason | None = None,
    usage: Usage = USAGE,
) -> AttemptRecord:
    return AttemptRecord(
        attempt_id=attempt_id,
        logical_request_id=f"req-{attempt_id}",
        attempt_number=1,
        started_at=HOUR + timedelta(minutes=len(attempt_id)),
        outcome=outcome,
        model_requested=model,
        model=model,
        usage=usage,
        cost=PRICES.cost(model, usage),
        wasted=waste is not None,
        waste_reason=waste,
        tags={"workflow": "nightly"},
    )


RECORDS = [
    attempt("p1", "claude-sonnet-5-5"),
    attempt("p2", "claude-sonnet-5-5", outcome=Outcome.DROPPED, waste=WasteReason.RETRIED),
    attempt("u1", UNKNOWN),
    attempt("u2", UNKNOWN, outcome=Outcome.DROPPED, waste=WasteReason.ABANDONED),
]


def test_a_record_of_an_unknown_model_says_priced_false_in_its_json():
    unpriced, priced = attempt("u", UNKNOWN), attempt("p", "claude-sonnet-5-5")
    assert unpriced.to_dict()["priced"] is False and unpriced.to_dict()["cost"] is None
    assert priced.to_dict()["priced"] is True
    assert AttemptRecord.from_dict(json.loads(json.dumps(unpriced.to_dict()))) == unpriced


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    sql_store = SqlStore(store_url)
    yield sql_store
    sql_store.shutdown()


def test_the_report_counts_unpriced_attempts_and_tokens_and_warns_above_the_totals(store):
    store.write(RECORDS)
    report = build_report(store.rollup_totals(group_by=rollup_group_by("model")), "model")
    assert report["unpriced_attempts"] == 2
    assert report["unpriced_tokens"] == 2 * 5_200
    assert report["attempts"] == 4
    by_model = {group["model"]: group for group in report["groups"]}
    assert by_model[UNKNOWN]["unpriced_attempts"] == 2 and by_model[UNKNOWN]["billed_cost_usd"] == 0
    assert by_model["claude-sonnet-5-5"]["unpriced_attempts"] == 0
    assert json.loads(render_json(report))["unpriced_tokens"] == 10_400
    assert "unpriced_attempts" in render_csv(report).splitlines()[0].split(",")

    console = Console(file=io.StringIO(), width=160)
    render_table(report, console)
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning: 2 unpriced attempts"))
    totals = next(i for i, line in enumerate(lines) if line.startswith("Waste report"))
    assert warning < totals
    assert "unpriced: 2 attempts, 10.4k tokens" in "\n".join(lines)


def test_a_report_without_unpriced_attempts_shows_no_warning(store):
    store.write(RECORDS[:2])
    report = build_report(store.rollup_totals(group_by=rollup_group_by("model")), "model")
    assert report["unpriced_attempts"] == report["unpriced_tokens"] == 0
    console = Console(file=io.StringIO(), width=160)
    render_table(report, console)
    assert "unpriced" not in console.file.getvalue()  # type: ignore[attr-defined]


def test_in_process_metrics_count_unpriced_attempts_by_model():
    registry = CollectorRegistry()
    sink = MetricsSink(registry=registry, retry_window_s=60)
    sink.export(RECORDS)
    assert sample_value(registry, "costwatch_unpriced_attempts_total", model=UNKNOWN) == 2
    assert sample_value(registry, "costwatch_unpriced_attempts_total", model="claude-sonnet-5-5") == 0


def test_the_fleet_exporter_serves_unpriced_attempts_by_model(store, store_url):
    store.write(RECORDS)
    registry = CollectorRegistry()
    collector = FleetCollector(store_url, clock=lambda: HOUR + timedelta(hours=3))
    registry.register(collector)
    try:
        assert sample_value(registry, "costwatch_unpriced_attempts_total", model=UNKNOWN) == 2
        assert (
            registry.get_sample_value("costwatch_unpriced_attempts_total", {"model": "claude-sonnet-5-5"})
            is None
        )
    finally:
        collector.close()


_MEASURES_OF_0011 = (
    "reported_output_tokens",
    "counted_output_tokens",
    "reconciled_output_tokens",
    "reported_output_cost_usd",
    "estimated_output_cost_usd",
    "counted_output_cost_usd",
    "reconciled_output_cost_usd",
)
_NEW_MEASURES = (
    "unpriced_attempts",
    "unpriced_tokens",
    "wasted_input_cost_usd",
    "wasted_cache_read_cost_usd",
    "wasted_cache_write_cost_usd",
    "wasted_output_cost_usd",
    "wasted_server_tool_cost_usd",
)


def _old_table(table: sa.Table, columns: tuple[str, ...]) -> sa.TableClause:
    """``table`` as revision 0005 had it: only ``columns``, with their types."""
    return sa.table(table.name, *(sa.column(column, table.c[column].type) for column in columns))


def test_migration_0006_fills_the_new_rollup_measures_from_the_attempts_stored_before_it(store_url):
    migrate.upgrade(store_url, revision="0005")
    # The rows and rollups a writer of revision 0005 left: every measure but the new ones.
    deltas = [
        dict(zip((*ROLLUP_DIMENSIONS, *ROLLUP_MEASURES), row, strict=True))
        for row in rollup_delta_rows(RECORDS)
    ]
    old = tuple(m for m in ROLLUP_MEASURES if m not in (*_NEW_MEASURES, *_MEASURES_OF_0011))
    # Keyed without the platform (migration 0014 adds it; these attempts are all first-party).
    keys = tuple(d for d in ROLLUP_DIMENSIONS if d != "platform")
    hourly_columns, all_time_columns = (*keys, *old), (*keys[1:], "first_hour", *old)
    engine = create_store_engine(store_url)
    try:
        with engine.begin() as connection:
            # Rows as revision 0005 stored them: without the columns 0006 adds.
            rows = [attempt_row(r) for r in RECORDS]
            for row in rows:
                del row["server_tool_cost_usd"], row["inference_geo"]
                del row["platform"]  # and without the column 0007 adds
                del row["tokens_clamped"]  # and the column 0008 adds
                del row["output_source"]  # and the column 0011 adds
                del row["endpoint"]  # and the column 0014 adds
            connection.execute(sa.insert(_old_table(ATTEMPTS, tuple(rows[0]))), rows)
            for row in deltas:
                connection.execute(
                    sa.insert(_old_table(ROLLUPS, hourly_columns)).values({c: row[c] for c in hourly_columns})
                )
                connection.execute(
                    sa.insert(_old_table(ALL_TIME_ROLLUPS, all_time_columns)).values(
                        {
                            **{c: row[c] for c in all_time_columns if c != "first_hour"},
                            "first_hour": row["hour"],
                        }
                    )
                )
    finally:
        engine.dispose()
    migrate.upgrade(store_url)
    store = SqlStore(store_url, auto_migrate=False)
    try:
        wanted = {tuple(row[d] for d in ALL_TIME_DIMENSIONS): row for row in deltas}
        # Read once from the hourly rollups (a window) and once from the all-time rollups.
        for start in (HOUR, None):
            totals = store.rollup_totals(start, None, group_by=ALL_TIME_DIMENSIONS)
            assert len(totals) == len(wanted)
            for total in totals:
                expected = wanted[tuple(total.group[d] for d in ALL_TIME_DIMENSIONS)]
                for name in _NEW_MEASURES:
                    assert getattr(total, name) == pytest.approx(expected[name]), name
        report = build_report(store.rollup_totals(group_by=rollup_group_by("model")), "model")
        assert report["unpriced_attempts"] == 2 and report["unpriced_tokens"] == 10_400
    finally:
        store.shutdown()


def test_costwatch_report_warns_of_unpriced_models_once_in_its_output_and_logs_nothing(tmp_path):
    """The report's own warning says it, above the figures; no log line names the first model, and
    none at exit counts "models met by this process" (a report is not an application)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    retried = []
    for model in (UNKNOWN, "claude-unreleased-10"):
        for number, outcome in ((1, Outcome.DROPPED), (2, Outcome.COMPLETED)):
            first = attempt(f"{model}-{number}", model, outcome=outcome, usage=Usage(input_tokens=1_000))
            alike = {"logical_request_id": model, "attempt_number": number, "fingerprint": "f" * 64}
            alike["started_at"] = datetime.now(timezone.utc) - timedelta(hours=1, seconds=3 - number)
            retried.append(dataclasses.replace(first, **alike))
    store = SqlStore(url)
    try:
        store.write(retried)  # retried alike: the report prices them for "avoidable with caching" too
    finally:
        store.shutdown()
    # This checkout's costwatch, after what PYTHONPATH holds already (tests/sdk_lines.py's child guard).
    path = [*filter(None, [os.environ.get("PYTHONPATH")]), str(Path(__file__).parents[1])]
    done = subprocess.run(
        [sys.executable, "-m", "costwatch", "report", "--db", url],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.count("unpriced attempts") == 1
    assert done.stdout.startswith("warning: 4 unpriced attempts (4,000 tokens)")
