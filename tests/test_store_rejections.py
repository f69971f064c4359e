"""A record the database refuses is kept apart with its reason; the rest of its batch, and every later
batch, is written. Real SQLite and the real PostgreSQL; records built as a corrupt spool or a buggy
application would build them, bypassing the pipeline's validation, so the database sees them raw."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import completed_attempt, sample_value
from prometheus_client import CollectorRegistry

from costwatch.context import tags
from costwatch.metrics import MetricsSink
from costwatch.pipeline import Pipeline
from costwatch.records import AttemptRecord, Cost, Usage
from costwatch.spool import Spool
from costwatch.store import SqlStore
from costwatch.store.schema import REJECTED_ATTEMPTS
from costwatch.validation import MAX_TOKENS_PER_ATTEMPT, storable


@pytest.fixture
def store_url(new_store_url: str) -> str:
    """A store at the newest revision already (conftest's ``new_store_url``): these tests are of what
    a store does, not of how it is created."""
    return new_store_url


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    sql_store = SqlStore(store_url)
    try:
        yield sql_store
    finally:
        sql_store.shutdown()


def huge_usage(n: int):
    return dataclasses.replace(completed_attempt(n), usage=Usage(input_tokens=10**20, output_tokens=5))


def nul_workflow(n: int):
    return dataclasses.replace(completed_attempt(n), tags={"workflow": "night\x00ly"})


def stored_ids(store: SqlStore) -> set[str]:
    with store.engine.connect() as connection:
        return set(connection.execute(sa.text("SELECT attempt_id FROM costwatch_attempts")).scalars())


def rejected_rows(store: SqlStore) -> list[dict]:
    with store.engine.connect() as connection:
        return [dict(row) for row in connection.execute(sa.select(REJECTED_ATTEMPTS)).mappings()]


def test_a_token_count_beyond_64_bits_is_kept_apart_and_the_rest_of_its_batch_is_written(
    store: SqlStore, caplog: pytest.LogCaptureFixture
) -> None:
    batch = [completed_attempt(n) for n in range(10)]
    batch[6] = huge_usage(6)
    with caplog.at_level(logging.ERROR, logger="costwatch"):
        result = store.write(batch)
    assert result.inserted == 9
    assert stored_ids(store) == {f"att-{n}" for n in range(10) if n != 6}
    [row] = rejected_rows(store)
    assert row["attempt_id"] == "att-6"
    assert "100000000000000000000" in row["record"]
    assert "Overflow" in row["reason"] or "out of range" in row["reason"]
    assert store.rejected_records == 1
    assert sum("refused attempt record att-6" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.postgres
def test_a_nul_in_a_workflow_tag_on_postgresql_is_kept_apart_with_the_databases_reason(
    postgres_schema: str,
) -> None:
    from conftest import postgres_schema_url

    store = SqlStore(postgres_schema_url(postgres_schema))
    try:
        batch = [completed_attempt(n) for n in range(5)]
        batch[2] = nul_workflow(2)
        store.write(batch)
        assert stored_ids(store) == {"att-0", "att-1", "att-3", "att-4"}
        [row] = rejected_rows(store)
        assert row["attempt_id"] == "att-2"
        assert "0x00" in row["reason"]  # the database names the NUL it refused
        assert json.loads(row["record"])["tags"] == {"workflow": "night\x00ly"}
    finally:
        store.shutdown()


def test_a_nul_in_a_logical_request_id_on_postgresql_fails_the_read_before_the_insert_and_is_kept_apart(
    postgres_schema: str,
) -> None:
    """The batch's lookups are sent before its rows (in one pipeline with the rows being built): a
    value they refuse is isolated like one the insert refuses, and the rest is written exactly."""
    from conftest import postgres_schema_url

    store = SqlStore(postgres_schema_url(postgres_schema))
    try:
        batch = [completed_attempt(n) for n in range(6)]
        batch[3] = dataclasses.replace(batch[3], logical_request_id="req\x00-3")
        result = store.write(batch)
        assert result.inserted == 5
        assert stored_ids(store) == {"att-0", "att-1", "att-2", "att-4", "att-5"}
        [row] = rejected_rows(store)
        assert row["attempt_id"] == "att-3" and "0x00" in row["reason"]
        [total] = store.rollup_totals()
        assert total.attempts == 5
        store.write(batch)  # delivered again: nothing counted twice
        [total] = store.rollup_totals()
        assert (total.attempts, len(rejected_rows(store))) == (5, 1)
    finally:
        store.shutdown()


def test_refusals_are_logged_once_counted_each_and_kept_once_when_delivered_again(
    store: SqlStore, caplog: pytest.LogCaptureFixture
) -> None:
    bad = [huge_usage(n) for n in range(3)]
    with caplog.at_level(logging.ERROR, logger="costwatch"):
        store.write([*bad, completed_attempt(10)])
        store.write([bad[0], completed_attempt(11)])  # a replayed segment delivers it again
    assert len(rejected_rows(store)) == 3
    assert store.rejected_records == 4
    assert sum("refused attempt record" in r.getMessage() for r in caplog.records) == 1
    total, latest = store.rejected(limit=2)
    assert total == 3 and len(latest) == 2
    assert stored_ids(store) == {"att-10", "att-11"}


def test_a_refused_record_in_the_spool_no_longer_holds_back_the_records_spooled_after_it(
    store: SqlStore, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.append(store.name, [completed_attempt(1), huge_usage(2)])
    spool.append(store.name, [completed_attempt(3)])
    delivered = spool.replay(store.name, store.export)
    assert delivered == 3
    assert not spool.has_segments(store.name)
    assert stored_ids(store) == {"att-1", "att-3"}
    assert [row["attempt_id"] for row in rejected_rows(store)] == ["att-2"]


def test_an_outage_while_isolating_a_refusal_still_fails_the_batch_for_the_spool(tmp_path: Path) -> None:
    missing = tmp_path / "gone" / "store.db"
    store = SqlStore(f"sqlite:///{tmp_path / 'store.db'}")
    store.write([completed_attempt(0)])  # migrated and working
    store.shutdown()
    store.url = store.url.set(database=str(missing))  # the file's directory is gone: an outage
    store._migrated = True
    with pytest.raises(sa.exc.OperationalError):
        store.write([completed_attempt(1), huge_usage(2)])
    assert store.rejected_records == 0
    store.shutdown()


def test_the_pipeline_keeps_writing_after_a_refused_record(store: SqlStore, tmp_path: Path) -> None:
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"), batch_size=4)
    pipeline.add_sink(store)
    try:
        # Submitted raw through a custom path would be clamped; the batch is written behind the
        # pipeline's back to pin the store's own isolation, then ordinary traffic follows.
        store.write([huge_usage(100)])
        for n in range(10):
            pipeline.submit(completed_attempt(n))
        assert pipeline.flush(10)
        assert pipeline.health().spooled_pending == 0
        assert pipeline.health().rejected == 1
        assert stored_ids(store) == {f"att-{n}" for n in range(10)}
    finally:
        pipeline.remove_sink(store)
        pipeline.shutdown()


# -- validation at build: what costwatch itself builds never reaches the database unstorable -------
def test_the_pipeline_clamps_absurd_token_counts_with_a_flag_and_cleans_control_characters(
    store: SqlStore, tmp_path: Path
) -> None:
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"))
    pipeline.add_sink(store)
    try:
        raw = dataclasses.replace(
            huge_usage(1),
            model="claude\x00-sonnet\x1b-4-5",
            tags={"workflow": "night\x00ly", "team\x07": "a\ud800b"},
            cost=Cost(input_usd=3e14, output_usd=1e-4),
        )
        pipeline.submit(raw)
        pipeline.submit(completed_attempt(2))
        assert pipeline.flush(10)
        assert pipeline.health().spooled_pending == 0 and pipeline.health().rejected == 0
        stored = store.attempt("att-1")
        assert stored is not None
        assert stored.usage.input_tokens == MAX_TOKENS_PER_ATTEMPT and stored.usage.output_tokens == 5
        assert stored.usage.tokens_clamped and not store.attempt("att-2").usage.tokens_clamped
        assert stored.model == "claude\ufffd-sonnet\ufffd-4-5"
        assert dict(stored.tags) == {"workflow": "night\ufffdly", "team\ufffd": "a\ufffdb"}
        assert stored.cost is not None and stored.cost.input_usd == pytest.approx(3e14 * 1e9 / 1e20)
        assert stored.cost.output_usd == pytest.approx(1e-4)
    finally:
        pipeline.remove_sink(store)
        pipeline.shutdown()


def test_a_record_that_needs_no_change_is_passed_through_as_it_is() -> None:
    record = completed_attempt(1)
    assert storable(record) is record


def test_tags_lose_their_control_characters_when_they_are_set() -> None:
    with tags(workflow="a\x00b\nc", **{"x\x1f": "ok"}) as current:
        assert dict(current) == {"workflow": "a\ufffdb\ufffdc", "x\ufffd": "ok"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("duration_s", float("nan")),
        ("duration_s", "1.5"),
        ("duration_s", float("inf")),
        ("attempt_number", 1.0),
        ("attempt_number", True),
        ("model", 7),
        ("tags", {"workflow": 3}),
        ("tags", ["workflow"]),
        ("usage", {"input_tokens": "10"}),
        ("usage", {"input_tokens": 10, "prompt": 1}),
        ("cost", {"input_usd": float("nan")}),
        ("beta_features", "abc"),
        ("server_tool_use", {"web_search_requests": 1.5}),
    ],
)
def test_a_corrupt_spool_line_is_refused_when_it_is_read_back(field: str, value: object) -> None:
    data = completed_attempt(1).to_dict()
    data[field] = value
    with pytest.raises(ValueError, match="malformed attempt record"):
        AttemptRecord.from_dict(data)


def test_a_corrupt_spooled_duration_is_quarantined_and_the_rest_of_the_segment_is_stored(
    store: SqlStore, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    spool.append(store.name, [completed_attempt(1), completed_attempt(2), completed_attempt(3)])
    [segment] = list(spool.sink_directory(store.name).glob("*.jsonl"))
    lines = segment.read_text().splitlines()
    lines[1] = lines[1].replace('"duration_s":0.0', '"duration_s":NaN')
    segment.write_text("\n".join(lines) + "\n")
    assert spool.replay(store.name, store.export) == 2
    assert stored_ids(store) == {"att-1", "att-3"}
    assert (spool.sink_directory(store.name) / "quarantine" / segment.name).exists()


def test_refused_records_are_exported_as_a_counter_of_the_process(store: SqlStore, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"))
    pipeline.add_sink(store)
    MetricsSink(registry=registry, pipeline=pipeline, retry_window_s=600.0, workflow_label_limit=5)
    try:
        assert sample_value(registry, "costwatch_store_rejected_records_total") == 0
        store.write([huge_usage(1), huge_usage(2), completed_attempt(3)])
        assert sample_value(registry, "costwatch_store_rejected_records_total") == 2
    finally:
        pipeline.remove_sink(store)
        pipeline.shutdown()
