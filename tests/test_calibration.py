"""The fleet's calibration: completed streams' samples go to the store; every process starts from them."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import read_stream_through_a_cut

import costwatch
import costwatch.store.sink
from costwatch.calibration import PER_MODEL, FleetCalibration
from costwatch.estimation import OutputEstimator
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, Outcome, Usage
from costwatch.spool import Spool
from costwatch.store import SqlStore
from costwatch.testing import FakeAnthropicServer, Fault, ResponseSpec


@pytest.fixture
def store_url(new_store_url: str) -> str:
    """A store at the newest revision already (conftest's ``new_store_url``): these tests are of what
    a store does, not of how it is created."""
    return new_store_url


MODEL = "claude-haiku-4-5"
SPEC = ResponseSpec.small(600)


def run_process(store_url: str, tmp_path: Path, work, estimator: OutputEstimator | None = None) -> None:
    """One "process": costwatch instrumented over the store, ``work`` run, records flushed, uninstrumented."""
    store = SqlStore(store_url)
    pipeline = Pipeline(spool=Spool(tmp_path / f"spool-{id(work)}"))
    assert costwatch.instrument(
        pipeline=pipeline, sinks=[store], listeners=[], prices=load_prices(), estimator=estimator
    )
    try:
        work()
        assert costwatch.flush(20)
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def stream(server: FakeAnthropicServer, i: int) -> None:
    read_stream_through_a_cut(server, i, MODEL)


def test_a_new_process_estimates_a_drop_with_the_calibration_earlier_processes_stored(store_url, tmp_path):
    with FakeAnthropicServer(SPEC) as server:

        def short_answers_then_long_ones() -> None:
            # Answers too short to calibrate on store no sample and, once 1/alpha of them were seen,
            # are measured only at the settled rate; a long answer found then is sampled and stored.
            server.spec = ResponseSpec.small(4)
            for i in range(11):
                stream(server, 100 + i)
            server.spec = SPEC
            for i in range(3):
                stream(server, i)

        run_process(store_url, tmp_path / "a", short_answers_then_long_ones, OutputEstimator(sample_every=2))

        def cut() -> None:
            server.enqueue(Fault.cut_after_deltas(150))
            stream(server, 99)

        server.ledger.clear()
        run_process(store_url, tmp_path / "b", cut)
        (entry,) = server.ledger.entries
    store = SqlStore(store_url)
    try:
        samples = store.calibration_samples()
        (dropped,) = [r for r in _records(store) if r.outcome is Outcome.DROPPED]
    finally:
        store.shutdown()
    assert len(samples) == 3 and all(s.model == MODEL and s.output_tokens == 600 for s in samples)
    assert set(samples[0].chars) >= {"text", "space"}
    truth = entry.output_tokens
    default = OutputEstimator().estimate(MODEL, dict(dropped.output_chars))
    assert abs(default - truth) / truth > 0.15  # the defaults alone miss the fake's tokenizer
    assert dropped.usage.output_estimated
    assert abs(dropped.usage.output_tokens - truth) / truth < 0.05


def _records(store: SqlStore) -> list[AttemptRecord]:
    import sqlalchemy as sa

    from costwatch.store.rows import record_from_row
    from costwatch.store.schema import ATTEMPTS

    with store.engine.connect() as connection:
        return [record_from_row(row) for row in connection.execute(sa.select(ATTEMPTS)).mappings()]


def sample(attempt_id: str, tokens: int, chars: int = 3500, model: str = MODEL) -> AttemptRecord:
    return AttemptRecord(
        attempt_id=attempt_id,
        logical_request_id=attempt_id,
        attempt_number=1,
        started_at=datetime.now(timezone.utc),
        outcome=Outcome.COMPLETED,
        model=model,
        usage=Usage(input_tokens=10, output_tokens=tokens),
        output_chars={"text": chars},
    )


def test_a_refresh_reads_only_the_samples_other_processes_stored_since(store_url, monkeypatch):
    store = SqlStore(store_url)
    estimator = OutputEstimator(prior_weight=0)
    calibration = FleetCalibration(store, estimator, refresh_s=0.0)
    try:
        assert calibration.load() == 0
        store.write([sample("mine", 5000)])  # this process's own: observed when it settled, not again
        monkeypatch.setattr(costwatch.store.sink, "_writer_id", "another-process")
        store.write([sample("theirs-1", 1500), sample("theirs-2", 1500)])
        store.write([sample("theirs-1", 1500)])  # a redelivered batch stores nothing twice
        monkeypatch.undo()
        assert calibration.refresh() == 2
        assert estimator.estimate(MODEL, {"text": 3500}) == 1500
        assert calibration.refresh() == 0
    finally:
        store.shutdown()


def test_a_batch_stores_the_characters_of_each_attempts_latest_revision_only(store_url):
    import dataclasses

    first = sample("revised-without", 700)
    kept = sample("revised-with", 900)
    batch = [
        first,
        dataclasses.replace(first, revision=1, output_chars={}),  # its latest carries none: no sample
        dataclasses.replace(kept, output_chars={}),
        dataclasses.replace(kept, revision=1),
        sample("plain", 1100, chars=1234),
    ]
    store = SqlStore(store_url)
    try:
        store.write(batch)
        rows = store.calibration_samples()
    finally:
        store.shutdown()
    assert sorted((row.output_tokens, dict(row.chars)) for row in rows) == [
        (900, {"text": 3500}),
        (1100, {"text": 1234}),
    ]


def test_a_load_reads_the_newest_samples_of_each_model_and_calibrates_as_all_of_them_would(store_url):
    other = "claude-opus-4-6"
    stored = [sample(f"h-{i}", 900 + (i * 37) % 400, 3500, MODEL) for i in range(3 * PER_MODEL)]
    stored += [sample(f"o-{i}", 1200 + (i * 53) % 300, 3500, other) for i in range(PER_MODEL // 4)]
    store = SqlStore(store_url)
    try:
        store.write(stored)
        estimator = OutputEstimator()
        assert FleetCalibration(store, estimator, refresh_s=300.0).load() == PER_MODEL + PER_MODEL // 4
        everything = store.calibration_samples()  # in the order they were stored
    finally:
        store.shutdown()
    assert len(everything) == len(stored)
    fed_everything = OutputEstimator()
    for row in everything:
        fed_everything.observe(row.model, row.chars, row.output_tokens)
    for model in (MODEL, other):
        assert estimator.estimate(model, {"text": 35_000}) == fed_everything.estimate(model, {"text": 35_000})


def test_an_unreadable_store_leaves_the_estimator_as_it_is_and_says_so_once(caplog):
    caplog.set_level(logging.INFO, logger="costwatch")

    class Broken:
        def calibration_samples(self, **_: object) -> list[object]:
            raise OSError("database is down")

    estimator = OutputEstimator()
    calibration = FleetCalibration(Broken(), estimator, refresh_s=0.0)  # type: ignore[arg-type]
    assert calibration.load() == 0 and calibration.refresh() == 0
    calibration.export([])
    assert estimator.snapshot()["models"] == {}
    assert sum("calibration samples" in r.getMessage() for r in caplog.records) == 1
