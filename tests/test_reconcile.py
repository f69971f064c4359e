"""costwatch reconcile: the store beside the fake API's usage report, on real sockets and a real store."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anthropic
import pytest
import sqlalchemy as sa
from conftest import sigint_by_default

import costwatch
from costwatch.cli import main
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, OutputSource, Usage
from costwatch.store import RollupTotals, SqlStore, create_store_engine
from costwatch.store.history import iter_attempts
from costwatch.store.schema import CALIBRATION_SAMPLES, RECONCILIATIONS
from costwatch.testing import (
    DEFAULT_BLOCKS,
    BlockSpec,
    DropProfile,
    Ending,
    FakeAnthropicServer,
    Fault,
    ResponseSpec,
)
from costwatch.testing.ledger import LedgerEntry
from costwatch.testing.usage_report import FAKE_ADMIN_KEY

MODEL = "claude-opus-4-6"
MESSAGES: Any = [{"role": "user", "content": "Refactor the billing module and explain each change."}]
# Every kind of block of the default answer at a fifth of its size (760 output tokens, ~380 deltas): what
# is checked is the bill and the store agreeing to the token, whatever the size; the SDK's parsing of
# the default 3,800-token answers was most of this module's CPU.
SPEC = ResponseSpec(
    blocks=tuple(BlockSpec(block.kind, block.output_tokens // 5) for block in DEFAULT_BLOCKS),
    cache_read_tokens=800,
    cache_write_5m_tokens=120,
)

# The tests read the usage report's hourly buckets of traffic they send now: one that ran across the
# top of the hour would find it split between two rows (one of them fully seen, say).
pytestmark = pytest.mark.usefixtures("one_hour_bucket")


@pytest.fixture
def fake() -> Iterator[FakeAnthropicServer]:
    """The fake API cutting about half of the streams."""
    with FakeAnthropicServer(SPEC, drop_profile=DropProfile(0.5, seed=3)) as server:
        yield server


@pytest.fixture
def steady() -> Iterator[FakeAnthropicServer]:
    """The fake API cutting no stream: every attempt reports its usage."""
    with FakeAnthropicServer(SPEC) as server:
        yield server


@pytest.fixture
def db(tmp_path: Path) -> str:
    """An empty SQLite store."""
    return f"sqlite:///{tmp_path / 'cw.db'}"


def _send(server: FakeAnthropicServer, count: int, model: str = MODEL) -> None:
    client = anthropic.Anthropic(base_url=server.base_url, api_key="sk-ant-api03-app", max_retries=0)
    try:
        for n in range(count):
            body: Any = [{"role": "user", "content": f"{MESSAGES[0]['content']} ({n})"}]
            try:
                with client.messages.stream(model=model, max_tokens=4096, messages=body) as stream:
                    for _ in stream:
                        pass
            except Exception:  # a dropped stream: the application would retry; this test does not
                pass
    finally:
        client.close()


def _instrumented(server: FakeAnthropicServer, db: str, count: int, model: str = MODEL) -> None:
    pipeline = Pipeline()
    costwatch.instrument(pipeline=pipeline, database_url=db, metrics=False)
    try:
        _send(server, count, model)
        assert costwatch.flush(timeout=60.0)
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


class Reconcile:
    """`costwatch reconcile` run in-process as the CLI runs it, against a fake's usage report."""

    def __init__(self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
        self._capsys = capsys
        self._monkeypatch = monkeypatch

    def __call__(
        self,
        server: FakeAnthropicServer,
        db: str,
        *extra: str,
        key: str | None = FAKE_ADMIN_KEY,
        since: str = "1h",
        base_url: str | None = None,
    ) -> tuple[int, str, str]:
        """Exit status, standard output and standard error of one run; the key never shows in them."""
        if key is None:
            self._monkeypatch.delenv("ANTHROPIC_ADMIN_API_KEY", raising=False)
        else:
            self._monkeypatch.setenv("ANTHROPIC_ADMIN_API_KEY", key)
        self._capsys.readouterr()
        argv = ["reconcile", "--since", since, "--base-url", base_url or server.base_url, "--db", db, *extra]
        code = main(argv)
        out, err = self._capsys.readouterr()
        assert key is None or key not in out + err
        return code, out, err

    def json(self, server: FakeAnthropicServer, db: str) -> dict[str, Any]:
        """The JSON document of a run that succeeded."""
        code, out, err = self(server, db, "--format", "json")
        assert code == 0, err
        result: dict[str, Any] = json.loads(out)
        return result


@pytest.fixture
def reconcile(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Reconcile:
    return Reconcile(capsys, monkeypatch)


def _stored(db: str) -> list[AttemptRecord]:
    store = SqlStore(db)
    try:
        with store.engine.connect() as connection:
            return [record for page in iter_attempts(connection) for record in page]
    finally:
        store.shutdown()


def _rollups(db: str) -> RollupTotals:
    store = SqlStore(db)
    try:
        [totals] = store.rollup_totals()
        return totals
    finally:
        store.shutdown()


def _rows(db: str, query: sa.Select[Any]) -> list[dict[str, Any]]:
    engine = create_store_engine(db)
    try:
        with engine.connect() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]
    finally:
        engine.dispose()


def _samples(db: str) -> list[dict[str, Any]]:
    """The calibration samples stored, oldest first."""
    return _rows(db, sa.select(CALIBRATION_SAMPLES).order_by(CALIBRATION_SAMPLES.c.sample_id))


def _reconciliations(db: str) -> list[dict[str, Any]]:
    """The reconciliation rows stored."""
    return _rows(db, sa.select(RECONCILIATIONS))


def _gauges(db: str) -> dict[str, dict[tuple[str, ...], float]]:
    """What `costwatch serve` would export as gauges from the store."""
    from costwatch.exporter import FleetCollector

    collector = FleetCollector(db)
    try:
        return collector.read().gauges
    finally:
        collector.close()


def _bucket_of(entry: LedgerEntry) -> str:
    hour = datetime.fromtimestamp(entry.billed_at, timezone.utc).replace(minute=0, second=0, microsecond=0)
    return hour.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_instrumented_traffic_has_full_coverage_and_dropped_estimates_corrected_to_the_billed_figure(
    fake: FakeAnthropicServer,
    store_url: str,
    reconcile: Reconcile,
) -> None:
    _instrumented(fake, store_url, 10)
    estimated = {r.attempt_id: r for r in _stored(store_url) if r.output_source is OutputSource.ESTIMATED}
    result = reconcile.json(fake, store_url)
    ledger = fake.ledger.entries
    dropped = [e for e in ledger if e.ending is not Ending.COMPLETED]
    assert dropped and estimated, "the drop profile should have cut some streams"
    totals = result["totals"]
    # After the correction the store holds exactly what Anthropic billed, output included.
    assert totals["coverage"] == {"input": 1.0, "cache_read": 1.0, "cache_write": 1.0, "output": 1.0}
    assert totals["unseen"] == {
        "tokens": {"input": 0, "cache_read": 0, "cache_write": 0, "output": 0},
        "usd": 0.0,
    }
    assert totals["reported"]["requests"] == len(ledger) == totals["recorded"]["attempts"]
    stored = _stored(store_url)
    reconciled = [r for r in stored if r.output_source is OutputSource.RECONCILED]
    assert {r.attempt_id for r in reconciled} == set(estimated)
    # Per bucket, the dropped attempts' output is what the server billed them, to the token.
    for row in result["rows"]:
        assert row["correction"]["status"] == "corrected"
        in_bucket = [
            r for r in reconciled if r.started_at.strftime("%Y-%m-%dT%H:00:00Z") == row["bucket_start"]
        ]
        billed = sum(e.output_tokens for e in dropped if _bucket_of(e) == row["bucket_start"])
        assert (
            sum(r.usage.output_tokens for r in in_bucket)
            == billed
            == row["dropped_output"]["residual_tokens"]
        )
    assert totals["dropped_output"]["estimated_tokens"] == sum(
        r.usage.estimated_output_tokens for r in estimated.values()
    )
    assert totals["recorded"]["output_estimated_tokens"] == 0
    assert totals["recorded"]["output_reconciled_tokens"] == sum(e.output_tokens for e in dropped)
    # The rollups moved with the rows: the store's totals are the bill's, and the waste moved by
    # what the JSON says.
    rollups = _rollups(store_url)
    assert rollups.billed_output_tokens == sum(e.output_tokens for e in ledger)
    assert rollups.estimated_output_tokens == 0
    assert rollups.reconciled_output_tokens == sum(e.output_tokens for e in dropped)
    assert rollups.wasted_cost_usd == pytest.approx(sum(r.wasted_cost_usd for r in stored))
    moved = totals["correction"]
    assert moved["revised_attempts"] == moved["attempts"] == len(estimated)
    assert moved["wasted_usd_moved"] == pytest.approx(
        sum(r.wasted_cost_usd for r in reconciled) - sum(r.wasted_cost_usd for r in estimated.values()),
        abs=1e-6,
    )
    assert moved["wasted_usd_at_bill"] - moved["wasted_usd_at_estimate"] == pytest.approx(
        moved["wasted_usd_moved"], abs=1e-5
    )
    assert result["source"]["endpoints"] == [
        "/v1/organizations/analytics/usage",
        "/v1/organizations/analytics/cost",
    ]


def test_a_lone_dropped_attempt_gets_exactly_its_billed_output_and_a_calibration_sample_of_it(
    store_url: str, reconcile: Reconcile
) -> None:
    with FakeAnthropicServer(SPEC, faults=[None, Fault.cut_after_deltas(30), None]) as fake:
        _instrumented(fake, store_url, 3)
        [cut] = [e for e in fake.ledger.entries if e.ending is not Ending.COMPLETED]
        [before] = [r for r in _stored(store_url) if r.output_source is OutputSource.ESTIMATED]
        result = reconcile.json(fake, store_url)
        [after] = [r for r in _stored(store_url) if r.attempt_id == before.attempt_id]
        assert after.request_id == cut.request_id
        assert after.usage.output_tokens == cut.output_tokens > 0
        assert after.output_source is OutputSource.RECONCILED
        assert after.usage.estimated_output_tokens == before.usage.output_tokens  # the estimate, kept
        assert after.cost == load_prices().cost_of(after)
        assert after.revision == before.revision + 1
        [row] = result["rows"]
        assert row["correction"]["attempts"] == 1
        assert row["correction"]["output_tokens_moved"] == cut.output_tokens - before.usage.output_tokens
        # The fleet's estimator learns from the bill: the attempt's sample now holds its billed output.
        [sample] = [s for s in _samples(store_url) if s["attempt_id"] == before.attempt_id]
        assert sample["output_source"] == "reconciled"
        assert sample["output_tokens"] == cut.output_tokens
        assert sample["chars"]
        store = SqlStore(store_url)
        try:
            assert [
                (s.model, s.output_tokens) for s in store.calibration_samples(after=sample["sample_id"] - 1)
            ] == [(MODEL, cut.output_tokens)]
        finally:
            store.shutdown()
        # `costwatch serve` exports the waste before and after, and keeps the estimate beside the bill.
        gauges = _gauges(store_url)
        wasted = gauges["costwatch_reconciled_wasted_cost_usd"]
        assert wasted[(MODEL, "billed")] == pytest.approx(row["correction"]["wasted_usd_at_bill"])
        assert wasted[(MODEL, "estimated")] == pytest.approx(row["correction"]["wasted_usd_at_estimate"])
        assert gauges["costwatch_reconciled_dropped_output_tokens"] == {
            (MODEL, "estimated"): before.usage.output_tokens,
            (MODEL, "billed"): cut.output_tokens,
        }
        # Reconciling the settled bucket again changes nothing: no revision, no sample, same rollups.
        rollups, samples = _rollups(store_url), _samples(store_url)
        again = reconcile.json(fake, store_url)
        assert again["rows"][0]["correction"]["status"] == "settled"
        assert again["totals"]["correction"]["revised_attempts"] == 0
        assert again["totals"]["correction"]["wasted_usd_moved"] == 0.0
        assert again["rows"][0]["correction"]["wasted_usd_at_bill"] == row["correction"]["wasted_usd_at_bill"]
        assert _rollups(store_url) == rollups
        assert _samples(store_url) == samples
        assert [r for r in _stored(store_url) if r.attempt_id == after.attempt_id] == [after]
        code, out, _ = reconcile(fake, store_url)
        assert code == 0 and "1 dropped attempt(s) in 1 bucket(s) carry the output Anthropic billed" in out
        assert "this run changed nothing" in out


def test_a_bucket_with_traffic_costwatch_did_not_see_keeps_its_estimates_and_says_why(
    fake: FakeAnthropicServer,
    db: str,
    reconcile: Reconcile,
) -> None:
    _send(fake, 2)  # an uninstrumented process on the same organization
    _instrumented(fake, db, 8)
    before = _stored(db)
    assert any(r.output_source is OutputSource.ESTIMATED for r in before)
    result = reconcile.json(fake, db)
    assert {row["correction"]["status"] for row in result["rows"]} == {"left_alone"}
    assert {row["correction"]["reason"] for row in result["rows"]} == {"input_not_matched"}
    assert result["totals"]["correction"]["revised_attempts"] == 0
    assert sorted(_stored(db), key=lambda r: r.attempt_id) == sorted(before, key=lambda r: r.attempt_id)
    code, out, _ = reconcile(fake, db)
    assert code == 0 and "left alone (input not matched)" in out


def test_traffic_without_costwatch_is_the_exact_unseen_share_in_tokens_and_dollars(
    steady: FakeAnthropicServer,
    db: str,
    reconcile: Reconcile,
) -> None:
    _send(steady, 3)  # an uninstrumented process
    unseen_entries = steady.ledger.entries
    _instrumented(steady, db, 5)
    result = reconcile.json(steady, db)
    ledger = steady.ledger.entries
    totals = result["totals"]
    unseen_input = sum(e.input_tokens for e in unseen_entries)
    assert totals["unseen"]["tokens"]["input"] == unseen_input
    assert totals["unseen"]["tokens"]["cache_read"] == 800 * 3
    assert totals["unseen"]["tokens"]["output"] == sum(e.output_tokens for e in unseen_entries)
    assert totals["coverage"]["input"] == pytest.approx(
        1 - unseen_input / sum(e.input_tokens for e in ledger), abs=1e-6
    )
    price = load_prices().lookup(MODEL)
    assert price is not None
    expected = price.cost(
        Usage(
            input_tokens=unseen_input,
            cache_read_tokens=800 * 3,
            cache_write_5m_tokens=120 * 3,
            output_tokens=sum(e.output_tokens for e in unseen_entries),
        )
    ).total_usd
    assert totals["unseen"]["usd"] == pytest.approx(expected, abs=1e-6)
    assert all(row["dropped_output"]["residual_tokens"] is None for row in result["rows"])


def test_models_without_a_price_are_flagged_rows_with_unknown_unseen_dollars(
    steady: FakeAnthropicServer,
    db: str,
    reconcile: Reconcile,
) -> None:
    _send(steady, 1, model="claude-unreleased-9")
    _instrumented(steady, db, 1)
    result = reconcile.json(steady, db)
    unpriced = [row for row in result["rows"] if row["model"] == "claude-unreleased-9"]
    assert unpriced and all(row["priced"] is False and "unpriced" in row["flags"] for row in unpriced)
    assert all(row["unseen"]["usd"] is None for row in unpriced)
    assert result["totals"]["unpriced_rows"] == len(unpriced)
    code, out, _ = reconcile(steady, db)
    assert code == 0 and "no price" in out


def test_table_and_csv_show_coverage_per_token_type(
    steady: FakeAnthropicServer,
    db: str,
    reconcile: Reconcile,
) -> None:
    _instrumented(steady, db, 2)
    code, out, _ = reconcile(steady, db)
    assert code == 0
    assert (
        "Coverage (recorded / reported): input 100.0%, cache read 100.0%, cache write 100.0%, output 100.0%"
        in out
    )
    code, out, _ = reconcile(steady, db, "--format", "csv")
    header, *lines = out.splitlines()
    assert code == 0 and header.startswith("bucket_start,bucket_end,model,priced,flags,")
    assert lines and all(f",{MODEL},True,," in line for line in lines)


@pytest.mark.parametrize(
    ("key", "complaint"),
    [
        (None, "ANTHROPIC_ADMIN_API_KEY is not set"),
        ("sk-ant-admin01-wrong", "refused the admin key (401)"),
        ("sk-ant-api03-workspace", "(403): it is not an Admin key"),
    ],
)
def test_a_missing_wrong_or_workspace_key_is_one_line_and_exit_2(
    steady: FakeAnthropicServer,
    db: str,
    reconcile: Reconcile,
    key: str | None,
    complaint: str,
) -> None:
    _instrumented(steady, db, 1)
    code, out, err = reconcile(steady, db, key=key)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and complaint in err


def test_an_unreachable_api_is_one_line_and_exit_1(
    steady: FakeAnthropicServer,
    db: str,
    reconcile: Reconcile,
) -> None:
    _instrumented(steady, db, 1)
    code, out, err = reconcile(steady, db, base_url="http://127.0.0.1:9")
    assert code == 1 and out == "" and err.count("\n") == 1 and "cannot reach the usage API" in err


def test_a_window_before_the_api_keeps_data_is_exit_2(
    steady: FakeAnthropicServer,
    db: str,
    reconcile: Reconcile,
) -> None:
    _instrumented(steady, db, 1)
    code, _, err = reconcile(steady, db, since="2025-06-01")
    assert code == 2 and "2026-01-01" in err and err.count("\n") == 1


def test_reconciling_again_replaces_the_stored_rows_and_serve_exports_coverage_unseen_cost_and_time(
    steady: FakeAnthropicServer,
    db: str,
    reconcile: Reconcile,
) -> None:
    _send(steady, 2)  # unseen
    _instrumented(steady, db, 3)
    first = reconcile.json(steady, db)
    second = reconcile.json(steady, db)
    assert first["rows"] == second["rows"]
    stored = _reconciliations(db)
    assert len(stored) == len(second["rows"])
    assert sum(row["reported_input_tokens"] for row in stored) == second["totals"]["reported"]["input_tokens"]
    gauges = _gauges(db)
    totals = second["totals"]
    coverage = gauges["costwatch_reconciled_coverage_ratio"]
    assert coverage[(MODEL, "input")] == pytest.approx(totals["coverage"]["input"], abs=1e-6)
    assert coverage[(MODEL, "cache_read")] == pytest.approx(3 / 5)
    assert gauges["costwatch_unseen_cost_usd"][()] == pytest.approx(totals["unseen"]["usd"], abs=1e-6)
    last = gauges["costwatch_last_reconciliation_timestamp_seconds"][()]
    assert abs(last - time.time()) < 60


@contextlib.contextmanager
def _watching(
    fake: FakeAnthropicServer, db: str, *extra: str, read: str = "stderr", every: str = "1s"
) -> Iterator[subprocess.Popen[str]]:
    """`python -m costwatch reconcile --since 1h --watch 1s` against the fake, in a process of its own.

    Only the stream the test reads is a pipe: a pipe nobody drains fills up over many rounds and
    blocks the process in a write, where SIGINT cannot end it. SIGINT is restored to its default in
    the child (conftest's ``sigint_by_default``): a runner started as a background job ignores it.
    """
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[1]),
        "ANTHROPIC_ADMIN_API_KEY": FAKE_ADMIN_KEY,
    }
    argv = ["reconcile", "--since", "1h", "--watch", every, *extra, "--base-url", fake.base_url, "--db", db]
    process = subprocess.Popen(
        [sys.executable, "-m", "costwatch", *argv],
        env=env,
        preexec_fn=sigint_by_default,
        stderr=subprocess.PIPE if read == "stderr" else subprocess.DEVNULL,
        stdout=subprocess.PIPE if read == "stdout" else subprocess.DEVNULL,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.usefixtures("runner_ignoring_sigint")
def test_watch_reconciles_the_window_again_each_interval_without_duplicating_rows(db: str) -> None:
    with FakeAnthropicServer(SPEC, usage_lag_s=3600) as fake:
        _instrumented(fake, db, 2)
        with _watching(fake, db) as process:
            assert process.stderr is not None
            lines = [process.stderr.readline()]
            # The API's data lags: the first rounds find the attempts not reported yet.
            assert "input coverage -" in lines[0], lines
            fake.usage_lag_s = 0
            deadline = time.monotonic() + 30
            while "input coverage 100.0%" not in lines[-1] and time.monotonic() < deadline:
                lines.append(process.stderr.readline())
            lines.append(process.stderr.readline())
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 0
    assert "input coverage 100.0%" in lines[-1], lines
    assert FAKE_ADMIN_KEY not in "".join(lines)
    stored = _reconciliations(db)
    # Reconciled many times, one row per bucket and model, with the settled figures.
    assert len({(row["bucket_start"], row["model"]) for row in stored}) == len(stored) >= 1
    assert sum(row["reported_requests"] for row in stored) == 2


@pytest.mark.usefixtures("runner_ignoring_sigint")
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_watch_stops_cleanly_on_ctrl_c_or_sigterm_in_the_middle_of_its_wait(
    db: str, steady: FakeAnthropicServer, stop: signal.Signals
) -> None:
    """Waiting an hour for its next round, a watch still ends at once, with its rounds kept."""
    _instrumented(steady, db, 1)
    with _watching(steady, db, every="1h") as process:
        assert process.stderr is not None
        first = process.stderr.readline()
        assert "reconciled" in first, first + process.stderr.read()
        process.send_signal(stop)
        # A hang detector, far beyond a round: without the fix it would wait out the hour.
        process.wait(timeout=120)
        rest = process.stderr.read()
    assert process.returncode == 0, rest
    assert rest == "costwatch: stopped watching after 1 round(s)\n"
    assert sum(row["reported_requests"] for row in _reconciliations(db)) == 1


@pytest.mark.usefixtures("runner_ignoring_sigint")
def test_watch_prints_each_round_in_the_format_asked_and_corrects_a_bucket_once_it_settles(db: str) -> None:
    with FakeAnthropicServer(SPEC, faults=[Fault.cut_after_deltas(20), None], usage_lag_s=3600) as fake:
        _instrumented(fake, db, 2)
        with _watching(fake, db, "--format", "json", read="stdout") as process:
            assert process.stdout is not None
            # One JSON document a line, a line a round.
            rounds = [json.loads(process.stdout.readline())]
            # The API's data lags: the bucket is not reported yet, its estimate is left alone.
            assert rounds[0]["totals"]["correction"]["left_alone_rows"] == 1, rounds[0]
            fake.usage_lag_s = 0
            deadline = time.monotonic() + 30
            while rounds[-1]["totals"]["correction"]["revised_attempts"] == 0 and time.monotonic() < deadline:
                rounds.append(json.loads(process.stdout.readline()))
            rounds.append(json.loads(process.stdout.readline()))
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 0
    [cut] = [e for e in fake.ledger.entries if e.ending is not Ending.COMPLETED]
    corrected, settled = rounds[-2]["totals"]["correction"], rounds[-1]["totals"]["correction"]
    assert corrected["revised_attempts"] == corrected["attempts"] == 1
    # The rounds after it find the bucket settled and write nothing.
    assert settled["revised_attempts"] == 0 and settled["settled_rows"] == 1
    [dropped] = [r for r in _stored(db) if r.output_source is OutputSource.RECONCILED]
    assert dropped.usage.output_tokens == cut.output_tokens
