"""costwatch reconcile: the store beside the fake API's usage report, on real sockets and a real store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import pytest
import sqlalchemy as sa

import costwatch
from costwatch.cli import main
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.records import Usage
from costwatch.testing import DropProfile, Ending, FakeAnthropicServer, ResponseSpec
from costwatch.testing.usage_report import FAKE_ADMIN_KEY

MODEL = "claude-opus-4-6"
MESSAGES: Any = [{"role": "user", "content": "Refactor the billing module and explain each change."}]
SPEC = ResponseSpec(cache_read_tokens=800, cache_write_5m_tokens=120)


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


def _stored_reconciliations(db: str) -> list[Any]:
    from costwatch.store import create_store_engine
    from costwatch.store.schema import RECONCILIATIONS

    engine = create_store_engine(db)
    try:
        with engine.connect() as connection:
            return list(connection.execute(sa.select(RECONCILIATIONS)).mappings().all())
    finally:
        engine.dispose()


@dataclass
class Reconciling:
    """A fake API, a SQLite store, and ``costwatch reconcile`` run in this process against both."""

    fake: FakeAnthropicServer
    db: str
    capsys: pytest.CaptureFixture[str]
    monkeypatch: pytest.MonkeyPatch

    def send(self, count: int, model: str = MODEL) -> None:
        """Streams from an application costwatch does not see."""
        _send(self.fake, count, model)

    def instrumented(self, count: int, model: str = MODEL) -> None:
        """Streams from an instrumented application that stores into ``db``."""
        _instrumented(self.fake, self.db, count, model)

    def run(
        self, *extra: str, since: str = "1h", base_url: str | None = None, key: str | None = FAKE_ADMIN_KEY
    ) -> tuple[int, str, str]:
        """``costwatch reconcile``'s exit code, stdout and stderr (which never show the admin key)."""
        if key is None:
            self.monkeypatch.delenv("ANTHROPIC_ADMIN_API_KEY", raising=False)
        else:
            self.monkeypatch.setenv("ANTHROPIC_ADMIN_API_KEY", key)
        self.capsys.readouterr()
        url = base_url or self.fake.base_url
        code = main(["reconcile", "--since", since, "--base-url", url, "--db", self.db, *extra])
        out, err = self.capsys.readouterr()
        assert key is None or key not in out + err
        return code, out, err

    def json(self) -> dict[str, Any]:
        code, out, err = self.run("--format", "json")
        assert code == 0, err
        result: dict[str, Any] = json.loads(out)
        return result


@pytest.fixture
def reconciling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Reconciling]:
    with FakeAnthropicServer(SPEC) as server:
        yield Reconciling(server, f"sqlite:///{tmp_path / 'cw.db'}", capsys, monkeypatch)


def test_instrumented_traffic_has_full_coverage_and_dropped_output_reconciled_to_the_billed_figure(
    reconciling: Reconciling,
) -> None:
    reconciling.fake.drop_profile = DropProfile(0.5, seed=3)
    reconciling.instrumented(10)
    result = reconciling.json()
    ledger = reconciling.fake.ledger.entries
    dropped = [e for e in ledger if e.ending is not Ending.COMPLETED]
    assert dropped, "the drop profile should have cut some streams"
    totals = result["totals"]
    assert totals["coverage"] == {
        "input": 1.0,
        "cache_read": 1.0,
        "cache_write": 1.0,
        "output": pytest.approx(totals["recorded"]["output_tokens"] / sum(e.output_tokens for e in ledger)),
    }
    assert totals["unseen"] == {
        "tokens": {"input": 0, "cache_read": 0, "cache_write": 0, "output": 0},
        "usd": 0.0,
    }
    assert totals["reported"]["requests"] == len(ledger) == totals["recorded"]["attempts"]
    # What the dropped attempts really generated, from the bill, is exactly what the server sent them.
    completed_output = sum(e.output_tokens for e in ledger if e.ending is Ending.COMPLETED)
    reported_part_of_dropped = totals["recorded"]["output_reported_tokens"] - completed_output
    assert (
        totals["dropped_output"]["residual_tokens"]
        == sum(e.output_tokens for e in dropped) - reported_part_of_dropped
    )
    assert totals["dropped_output"]["estimated_tokens"] == totals["recorded"]["output_estimated_tokens"] > 0
    assert all(row["dropped_output"]["input_matched"] for row in result["rows"])
    assert result["source"]["endpoints"] == [
        "/v1/organizations/analytics/usage",
        "/v1/organizations/analytics/cost",
    ]


def test_traffic_without_costwatch_is_the_exact_unseen_share_in_tokens_and_dollars(
    reconciling: Reconciling,
) -> None:
    reconciling.send(3)
    unseen_entries = reconciling.fake.ledger.entries
    reconciling.instrumented(5)
    result = reconciling.json()
    ledger = reconciling.fake.ledger.entries
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
    reconciling: Reconciling,
) -> None:
    reconciling.send(1, model="claude-unreleased-9")
    reconciling.instrumented(1)
    result = reconciling.json()
    unpriced = [row for row in result["rows"] if row["model"] == "claude-unreleased-9"]
    assert unpriced and all(row["priced"] is False and "unpriced" in row["flags"] for row in unpriced)
    assert all(row["unseen"]["usd"] is None for row in unpriced)
    assert result["totals"]["unpriced_rows"] == len(unpriced)
    code, out, _ = reconciling.run()
    assert code == 0 and "no price" in out


def test_table_and_csv_show_coverage_per_token_type(reconciling: Reconciling) -> None:
    reconciling.instrumented(2)
    code, out, _ = reconciling.run()
    assert code == 0
    assert (
        "Coverage (recorded / reported): input 100.0%, cache read 100.0%, cache write 100.0%, output 100.0%"
        in out
    )
    code, out, _ = reconciling.run("--format", "csv")
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
    reconciling: Reconciling,
    key: str | None,
    complaint: str,
) -> None:
    reconciling.instrumented(1)
    code, out, err = reconciling.run(key=key)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and complaint in err


def test_an_unreachable_api_is_one_line_and_exit_1(reconciling: Reconciling) -> None:
    reconciling.instrumented(1)
    code, out, err = reconciling.run(base_url="http://127.0.0.1:9")
    assert code == 1 and out == "" and err.count("\n") == 1 and "cannot reach the usage API" in err


def test_a_window_before_the_api_keeps_data_is_exit_2(reconciling: Reconciling) -> None:
    reconciling.instrumented(1)
    code, _, err = reconciling.run(since="2025-06-01")
    assert code == 2 and "2026-01-01" in err and err.count("\n") == 1


def test_reconciling_again_replaces_the_stored_rows_and_serve_exports_coverage_unseen_cost_and_time(
    reconciling: Reconciling,
) -> None:
    from costwatch.exporter import FleetCollector

    reconciling.send(2)  # unseen
    reconciling.instrumented(3)
    first = reconciling.json()
    second = reconciling.json()
    assert first["rows"] == second["rows"]
    stored = _stored_reconciliations(reconciling.db)
    assert len(stored) == len(second["rows"])
    assert sum(row["reported_input_tokens"] for row in stored) == second["totals"]["reported"]["input_tokens"]
    collector = FleetCollector(reconciling.db)
    try:
        gauges = collector.read().gauges
    finally:
        collector.close()
    totals = second["totals"]
    coverage = gauges["costwatch_reconciled_coverage_ratio"]
    assert coverage[(MODEL, "input")] == pytest.approx(totals["coverage"]["input"], abs=1e-6)
    assert coverage[(MODEL, "cache_read")] == pytest.approx(3 / 5)
    assert gauges["costwatch_unseen_cost_usd"][()] == pytest.approx(totals["unseen"]["usd"], abs=1e-6)
    last = gauges["costwatch_last_reconciliation_timestamp_seconds"][()]
    assert abs(last - time.time()) < 60


def test_watch_reconciles_the_window_again_each_interval_without_duplicating_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = f"sqlite:///{tmp_path / 'cw.db'}"
    with FakeAnthropicServer(SPEC, usage_lag_s=3600) as fake:
        _instrumented(fake, db, 2)
        env = {
            **os.environ,
            "PYTHONPATH": str(Path(__file__).parents[1]),
            "ANTHROPIC_ADMIN_API_KEY": FAKE_ADMIN_KEY,
        }
        command = "import sys; from costwatch.cli import main; sys.exit(main())"
        argv = ["reconcile", "--since", "1h", "--watch", "1s", "--base-url", fake.base_url, "--db", db]
        process = subprocess.Popen(
            [sys.executable, "-c", command, *argv],
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
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
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "input coverage 100.0%" in lines[-1], lines
    assert FAKE_ADMIN_KEY not in "".join(lines)
    stored = _stored_reconciliations(db)
    # Reconciled many times, one row per bucket and model, with the settled figures.
    assert len({(row["bucket_start"], row["model"]) for row in stored}) == len(stored) >= 1
    assert sum(row["reported_requests"] for row in stored) == 2
