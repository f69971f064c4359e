"""The Prometheus metrics: what each record adds, when waste settles, label caps, health, end to end."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import anthropic
import pytest
from conftest import ManualClock, wasted_tokens
from conftest import sample_value as value
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

import costwatch
from costwatch.health import instrumentation_errors
from costwatch.metrics import (
    OTHER,
    LabelCap,
    MetricsSink,
    WasteSettlement,
    observe_all,
    start_metrics_server,
)
from costwatch.pipeline import Pipeline
from costwatch.records import WORKFLOW_LABEL_LENGTH, AttemptRecord, Cost, Outcome, Usage, WasteReason
from costwatch.sinks import MemorySink
from costwatch.spool import Spool
from costwatch.testing import FakeAnthropicServer, Fault

MODEL = "claude-sonnet-4-6"
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)


def attempt(
    attempt_id: str = "a1",
    *,
    request: str = "r1",
    number: int = 1,
    outcome: Outcome = Outcome.COMPLETED,
    usage: Usage | None = None,
    cost: Cost | None = None,
    waste: WasteReason | None = None,
    revision: int = 0,
    workflow: str | None = None,
    model: str | None = MODEL,
    **extra: Any,
) -> AttemptRecord:
    return AttemptRecord(
        attempt_id=attempt_id,
        logical_request_id=request,
        attempt_number=number,
        started_at=T0,
        outcome=outcome,
        model_requested=model or "",
        model=model,
        usage=usage or Usage(input_tokens=100, output_tokens=40),
        cost=cost if cost is not None else Cost(input_usd=0.3, output_usd=0.6),
        wasted=waste is not None,
        waste_reason=waste,
        revision=revision,
        tags=MappingProxyType({"workflow": workflow}) if workflow is not None else MappingProxyType({}),
        **extra,
    )


def dropped(attempt_id: str = "a1", **kw: Any) -> AttemptRecord:
    kw.setdefault(
        "usage", Usage(input_tokens=1000, output_tokens=30, output_estimated=True, estimated_output_tokens=30)
    )
    kw.setdefault("cost", Cost(input_usd=3.0, output_usd=0.45))
    kw.setdefault("waste", WasteReason.ABANDONED)
    kw.setdefault("error_type", "RemoteProtocolError")
    kw.setdefault("duration_s", 42.0)
    return attempt(attempt_id, outcome=Outcome.DROPPED, **kw)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(1000.0)


@pytest.fixture
def sink(registry: CollectorRegistry, clock: ManualClock) -> MetricsSink:
    return MetricsSink(
        registry=registry,
        pipeline=Pipeline(spool=None),
        retry_window_s=600.0,
        workflow_label_limit=3,
        clock=clock,
    )


wasted = functools.partial(wasted_tokens, model=MODEL)


# -- what one record adds --------------------------------------------------------------------------
def test_completed_attempt_counts_billed_tokens_cost_and_a_succeeded_request(sink, registry):
    sink.export(
        [
            attempt(
                usage=Usage(
                    input_tokens=100,
                    cache_read_tokens=7,
                    cache_write_5m_tokens=5,
                    cache_write_1h_tokens=6,
                    output_tokens=40,
                ),
                duration_s=3.0,
            )
        ]
    )

    assert value(registry, "costwatch_attempts_total", model=MODEL, outcome="completed", error_type="") == 1
    billed = {
        t: value(registry, "costwatch_billed_tokens_total", model=MODEL, token_type=t)
        for t in ("input", "output", "cache_read", "cache_write")
    }
    assert billed == {"input": 100, "output": 40, "cache_read": 7, "cache_write": 11}
    assert value(registry, "costwatch_billed_cost_usd_total", model=MODEL, workflow="") == pytest.approx(0.9)
    assert value(registry, "costwatch_logical_requests_total", model=MODEL, result="succeeded") == 1
    assert value(registry, "costwatch_attempts_per_request_count", model=MODEL) == 1
    assert value(registry, "costwatch_attempts_per_request_sum", model=MODEL) == 1
    assert value(registry, "costwatch_attempt_duration_seconds_sum", model=MODEL, outcome="completed") == 3.0
    assert (
        value(registry, "costwatch_wasted_cost_usd_total", model=MODEL, reason="abandoned", workflow="") == 0
    )


def test_dropped_attempt_bills_input_and_partial_output_at_once(sink, registry):
    sink.export([dropped()])

    assert (
        value(
            registry,
            "costwatch_attempts_total",
            model=MODEL,
            outcome="dropped",
            error_type="RemoteProtocolError",
        )
        == 1
    )
    assert value(registry, "costwatch_billed_tokens_total", model=MODEL, token_type="input") == 1000
    assert value(registry, "costwatch_billed_tokens_total", model=MODEL, token_type="output") == 30
    assert value(registry, "costwatch_estimated_output_tokens_total", model=MODEL) == 30
    assert value(registry, "costwatch_billed_cost_usd_total", model=MODEL, workflow="") == pytest.approx(3.45)
    assert value(registry, "costwatch_time_to_drop_seconds_sum", model=MODEL) == 42.0
    assert value(registry, "costwatch_time_to_drop_seconds_count", model=MODEL) == 1


def test_error_type_label_falls_back_to_the_api_error_type(sink, registry):
    sink.export(
        [
            attempt(
                outcome=Outcome.HTTP_ERROR, usage=Usage(), api_error_type="overloaded_error", http_status=529
            )
        ]
    )
    assert (
        value(
            registry,
            "costwatch_attempts_total",
            model=MODEL,
            outcome="http_error",
            error_type="overloaded_error",
        )
        == 1
    )


# -- when waste settles -----------------------------------------------------------------------------
def test_abandoned_waste_is_not_counted_until_the_retry_window_passes(sink, registry, clock):
    sink.export([dropped()])
    clock.now += 599
    sink.settle_due()
    assert wasted(registry, "abandoned") == 0
    assert value(registry, "costwatch_logical_requests_total", model=MODEL, result="failed") == 0

    clock.now += 2
    sink.settle_due()
    assert wasted(registry, "abandoned") == 1000
    assert wasted(registry, "abandoned", "output") == 30
    assert value(
        registry, "costwatch_wasted_cost_usd_total", model=MODEL, reason="abandoned", workflow=""
    ) == pytest.approx(3.45)
    assert value(registry, "costwatch_logical_requests_total", model=MODEL, result="failed") == 1
    assert wasted(registry, "retried") == 0


def test_cancelled_waste_is_counted_at_once_apart_from_retried_and_abandoned(sink, registry):
    cancelled = attempt(
        outcome=Outcome.CANCELLED,
        usage=Usage(input_tokens=1000, output_tokens=30, output_estimated=True, estimated_output_tokens=30),
        cost=Cost(input_usd=3.0, output_usd=0.45),
        waste=WasteReason.CANCELLED,
    )
    sink.export([cancelled])
    assert wasted(registry, "cancelled") == 1000
    assert wasted(registry, "cancelled", "output") == 30
    assert value(
        registry, "costwatch_wasted_cost_usd_total", model=MODEL, reason="cancelled", workflow=""
    ) == pytest.approx(3.45)
    sink.settle()
    assert wasted(registry, "abandoned") == 0 and wasted(registry, "retried") == 0
    assert wasted(registry, "cancelled") == 1000


def test_a_scrape_settles_abandoned_waste_whose_window_has_passed(sink, registry, clock):
    sink.export([dropped()])
    clock.now += 601
    # get_sample_value runs a scrape; the health collector settles before the counters are read.
    assert wasted(registry, "abandoned") == 1000


def test_retry_flips_waste_to_retried_and_abandoned_never_counts_it(sink, registry, clock):
    first = dropped()
    sink.export([first])
    clock.now += 5
    sink.export([first.with_waste(WasteReason.RETRIED)])
    assert wasted(registry, "retried") == 1000
    assert value(
        registry, "costwatch_wasted_cost_usd_total", model=MODEL, reason="retried", workflow=""
    ) == pytest.approx(3.45)

    clock.now += 60
    sink.export([attempt("a2", number=2)])
    clock.now += 10_000
    sink.settle()
    assert wasted(registry, "abandoned") == 0
    assert wasted(registry, "retried") == 1000
    assert value(registry, "costwatch_logical_requests_total", model=MODEL, result="succeeded") == 1
    assert value(registry, "costwatch_logical_requests_total", model=MODEL, result="failed") == 0
    assert value(registry, "costwatch_attempts_per_request_sum", model=MODEL) == 2
    # Billed counts both attempts, once each: the flip is a revision, not a new attempt.
    assert value(registry, "costwatch_billed_tokens_total", model=MODEL, token_type="input") == 1100
    assert (
        value(
            registry,
            "costwatch_attempts_total",
            model=MODEL,
            outcome="dropped",
            error_type="RemoteProtocolError",
        )
        == 1
    )


def test_shutdown_settles_pending_waste_as_abandoned_and_requests_as_failed(sink, registry):
    sink.export([dropped()])
    sink.shutdown()
    assert wasted(registry, "abandoned") == 1000
    assert value(registry, "costwatch_logical_requests_total", model=MODEL, result="failed") == 1


def test_redelivered_records_count_nothing_twice(sink, registry):
    batch = [dropped(), attempt("a2", number=2)]
    sink.export(batch)
    sink.export(batch)
    sink.export([batch[0].with_waste(WasteReason.RETRIED)] * 2)
    assert value(registry, "costwatch_billed_tokens_total", model=MODEL, token_type="input") == 1100
    assert value(registry, "costwatch_logical_requests_total", model=MODEL, result="succeeded") == 1
    assert wasted(registry, "retried") == 1000


def test_failed_attempt_billing_nothing_fails_its_request_after_the_window(sink, registry, clock):
    sink.export(
        [attempt(outcome=Outcome.CONNECT_ERROR, usage=Usage(), cost=Cost(), error_type="ConnectError")]
    )
    clock.now += 601
    sink.settle_due()
    assert value(registry, "costwatch_logical_requests_total", model=MODEL, result="failed") == 1
    assert wasted(registry, "abandoned") == 0


def test_a_retry_in_flight_keeps_its_request_open_past_the_first_window(clock):
    settlement = WasteSettlement(retry_window_s=600)
    first = dropped()
    settlement.observe([first], clock.now)
    clock.now += 500
    settlement.observe([first.with_waste(WasteReason.RETRIED)], clock.now)  # the retry started
    clock.now += 200
    assert settlement.settle_due(clock.now).requests == []
    done = settlement.observe([attempt("a2", number=2)], clock.now)
    assert [(r.last.attempt_id, r.succeeded) for r in done.requests] == [("a2", True)]


def test_an_earlier_attempt_ending_late_does_not_fail_a_settled_request(clock):
    settlement = WasteSettlement(retry_window_s=600)
    settlement.observe([attempt("a2", number=2)], clock.now)
    settlement.observe([dropped("a1", waste=WasteReason.RETRIED)], clock.now)
    assert settlement.settle_all().requests == []


def test_pending_waste_is_bounded_by_settling_the_oldest_early(clock):
    settlement = WasteSettlement(retry_window_s=600, max_pending=2)
    out = settlement.observe([dropped(f"a{i}", request=f"r{i}") for i in range(3)], clock.now)
    assert [(w.record.attempt_id, w.reason) for w in out.waste] == [("a0", WasteReason.ABANDONED)]
    assert settlement.pending_waste == 2


# -- label caps -------------------------------------------------------------------------------------
def test_workflow_label_keeps_the_first_values_and_reports_the_rest_as_other(sink, registry):
    sink.export([attempt(f"a{i}", request=f"r{i}", workflow=f"wf{i}") for i in range(5)])
    sink.export([attempt("b", request="rb", workflow="")])
    kept = [
        value(registry, "costwatch_billed_cost_usd_total", model=MODEL, workflow=f"wf{i}") for i in range(5)
    ]
    assert kept[:3] == [pytest.approx(0.9)] * 3 and kept[3:] == [0, 0]
    assert value(registry, "costwatch_billed_cost_usd_total", model=MODEL, workflow=OTHER) == pytest.approx(
        1.8
    )
    assert value(registry, "costwatch_billed_cost_usd_total", model=MODEL, workflow="") == pytest.approx(0.9)


def test_workflow_label_is_cut_like_the_store_rollups(sink, registry):
    assert WORKFLOW_LABEL_LENGTH == 64
    sink.export([attempt(workflow="w" * 100)])
    assert value(
        registry, "costwatch_billed_cost_usd_total", model=MODEL, workflow="w" * 64
    ) == pytest.approx(0.9)


def test_model_label_is_capped(registry, clock):
    capped = MetricsSink(
        registry=registry,
        pipeline=Pipeline(spool=None),
        retry_window_s=600.0,
        workflow_label_limit=3,
        model_label_limit=2,
        clock=clock,
    )
    capped.export([attempt(f"a{i}", request=f"r{i}", model=f"m{i}") for i in range(4)])
    assert value(registry, "costwatch_billed_tokens_total", model="m1", token_type="input") == 100
    assert value(registry, "costwatch_billed_tokens_total", model="m2", token_type="input") == 0
    assert value(registry, "costwatch_billed_tokens_total", model=OTHER, token_type="input") == 200


# -- health ------------------------------------------------------------------------------------------
def test_health_metrics_read_the_pipeline_and_the_instrumentation_error_count(registry, clock):
    class FakePipelineHealth:
        queue_depth = 7
        spooled_pending = 3
        write_errors = 2

    MetricsSink(
        registry=registry,
        pipeline=FakePipelineHealth(),
        retry_window_s=600.0,
        workflow_label_limit=3,
        clock=clock,
    )
    before = instrumentation_errors.total
    instrumentation_errors.record("test_metrics", RuntimeError("boom"))
    assert value(registry, "costwatch_store_queue_depth") == 7
    assert value(registry, "costwatch_store_spooled_records") == 3
    assert value(registry, "costwatch_store_write_errors_total") == 2
    assert value(registry, "costwatch_instrumentation_errors_total") == before + 1


def test_health_metrics_default_to_zero_for_a_pipeline_without_the_counters(registry, clock):
    MetricsSink(
        registry=registry, pipeline=object(), retry_window_s=600.0, workflow_label_limit=3, clock=clock
    )
    assert registry.get_sample_value("costwatch_store_spooled_records") == 0


# -- serving and multiprocess mode -------------------------------------------------------------------
def test_metrics_server_serves_the_registry_on_localhost(sink, registry):
    sink.export([attempt()])
    server = start_metrics_server(0, registry=registry)
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert f'costwatch_billed_tokens_total{{model="{MODEL}",token_type="input"}} 100.0' in text


def test_counters_and_histograms_work_in_multiprocess_mode(tmp_path: Path):
    # prometheus_client picks its value storage at import, so the writer runs in a fresh interpreter.
    script = textwrap.dedent(
        f"""
        from datetime import datetime, timezone
        from costwatch.metrics import MetricsSink
        from costwatch.records import AttemptRecord, Outcome, Usage, Cost, WasteReason
        from prometheus_client import CollectorRegistry, Histogram, generate_latest
        sink = MetricsSink(registry=CollectorRegistry(), pipeline=object(), retry_window_s=600.0,
                           workflow_label_limit=3)
        record = AttemptRecord(attempt_id="a", logical_request_id="r", attempt_number=1,
                               started_at=datetime.now(timezone.utc), outcome=Outcome.DROPPED,
                               model={MODEL!r}, usage=Usage(input_tokens=1000, output_tokens=30),
                               cost=Cost(input_usd=3.0), wasted=True, waste_reason=WasteReason.ABANDONED,
                               duration_s=2.0)
        sink.export([record])
        sink.shutdown()
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):  # two worker processes
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    assert value(registry, "costwatch_billed_tokens_total", model=MODEL, token_type="input") == 2000
    assert wasted(registry, "abandoned") == 2000
    assert value(registry, "costwatch_time_to_drop_seconds_count", model=MODEL) == 2
    assert registry.get_sample_value("costwatch_store_queue_depth") == 0


# -- end to end through the real SDK -----------------------------------------------------------------
def test_metrics_equal_the_server_ledger_through_the_sdk(registry, tmp_path):
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"))
    memory = MemorySink()
    metrics = MetricsSink(registry=registry, pipeline=pipeline, retry_window_s=600.0, workflow_label_limit=20)
    pipeline.add_sink(memory)
    pipeline.add_sink(metrics)
    with FakeAnthropicServer() as server:
        server.enqueue(Fault.cut_after_deltas(20), None, Fault.overloaded(), None, None)
        # The pipeline already has its sinks: no store, no process-wide metrics, no spans.
        costwatch.instrument(pipeline=pipeline, sinks=[], listeners=[])
        try:
            client = anthropic.Anthropic(base_url=server.base_url, api_key="test", max_retries=2)
            with costwatch.tags(workflow="nightly"):
                for _ in range(2):  # an application retry loop around a stream that drops once
                    try:
                        with client.messages.stream(
                            model=MODEL, max_tokens=4096, messages=[{"role": "user", "content": "hi"}]
                        ) as stream:
                            for _event in stream:
                                pass
                        break
                    except Exception:
                        continue
                # A 529 the SDK retries by itself, then a plain call.
                client.messages.create(
                    model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "x"}]
                )
                client.messages.create(
                    model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "y"}]
                )
            assert costwatch.flush(10)
        finally:
            costwatch.uninstrument()
        pipeline.shutdown(10)
    ledger = server.ledger.totals()
    records = memory.records
    assert len(records) == ledger.attempts == 5

    def billed(token_type: str) -> float:
        return value(registry, "costwatch_billed_tokens_total", model=MODEL, token_type=token_type)

    assert billed("input") == ledger.input_tokens
    # A dropped stream's output is estimated from the text that arrived; everything else is exact.
    estimated = value(registry, "costwatch_estimated_output_tokens_total", model=MODEL)
    dropped_entry = next(e for e in server.ledger.entries if e.ending.value == "cut")
    dropped_record = next(r for r in records if r.outcome is Outcome.DROPPED)
    assert estimated == dropped_record.usage.estimated_output_tokens > 0
    assert billed("output") - estimated == ledger.output_tokens - dropped_entry.output_tokens
    assert billed("output") == sum(r.usage.output_tokens for r in records)
    assert billed("cache_read") == ledger.cache_read_tokens
    assert billed("cache_write") == ledger.cache_write_5m_tokens + ledger.cache_write_1h_tokens
    assert value(
        registry, "costwatch_billed_cost_usd_total", model=MODEL, workflow="nightly"
    ) == pytest.approx(sum(r.cost.total_usd for r in records if r.cost is not None))
    assert wasted(registry, "retried", "input", "nightly") == dropped_entry.input_tokens
    assert wasted(registry, "retried", "output", "nightly") == dropped_record.usage.output_tokens
    assert value(
        registry, "costwatch_wasted_cost_usd_total", model=MODEL, reason="retried", workflow="nightly"
    ) == pytest.approx(sum(r.wasted_cost_usd for r in records))
    assert wasted(registry, "abandoned", "input", "nightly") == 0
    assert value(registry, "costwatch_logical_requests_total", model=MODEL, result="succeeded") == 3
    assert value(registry, "costwatch_logical_requests_total", model=MODEL, result="failed") == 0
    assert value(registry, "costwatch_attempts_per_request_sum", model=MODEL) == 5
    assert value(registry, "costwatch_attempts_total", model=MODEL, outcome="completed", error_type="") == 3
    assert json.dumps(sorted(r.outcome.value for r in records)) == json.dumps(
        ["completed", "completed", "completed", "dropped", "http_error"]
    )


# -- defaults from the settings ---------------------------------------------------------------------
def test_retry_window_and_model_label_limit_default_to_their_settings(monkeypatch):
    monkeypatch.setenv("COSTWATCH_RETRY_WINDOW", "42")
    monkeypatch.setenv("COSTWATCH_MODEL_LABEL_LIMIT", "1")
    assert WasteSettlement().retry_window_s == 42
    registry = CollectorRegistry()
    sink = MetricsSink(registry=registry, pipeline=object(), workflow_label_limit=20)
    sink.export([attempt("a"), attempt("b", request="rb", model="claude-haiku-4-5")])
    assert value(registry, "costwatch_billed_tokens_total", model=OTHER, token_type="input") == 100


def test_a_label_cap_seeded_with_values_in_first_seen_order_keeps_the_first_ones():
    cap = LabelCap.first_seen(["", "a", "b", "c"], limit=2)
    assert [cap(v) for v in ("a", "b", "c", "")] == ["a", "b", OTHER, ""]


def test_observing_values_at_once_shows_what_observing_them_one_at_a_time_shows():
    values = [0.1, 0.2, 0.30000000000000004, 1, 2.5, 2.5000000000000004, -3.0, 1e-17, 7.77, 41.7, 3600.0]
    values += [float("inf"), float("-inf"), 1e300, 0.0, 12.35, float("nan"), 0.7]

    def exposition(observe: Any) -> str:
        registry = CollectorRegistry()
        histogram = Histogram("h", "h", ["k"], registry=registry, buckets=(0.1, 0.25, 1.0, 2.5, 60.0))
        for chunk in (values[:3], values[3:11], [], values[11:]):  # a child that already holds a sum
            observe(histogram.labels("a"), chunk)
        text = generate_latest(registry).decode()
        return "\n".join(line for line in text.splitlines() if not line.startswith("h_created"))

    one_at_a_time = exposition(lambda child, chunk: [child.observe(v) for v in chunk])
    assert "h_sum" in one_at_a_time and 'h_bucket{k="a",le="+Inf"} 17.0' in one_at_a_time
    assert exposition(observe_all) == one_at_a_time


def test_observing_at_once_falls_back_to_observe_on_a_histogram_without_prometheus_clients_insides():
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, value: float) -> None:
            self.seen.append(value)

    plain = Plain()
    observe_all(plain, [3.0, 1.0, 2.0])
    assert plain.seen == [3.0, 1.0, 2.0]
