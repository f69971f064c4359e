"""A given-up request reads the same in the report and the fleet exporter: pending, then abandoned."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from conftest import sample_value
from prometheus_client import CollectorRegistry

from costwatch.cli import main
from costwatch.exporter import FleetCollector
from costwatch.records import AttemptRecord, Cost, Outcome, Usage, WasteReason
from costwatch.store import SqlStore

WINDOW = timedelta(minutes=10)
MODEL = "claude-sonnet-5-5"


def given_up(started_at: datetime) -> AttemptRecord:
    return AttemptRecord(
        attempt_id="gave-up",
        logical_request_id="req",
        attempt_number=1,
        started_at=started_at,
        outcome=Outcome.DROPPED,
        model_requested=MODEL,
        model=MODEL,
        error_type="RemoteProtocolError",
        usage=Usage(input_tokens=1000, output_tokens=20),
        cost=Cost(input_usd=0.4, output_usd=0.1),
        wasted=True,
        waste_reason=WasteReason.ABANDONED,
    )


def report(capsys, url: str) -> dict:
    assert main(["report", "--format", "json", "--db", url]) == 0
    return json.loads(capsys.readouterr().out)


def exporter(url: str, now: datetime) -> tuple[FleetCollector, CollectorRegistry]:
    registry = CollectorRegistry()
    collector = FleetCollector(url, retry_window=WINDOW, clock=lambda: now)
    registry.register(collector)
    return collector, registry


def test_a_request_given_up_just_now_is_pending_in_both_the_report_and_the_exporter(
    capsys, tmp_path, monkeypatch
):
    monkeypatch.setenv("COSTWATCH_RETRY_WINDOW", str(WINDOW.total_seconds()))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    now = datetime.now(timezone.utc)
    store = SqlStore(url)
    try:
        store.write([given_up(now)])
    finally:
        store.shutdown()
    seen = report(capsys, url)
    assert (seen["pending_abandoned_attempts"], seen["pending_abandoned_cost_usd"]) == (1, 0.5)
    collector, registry = exporter(url, now)
    try:
        assert sample_value(registry, "costwatch_pending_abandoned_attempts", model=MODEL) == 1
        assert sample_value(registry, "costwatch_pending_abandoned_cost_usd", model=MODEL) == 0.5
        assert (
            sample_value(
                registry, "costwatch_wasted_cost_usd_total", model=MODEL, reason="abandoned", workflow=""
            )
            == 0
        )
    finally:
        collector.close()


def test_once_its_hour_settles_both_count_the_given_up_request_as_abandoned_and_nothing_pending(
    capsys, tmp_path, monkeypatch
):
    monkeypatch.setenv("COSTWATCH_RETRY_WINDOW", str(WINDOW.total_seconds()))
    url = f"sqlite:///{tmp_path / 'store.db'}"
    now = datetime.now(timezone.utc)
    store = SqlStore(url)
    try:
        store.write([given_up(now - timedelta(hours=3))])
    finally:
        store.shutdown()
    seen = report(capsys, url)
    assert seen["pending_abandoned_attempts"] == 0
    assert seen["wasted_cost_usd_by_reason"]["abandoned"] == 0.5
    collector, registry = exporter(url, now)
    try:
        assert sample_value(registry, "costwatch_pending_abandoned_attempts", model=MODEL) == 0
        assert (
            sample_value(
                registry, "costwatch_wasted_cost_usd_total", model=MODEL, reason="abandoned", workflow=""
            )
            == 0.5
        )
    finally:
        collector.close()
