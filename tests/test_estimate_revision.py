"""Revised estimates: a dropped attempt's output is estimated again once the calibration has moved,
and the store, its rollups and the metrics follow, as they follow an abandoned attempt turned retried."""

from __future__ import annotations

import dataclasses
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import read_stream_through_a_cut, sample_value
from prometheus_client import CollectorRegistry

import costwatch
from costwatch.estimation import OutputEstimator
from costwatch.metrics import MetricsSink
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, Outcome, OutputSource, Usage, WasteReason
from costwatch.revise import RECHECK_SHARE, EstimateRevision, is_material, revised_estimate
from costwatch.sinks import MemorySink
from costwatch.spool import Spool
from costwatch.store import SqlStore
from costwatch.store.rows import record_from_row
from costwatch.store.schema import ALL_TIME_ROLLUPS, ATTEMPTS, ROLLUPS
from costwatch.testing import FakeAnthropicServer, Fault, ResponseSpec


@pytest.fixture
def store_url(new_store_url: str) -> str:
    """A store at the newest revision already (conftest's ``new_store_url``): these tests are of what
    a store does, not of how it is created."""
    return new_store_url


MODEL = "claude-haiku-4-5"
SPEC = ResponseSpec.small(600)
PRICES = load_prices()


def run_process(store_url: str, spool: Path, work, *, registry: CollectorRegistry | None = None) -> None:
    """One "process": costwatch instrumented over the store, ``work`` run, records flushed, uninstrumented."""
    sinks: list[Any] = [SqlStore(store_url)]
    if registry is not None:
        sinks.append(MetricsSink(registry=registry, retry_window_s=3600))
    pipeline = Pipeline(spool=Spool(spool))
    assert costwatch.instrument(pipeline=pipeline, sinks=sinks, listeners=[], prices=PRICES)
    try:
        work()
        assert costwatch.flush(20)
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def stream(server: FakeAnthropicServer, i: int) -> None:
    read_stream_through_a_cut(server, i, MODEL)


def cut(server: FakeAnthropicServer, i: int, deltas: int = 120) -> None:
    server.enqueue(Fault.cut_after_deltas(deltas))
    stream(server, i)


def stored(store_url: str) -> list[AttemptRecord]:
    store = SqlStore(store_url)
    try:
        with store.engine.connect() as connection:
            return [record_from_row(row) for row in connection.execute(sa.select(ATTEMPTS)).mappings()]
    finally:
        store.shutdown()


def rollup_sums(store_url: str) -> tuple[dict[str, float], dict[str, float]]:
    """The hourly and the all-time rollups' measures, each summed over every row."""
    names = ("billed_output_tokens", "wasted_output_tokens", "estimated_output_tokens", "billed_cost_usd")
    store = SqlStore(store_url)
    try:
        with store.engine.connect() as connection:
            hourly = connection.execute(sa.select(*(sa.func.sum(ROLLUPS.c[n]) for n in names))).one()
            all_time = connection.execute(
                sa.select(*(sa.func.sum(ALL_TIME_ROLLUPS.c[n]) for n in names))
            ).one()
    finally:
        store.shutdown()
    return dict(zip(names, map(float, hourly), strict=True)), dict(
        zip(names, map(float, all_time), strict=True)
    )


def assert_rollups_are_the_rows_summed(store_url: str) -> None:
    rows = stored(store_url)
    wanted = {
        "billed_output_tokens": sum(r.usage.output_tokens for r in rows),
        "wasted_output_tokens": sum(r.usage.output_tokens for r in rows if r.wasted),
        "estimated_output_tokens": sum(
            r.usage.estimated_output_tokens for r in rows if r.usage.output_estimated
        ),
        "billed_cost_usd": sum(r.cost.total_usd for r in rows if r.cost is not None),
    }
    hourly, all_time = rollup_sums(store_url)
    for sums in (hourly, all_time):
        assert sums == pytest.approx(wanted, rel=1e-9)


def test_drops_before_any_completion_are_revised_at_flush_and_the_rollups_and_metrics_follow(
    store_url, tmp_path
):
    registry = CollectorRegistry()
    with FakeAnthropicServer(SPEC) as server:

        def work() -> None:
            for i in range(3):
                cut(server, i, 60 + 30 * i)
            for i in range(3):
                stream(server, 10 + i)

        run_process(store_url, tmp_path / "spool", work, registry=registry)
        truth = {e.request_id: e.output_tokens for e in server.ledger.entries}
    records = stored(store_url)
    dropped = [r for r in records if r.outcome is Outcome.DROPPED]
    assert len(dropped) == 3
    first = 0
    for record in dropped:
        default = OutputEstimator().estimate(MODEL, _chars(store_url, record))
        first += default
        real = truth[record.request_id]
        assert abs(default - real) / real > 0.15  # estimated with the defaults when it was cut
        assert record.revision >= 1 and record.usage.output_estimated
        assert abs(record.usage.output_tokens - real) / real < 0.10
    assert_rollups_are_the_rows_summed(store_url)
    revised = sum(r.usage.output_tokens for r in dropped)
    # The metrics counted each drop's first estimate, then the difference the revision made. A
    # counter cannot go down, and a batch's additions and corrections net out before they reach it
    # (docs/metrics.md): where the first estimates and the revisions fall into batches decides how
    # high the counter went, between the revised total and the first estimates', never outside.
    counted = sample_value(registry, "costwatch_estimated_output_tokens_total", model=MODEL)
    assert revised <= counted <= max(first, revised)
    estimated = sample_value(registry, "costwatch_output_tokens_total", model=MODEL, source="estimated")
    assert estimated == counted
    assert all(r.output_source is OutputSource.ESTIMATED for r in dropped)  # revised, still an estimate
    assert (
        sample_value(registry, "costwatch_billed_tokens_total", model=MODEL, token_type="output")
        == counted + 3 * 600
    )


def _chars(store_url: str, record: AttemptRecord) -> dict[str, int]:
    store = SqlStore(store_url)
    try:
        found = store.attempt(record.attempt_id)
    finally:
        store.shutdown()
    assert found is not None and found.output_chars
    return dict(found.output_chars)


def test_a_later_process_revises_the_estimates_an_earlier_process_made_with_the_defaults(store_url, tmp_path):
    with FakeAnthropicServer(SPEC) as server:
        run_process(store_url, tmp_path / "a", lambda: [cut(server, i, 100) for i in range(2)])
        first = {r.attempt_id: r for r in stored(store_url)}
        run_process(store_url, tmp_path / "b", lambda: [stream(server, 10 + i) for i in range(3)])
        truth = {e.request_id: e.output_tokens for e in server.ledger.entries}
    assert all(r.revision == 0 for r in first.values())
    later = {r.attempt_id: r for r in stored(store_url) if r.attempt_id in first}
    for attempt_id, record in later.items():
        real = truth[record.request_id]
        assert abs(first[attempt_id].usage.output_tokens - real) / real > 0.15
        assert record.revision >= 1  # at its first batch, and again at its flush if still moving
        assert abs(record.usage.output_tokens - real) / real < 0.10
    assert_rollups_are_the_rows_summed(store_url)


# -- the store side, with records made by hand -------------------------------------------------------
def dropped(
    attempt_id: str, chars: int, estimate: int, *, started_at: datetime | None = None, model: str = MODEL
) -> AttemptRecord:
    usage = Usage(
        input_tokens=100, output_tokens=estimate, output_estimated=True, estimated_output_tokens=estimate
    )
    record = AttemptRecord(
        attempt_id=attempt_id,
        logical_request_id=attempt_id,
        attempt_number=1,
        started_at=started_at or datetime.now(timezone.utc),
        outcome=Outcome.DROPPED,
        model_requested=model,
        model=model,
        stream=True,
        usage=usage,
        wasted=True,
        waste_reason=WasteReason.ABANDONED,
        output_chars={"text": chars},
    )
    return dataclasses.replace(record, cost=PRICES.cost_of(record))


def calibrated(factor: float, *models: str) -> OutputEstimator:
    """An estimator whose text factor is ``factor`` for ``models`` (by default ``MODEL``), from 20
    identical samples each, no prior."""
    estimator = OutputEstimator(prior_weight=0)
    for model in models or (MODEL,):
        for _ in range(20):
            estimator.observe(model, {"text": 3500}, round(1000 * factor))
    return estimator


def reviser(store: SqlStore, estimator: OutputEstimator, **kwargs: Any) -> EstimateRevision:
    return EstimateRevision(
        store, estimator, PRICES, window_s=kwargs.pop("window_s", 3600), refresh_s=300, **kwargs
    )


def write_all(store: SqlStore, reviser: EstimateRevision) -> int:
    return sum(store.write(batch).revised for batch in reviser.revisions(final=True))


def test_a_revision_is_written_once_however_many_processes_find_it_at_the_same_time(store_url):
    store = SqlStore(store_url)
    try:
        store.write([dropped(f"d{i}", 3500, 1000) for i in range(5)])
        estimator = calibrated(0.7)
        # Both "processes" read the same stored revisions before either writes.
        first = [batch for batch in reviser(store, estimator).revisions(final=True)]
        second = [batch for batch in reviser(store, estimator).revisions(final=True)]
        assert [len(b) for b in first] == [len(b) for b in second] == [5]
        assert store.write(first[0]).revised == 5
        assert store.write(second[0]).revised == 0  # the same revision number: already stored
        assert write_all(store, reviser(store, estimator)) == 0  # and nothing left to revise
    finally:
        store.shutdown()
    assert {
        (r.revision, r.usage.output_tokens, r.usage.estimated_output_tokens) for r in stored(store_url)
    } == {(1, 700, 700)}
    assert_rollups_are_the_rows_summed(store_url)


def test_processes_revising_the_same_window_at_once_write_each_revision_once(store_url):
    setup = SqlStore(store_url)
    try:
        setup.write([dropped(f"d{i:02}", 3500, 1000) for i in range(40)])
    finally:
        setup.shutdown()
    estimator = calibrated(0.7)
    stores = [SqlStore(store_url) for _ in range(4)]
    start = threading.Barrier(len(stores))
    written: list[int] = []

    def process(store: SqlStore) -> None:
        batches = list(reviser(store, estimator, batch_size=7).revisions(final=True))
        start.wait()
        written.append(sum(store.write(batch).revised for batch in batches))

    try:
        threads = [threading.Thread(target=process, args=(store,)) for store in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        for store in stores:
            store.shutdown()
    assert sum(written) == 40  # every attempt revised by exactly one of them
    assert {(r.revision, r.usage.output_tokens) for r in stored(store_url)} == {(1, 700)}
    assert_rollups_are_the_rows_summed(store_url)


def test_a_reviser_runs_on_the_writer_thread_at_a_flush_and_its_revisions_reach_every_sink(tmp_path):
    record = dropped("d", 3500, 1000)
    threads: list[str] = []

    class Revising:
        name = "revising"

        def revisions(self, *, final: bool) -> Any:
            threads.append(threading.current_thread().name)
            if final:
                yield [dataclasses.replace(record, usage=_output(record.usage, 700), revision=1)]

        def export(self, records: Any) -> None:
            pass

        def shutdown(self) -> None:
            pass

    memory = MemorySink()
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"))
    pipeline.add_sink(memory)
    pipeline.add_sink(Revising())
    try:
        pipeline.submit(record)
        assert pipeline.flush(10)
        assert [(r.revision, r.usage.output_tokens) for r in memory.records] == [(1, 700)]
    finally:
        pipeline.shutdown()
    assert threads and set(threads) == {"costwatch-pipeline"}


def test_a_revision_keeps_what_the_store_decided_since_and_takes_the_next_number(store_url):
    store = SqlStore(store_url)
    try:
        record = dropped("d", 3500, 1000)
        store.write([record])
        store.write([record.with_waste(WasteReason.RETRIED)])  # its retry arrived meanwhile
        assert write_all(store, reviser(store, calibrated(1.3))) == 1
    finally:
        store.shutdown()
    (found,) = stored(store_url)
    assert (found.revision, found.waste_reason, found.usage.output_tokens) == (2, WasteReason.RETRIED, 1300)
    assert found.cost is not None and record.cost is not None
    assert found.cost.input_usd == record.cost.input_usd
    assert found.cost.output_usd == pytest.approx(record.cost.output_usd * 1.3)
    assert_rollups_are_the_rows_summed(store_url)


def test_only_estimates_within_the_window_that_moved_materially_are_revised(store_url):
    old = datetime.now(timezone.utc) - timedelta(hours=3)
    store = SqlStore(store_url)
    try:
        store.write(
            [
                dropped("recent", 3500, 1000),
                dropped("close-enough", 3500, 710),  # 1.4% from the new estimate of 700
                dropped("old", 3500, 1000, started_at=old),
            ]
        )
        assert write_all(store, reviser(store, calibrated(0.7), window_s=2 * 3600, batch_size=1)) == 1
    finally:
        store.shutdown()
    by_id = {r.attempt_id: r for r in stored(store_url)}
    assert {key: (r.revision, r.usage.output_tokens) for key, r in by_id.items()} == {
        "recent": (1, 700),
        "close-enough": (0, 710),
        "old": (0, 1000),
    }


def test_a_pass_reads_the_whole_window_only_after_the_calibration_moved(store_url):
    store = SqlStore(store_url)
    estimator = calibrated(1.0)
    revision = reviser(store, estimator, batch_size=2)
    try:
        store.write([dropped(f"d{i}", 3500, 1000) for i in range(5)])
        assert write_all(store, revision) == 0  # already right: nothing to write
        calls: list[int] = []
        read = store.estimated_attempts

        def counted(**kwargs: Any) -> Any:
            calls.append(kwargs["after"])
            return read(**kwargs)

        revision.source = type("Counted", (), {"estimated_attempts": staticmethod(counted)})()
        assert write_all(store, revision) == 0
        assert len(calls) == 1 and calls[0] > 0  # only past the last sample seen
        for _ in range(20):
            estimator.observe(MODEL, {"text": 3500}, 500)
        calls.clear()
        assert write_all(store, revision) == 5
        assert calls[0] == 0 and len(calls) == 3  # the whole window, two at a time
        assert revision.revised == 5
    finally:
        store.shutdown()
    assert_rollups_are_the_rows_summed(store_url)


def test_reading_ahead_finds_the_first_pass_revisions_before_the_writer_wakes_and_it_reads_no_more(
    store_url,
):
    estimator = calibrated(0.7)
    store = SqlStore(store_url)
    # The clock stands still: no refresh comes due, so the writer's passes are not final.
    revision = reviser(store, estimator, batch_size=7, clock=lambda: 0.0)
    try:
        store.write([dropped(f"d{i:02}", 3500, 1000) for i in range(5)])
        revision.read_ahead()  # at instrument(): one page of the window, the whole window here
        assert revision.rows_read == 5
        store.write([dropped("later", 3500, 1000)])  # stored after the read, left to the next pass
        assert sum(store.write(b).revised for b in revision.revisions(final=False)) == 5
        assert revision.rows_read == 5  # the writer's first wake-up read nothing
        assert list(revision.revisions(final=False)) == []
        assert write_all(store, revision) == 1 and revision.rows_read == 6  # the next pass reads on
    finally:
        store.shutdown()
    assert {r.usage.output_tokens for r in stored(store_url)} == {700}
    assert_rollups_are_the_rows_summed(store_url)


def test_a_window_longer_than_a_page_is_read_on_by_the_writers_first_pass_after_reading_ahead(store_url):
    estimator = calibrated(0.7)
    store = SqlStore(store_url)
    revision = reviser(store, estimator, batch_size=7, clock=lambda: 0.0)
    try:
        store.write([dropped(f"d{i:02}", 3500, 1000) for i in range(20)])
        revision.read_ahead()
        assert revision.rows_read == 7  # one page, at most, before the application's first request
        assert sum(store.write(b).revised for b in revision.revisions(final=False)) == 20
        assert revision.rows_read == 20  # the rest read at the writer's first wake-up, once
    finally:
        store.shutdown()
    assert_rollups_are_the_rows_summed(store_url)


OTHER_MODEL = "claude-sonnet-4-5"


def test_a_second_flush_after_a_calibration_change_too_small_to_matter_reads_no_stored_estimate(
    store_url, tmp_path
):
    estimator = calibrated(1.0)
    store = SqlStore(store_url)
    revision = reviser(store, estimator)
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"))
    pipeline.add_sink(store)
    pipeline.add_sink(revision)
    try:
        for i in range(50):
            pipeline.submit(dropped(f"d{i:02}", 3500, 1000))
        assert pipeline.flush(20)
        assert revision.rows_read == 50  # the first pass reads the window once
        before = estimator.factors(MODEL)
        estimator.observe(MODEL, {"text": 3500}, 1000)  # a sample the calibration already predicts
        estimator.observe(MODEL, {"text": 3500}, 1030)  # and one that moves the factor by 0.3%
        after = estimator.factors(MODEL)
        assert after != before and max(a / b for a, b in zip(after, before, strict=True)) < 1.01
        assert pipeline.flush(20)
        assert pipeline.flush(20)
        assert revision.rows_read == 50  # nothing read again: no estimate can have moved materially
        assert revision.revised == 0
    finally:
        pipeline.shutdown()


def test_a_material_move_of_one_model_reads_again_only_that_models_estimates(store_url):
    estimator = calibrated(1.0, MODEL, OTHER_MODEL)
    store = SqlStore(store_url)
    revision = reviser(store, estimator, batch_size=7)
    try:
        store.write(
            [dropped(f"a{i:02}", 3500, 1000) for i in range(20)]
            + [dropped(f"b{i:02}", 3500, 1000, model=OTHER_MODEL) for i in range(30)]
        )
        assert write_all(store, revision) == 0 and revision.rows_read == 50
        for _ in range(20):
            estimator.observe(MODEL, {"text": 3500}, 700)
        store.write([dropped("new", 3500, 1000, model=OTHER_MODEL)])  # stored since the last pass
        assert write_all(store, revision) == 20
        # MODEL's 20 estimates, and the one estimate stored since; not OTHER_MODEL's 30 older ones.
        assert revision.rows_read == 50 + 20 + 1
    finally:
        store.shutdown()
    by_id = {r.attempt_id: r for r in stored(store_url)}
    now = estimator.estimate(MODEL, {"text": 3500})
    assert now < 750
    assert {r.usage.output_tokens for key, r in by_id.items() if key.startswith("a")} == {now}
    assert {r.usage.output_tokens for key, r in by_id.items() if not key.startswith("a")} == {1000}
    assert_rollups_are_the_rows_summed(store_url)


def test_drift_below_the_recheck_share_accumulates_until_it_reads_the_window_again(store_url):
    estimator = calibrated(1.0)
    store = SqlStore(store_url)
    revision = reviser(store, estimator)
    try:
        store.write([dropped(f"d{i}", 3500, 1000) for i in range(5)])
        assert write_all(store, revision) == 0 and revision.rows_read == 5
        passes = 0
        while revision.rows_read == 5:  # each step moves the factor by ~0.3%, less than RECHECK_SHARE
            estimator.observe(MODEL, {"text": 3500}, 1030)
            write_all(store, revision)
            passes += 1
        assert passes > 1  # not at the first small step
        assert revision.rows_read == 10  # the window once more, when the moves added up past it
        assert estimator.factors(MODEL)[0] > 1 + RECHECK_SHARE
    finally:
        store.shutdown()


def test_a_page_is_full_however_many_samples_have_lost_their_estimated_attempt(store_url):
    store = SqlStore(store_url)
    try:
        store.write([dropped(f"d{i}", 3500, 1000) for i in range(9)])
        with store.engine.begin() as connection:  # as a prune that left their samples would
            connection.execute(sa.delete(ATTEMPTS).where(ATTEMPTS.c.attempt_id.in_(["d1", "d2", "d3", "d5"])))
        since = datetime.now(timezone.utc) - timedelta(hours=1)
        pages, after = [], 0
        while page := store.estimated_attempts(since=since, after=after, limit=2):
            pages.append([record.attempt_id for _, record in page])
            after = page[-1][0]
    finally:
        store.shutdown()
    assert pages == [["d0", "d4"], ["d6", "d7"], ["d8"]]


def test_a_window_of_zero_revises_nothing(store_url):
    store = SqlStore(store_url)
    try:
        store.write([dropped("d", 3500, 1000)])
        assert write_all(store, reviser(store, calibrated(0.5), window_s=0)) == 0
    finally:
        store.shutdown()


def test_a_revision_is_material_from_one_token_and_more_than_two_percent():
    assert not is_material(10, 10)
    assert is_material(10, 11)  # one token of a small estimate
    assert not is_material(1000, 1020)  # 2% of a large one: noise
    assert is_material(1000, 1021) and is_material(1000, 979)
    assert is_material(0, 1)


def test_a_record_without_counts_or_whose_output_was_not_estimated_is_never_revised():
    estimator = calibrated(0.5)
    record = dropped("d", 3500, 1000)
    assert revised_estimate(dataclasses.replace(record, output_chars={}), estimator, PRICES) is None
    for source in (OutputSource.REPORTED, OutputSource.COUNTED, OutputSource.RECONCILED):
        usage = Usage(input_tokens=1, output_tokens=1000, output_source=source)
        assert revised_estimate(dataclasses.replace(record, usage=usage), estimator, PRICES) is None
    revised = revised_estimate(record, estimator, PRICES)
    assert revised is not None and (revised.revision, revised.usage.output_tokens) == (1, 500)


# -- the metrics side --------------------------------------------------------------------------------
def test_metrics_count_a_revised_estimate_as_a_difference_and_never_go_down():
    registry = CollectorRegistry()
    sink = MetricsSink(registry=registry, retry_window_s=3600)

    def billed_output() -> float:
        return sample_value(registry, "costwatch_billed_tokens_total", model=MODEL, token_type="output")

    def wasted_output(reason: str) -> float:
        return sample_value(
            registry,
            "costwatch_wasted_tokens_total",
            model=MODEL,
            token_type="output",
            reason=reason,
            workflow="",
        )

    up = dropped("up", 3500, 1000)
    sink.export([up])
    sink.export([dataclasses.replace(up, usage=_output(up.usage, 1200), revision=1)])
    assert billed_output() == 1200
    sink.settle()  # abandoned, with the latest figures held for it
    assert wasted_output("abandoned") == 1200

    down = dropped("down", 3500, 1000).with_waste(WasteReason.RETRIED)
    sink.export([down])
    assert wasted_output("retried") == 1000
    sink.export([dataclasses.replace(down, usage=_output(down.usage, 700), revision=2)])
    assert billed_output() == 2200  # a counter cannot go down: 300 are owed
    assert wasted_output("retried") == 1000
    sink.export([dataclasses.replace(dropped("next", 3500, 500), revision=0).with_waste(WasteReason.RETRIED)])
    assert billed_output() == 1200 + 700 + 500  # paid out of the next increase
    assert wasted_output("retried") == 700 + 500


def test_a_flip_with_the_same_number_as_a_revised_estimate_still_settles_as_retried():
    registry = CollectorRegistry()
    sink = MetricsSink(registry=registry, retry_window_s=3600)
    record = dropped("d", 3500, 1000)
    sink.export([record])
    sink.export([dataclasses.replace(record, usage=_output(record.usage, 800), revision=1)])  # from the store
    sink.export([record.with_waste(WasteReason.RETRIED)])  # from memory, also revision 1
    retried = sample_value(
        registry,
        "costwatch_wasted_tokens_total",
        model=MODEL,
        token_type="output",
        reason="retried",
        workflow="",
    )
    assert retried == 800
    sink.settle()
    assert (
        sample_value(
            registry,
            "costwatch_wasted_tokens_total",
            model=MODEL,
            token_type="output",
            reason="abandoned",
            workflow="",
        )
        == 0
    )


def _output(usage: Usage, tokens: int) -> Usage:
    return dataclasses.replace(usage, output_tokens=tokens, estimated_output_tokens=tokens)
