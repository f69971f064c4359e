"""The metrics a mixed run of batches shows, to the last digit, in every mode the sink runs in.

The sink counts a batch at once (a counter series incremented by its batch's sum, a histogram
child's observations applied together), and what a scrape or an OTLP export shows must not move by
one ulp for it. The expected files in ``tests/exposition/`` (a scrape's text, the OTLP points) were
written by the sink that observed every histogram value one at a time (main d36ac39): every series,
value and label of a run with first-attempt successes, retries, a drop, a cancel, estimate
revisions, redelivered records, a capped model and workflow, an unpriced model and another
platform. ``COSTWATCH_WRITE_EXPOSITION=1`` rewrites them, for a deliberate change of what is shown only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from conftest import ManualClock
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from costwatch import metric_names as m
from costwatch.metrics import MetricsSink
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, Cost, Outcome, Usage, WasteReason

EXPECTED = Path(__file__).resolve().parent / "exposition"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
T0 = datetime(2025, 6, 1, 9, 0, tzinfo=timezone.utc)
SONNET, OPUS, HAIKU, UNKNOWN = "claude-sonnet-4-5", "claude-opus-4-6", "claude-haiku-4-5", "claude-future-9"
SMALL_COST = Cost(input_usd=0.0003, output_usd=0.00015)
HEALTH = {
    metric.name
    for metric in (
        m.STORE_QUEUE_DEPTH,
        m.STORE_SPOOLED_RECORDS,
        m.STORE_WRITE_ERRORS,
        m.INSTRUMENTATION_ERRORS,
        m.STORE_REJECTED_RECORDS,
    )
}


def record(
    attempt_id: str,
    request: str,
    *,
    number: int = 1,
    outcome: Outcome = Outcome.COMPLETED,
    model: str = SONNET,
    duration: float = 0.3,
    usage: Usage | None = None,
    cost: Cost | None = SMALL_COST,
    waste: WasteReason | None = None,
    workflow: str | None = None,
    **extra: Any,
) -> AttemptRecord:
    return AttemptRecord(
        attempt_id=attempt_id,
        logical_request_id=request,
        attempt_number=number,
        started_at=T0 + timedelta(seconds=number),
        outcome=outcome,
        model_requested=model,
        model=model,
        duration_s=duration,
        usage=usage or Usage(input_tokens=100, output_tokens=10),
        cost=cost,
        wasted=waste is not None,
        waste_reason=waste,
        tags=MappingProxyType({"workflow": workflow}) if workflow else MappingProxyType({}),
        **extra,
    )


def estimated(output: int) -> Usage:
    return Usage(
        input_tokens=1500, output_tokens=output, output_estimated=True, estimated_output_tokens=output
    )


def batches() -> list[list[AttemptRecord]]:
    """Three batches and what a run makes of them: see the module's docstring."""
    drop = record(
        "drop-1",
        "r-drop",
        outcome=Outcome.DROPPED,
        duration=41.7,
        usage=estimated(30),
        cost=Cost(input_usd=0.0045, output_usd=0.00045),
        waste=WasteReason.ABANDONED,
        error_type="RemoteProtocolError",
        prompt_bytes=60_000,
        stable_prefix_bytes=50_000,
        workflow="summarise",
    )
    overloaded = record(
        "err-1",
        "r-err",
        outcome=Outcome.HTTP_ERROR,
        duration=0.1,
        usage=Usage(),
        cost=Cost(),
        api_error_type="overloaded_error",
        http_status=529,
    )
    cut = record(
        "cut-1",
        "r-cut",
        outcome=Outcome.DROPPED,
        model=OPUS,
        duration=12.35,
        usage=estimated(200),
        cost=Cost(input_usd=0.0075, output_usd=0.005),
        waste=WasteReason.ABANDONED,
        error_type="ReadTimeout",
    )
    first = [
        *(
            record(f"ok-{i}", f"r-ok-{i}", duration=duration, workflow=workflow)
            for i, (duration, workflow) in enumerate(
                [(0.1, None), (0.2, "triage"), (0.30000000000000004, "triage"), (0.7, None), (2.5, "a")]
            )
        ),
        record(
            "opus-1",
            "r-opus-1",
            model=OPUS,
            duration=3.3,
            usage=Usage(input_tokens=20, cache_read_tokens=4000, cache_write_5m_tokens=300, output_tokens=90),
            cost=Cost(input_usd=0.0001, cache_read_usd=0.002, cache_write_usd=0.001875, output_usd=0.00225),
            workflow="b",
        ),
        record("bedrock-1", "r-bedrock-1", duration=0.45, platform="bedrock", workflow="c"),
        record("unknown-1", "r-unknown-1", model=UNKNOWN, duration=1.1, cost=None, workflow="d"),
        drop,
        overloaded,
        cut,
        record(
            "cancel-1",
            "r-cancel",
            outcome=Outcome.CANCELLED,
            duration=0.9,
            usage=estimated(12),
            cost=Cost(input_usd=0.0045, output_usd=0.00018),
            waste=WasteReason.CANCELLED,
        ),
    ]
    second = [
        # The drop's retry, and the drop flipped to retried; the overload's retry failing again.
        record(
            "drop-2",
            "r-drop",
            number=2,
            duration=5.0,
            usage=Usage(input_tokens=1500, output_tokens=300),
            cost=Cost(input_usd=0.0045, output_usd=0.0045),
            prompt_bytes=60_000,
            stable_prefix_bytes=50_000,
            workflow="summarise",
        ),
        drop.with_waste(WasteReason.RETRIED),
        record(
            "err-2",
            "r-err",
            number=2,
            outcome=Outcome.HTTP_ERROR,
            duration=0.25,
            usage=Usage(),
            cost=Cost(),
            api_error_type="overloaded_error",
        ),
        # The cut's estimate revised (a correction while its waste is still pending).
        _revised(cut, 180, 0.0045),
        # Redelivered: counts nothing twice.
        first[0],
        first[5],
        record("ok-5", "r-ok-5", duration=0.15000000000000002),
        record("haiku-1", "r-haiku-1", model=HAIKU, duration=0.05),
    ]
    third = [
        record("err-3", "r-err", number=3, duration=1.0000000000000002),
        *(record(f"more-{i}", f"r-more-{i}", duration=0.1 * (i + 1), workflow="triage") for i in range(7)),
        record("opus-2", "r-opus-2", model=OPUS, duration=7.77),
        _revised(first[-1], 15, 0.000225),  # the cancel's estimate revised after its waste was counted
    ]
    return [first, second, third]


def _revised(old: AttemptRecord, output: int, output_usd: float) -> AttemptRecord:
    assert old.cost is not None
    return AttemptRecord.from_dict(
        {
            **old.to_dict(),
            "revision": old.revision + 1,
            "usage": {**old.to_dict()["usage"], "output_tokens": output, "estimated_output_tokens": output},
            "cost": {**old.to_dict()["cost"], "output_usd": output_usd},
        }
    )


def run(sink: MetricsSink, clock: ManualClock) -> None:
    """Export the batches a few seconds apart, let one retry window pass, then shut down."""
    for batch in batches():
        sink.export(batch)
        clock.now += 2.5
    clock.now += 601.0
    sink.settle_due()
    sink.export([record("late-1", "r-late", duration=0.6)])
    sink.shutdown()


def new_sink(registry: CollectorRegistry, clock: ManualClock, otlp: Any = None) -> MetricsSink:
    return MetricsSink(
        registry=registry,
        pipeline=object(),
        retry_window_s=600.0,
        workflow_label_limit=4,
        model_label_limit=3,
        clock=clock,
        prices=load_prices(),
        otlp=otlp,
    )


def exposition(registry: CollectorRegistry) -> str:
    """The scrape's text without the wall-clock ``_created`` samples and costwatch's health."""
    kept = []
    for line in generate_latest(registry).decode().splitlines(keepends=True):
        name = line.split()[2] if line.startswith("#") else line.split("{")[0].split()[0]
        if not name.endswith("_created") and not name.startswith(tuple(HEALTH)):
            kept.append(line)
    return "".join(kept)


def check(name: str, text: str) -> None:
    path = EXPECTED / name
    if os.environ.get("COSTWATCH_WRITE_EXPOSITION") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")


def test_a_scrape_shows_exactly_the_series_and_values_counted_one_at_a_time():
    registry = CollectorRegistry()
    run(new_sink(registry, ManualClock(5000.0)), ManualClock(5000.0))
    check("single_process.txt", exposition(registry))


def test_multiprocess_files_hold_exactly_the_series_and_values_of_one_process(tmp_path):
    # prometheus_client picks its value storage at import, so the run goes in a fresh interpreter.
    script = (
        "import sys; sys.path[:0] = [sys.argv[1]]\n"
        "from prometheus_client import CollectorRegistry\n"
        "import test_metrics_exposition as t\n"
        "clock = t.ManualClock(5000.0); t.run(t.new_sink(CollectorRegistry(), clock), clock)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([*filter(None, [env.get("PYTHONPATH")]), str(ROOT)])
    subprocess.run([sys.executable, "-c", script, str(HERE)], env=env, check=True, timeout=120)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    # The same lines as in one process; the multiprocess collector orders the families otherwise.
    expected = (EXPECTED / "single_process.txt").read_text(encoding="utf-8")
    assert sorted(exposition(registry).splitlines()) == sorted(expected.splitlines())


def test_otlp_points_are_exactly_the_ones_recorded_one_at_a_time():
    pytest.importorskip("opentelemetry.sdk.metrics", reason="needs the otlp extra")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from costwatch.otlp import OtlpMetrics

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    registry = CollectorRegistry()
    clock = ManualClock(5000.0)
    try:
        run(new_sink(registry, clock, OtlpMetrics(meter_provider=provider)), clock)
        data = reader.get_metrics_data()
    finally:
        provider.shutdown()
    lines = []
    for metric in (x for rm in data.resource_metrics for sm in rm.scope_metrics for x in sm.metrics):
        if metric.name in HEALTH:
            continue
        for point in metric.data.data_points:
            labels = ",".join(f"{k}={v}" for k, v in sorted(point.attributes.items()))
            if hasattr(point, "bucket_counts"):
                shown = (
                    f"count={point.count} sum={point.sum!r} min={point.min!r} max={point.max!r} "
                    f"buckets={list(point.bucket_counts)}"
                )
            else:
                shown = repr(point.value)
            lines.append(f"{metric.name}{{{labels}}} {shown}\n")
    check("otlp.txt", "".join(sorted(lines)))
    # The tee's Prometheus side is the plain sink's.
    assert exposition(registry) == (EXPECTED / "single_process.txt").read_text(encoding="utf-8")
