"""costwatch's metrics over OTLP: the same names, units, labels and caps as the Prometheus metrics,
counters that never go backwards, and a real program exporting them over OTLP/HTTP.

No OpenTelemetry Collector can be installed from the registries here (Debian and PyPI have none), so
the end-to-end test runs an in-process OTLP/HTTP receiver that decodes the real protobuf
(``opentelemetry-proto``'s ``ExportMetricsServiceRequest``) as a collector would.
"""

from __future__ import annotations

import dataclasses
import http.server
import itertools
import os
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import completed_attempt
from prometheus_client import CollectorRegistry

from costwatch.metrics import ATTEMPTS_PER_REQUEST_BUCKETS, DURATION_BUCKETS, MetricsSink
from costwatch.pipeline import Pipeline
from costwatch.testing import FakeAnthropicServer, Fault

pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="needs the otlp extra")
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader

from costwatch.otlp import OtlpMetrics, unit_of

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture
def teed() -> Iterator[tuple[MetricsSink, CollectorRegistry, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    registry = CollectorRegistry()
    pipeline = Pipeline()
    sink = MetricsSink(
        registry=registry,
        pipeline=pipeline,
        model_label_limit=1,
        otlp=OtlpMetrics(meter_provider=provider),
    )
    try:
        yield sink, registry, reader
    finally:
        pipeline.shutdown()
        provider.shutdown()


def otel_metrics(reader: InMemoryMetricReader) -> dict[str, object]:
    data = reader.get_metrics_data()
    return {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def test_otlp_metrics_have_the_prometheus_names_units_and_capped_labels(teed):
    sink, registry, reader = teed
    other_model = dataclasses.replace(completed_attempt(2), model="claude-haiku-4-5")
    sink.export([completed_attempt(1), other_model])
    sink.settle()
    metrics = otel_metrics(reader)
    # OpenTelemetry exports an instrument once it has a data point, as Prometheus shows a series.
    prometheus_names = {family.name for family in registry.collect() if family.samples}
    assert set(metrics) == prometheus_names
    for name, metric in metrics.items():
        assert metric.unit == unit_of(name)
    assert unit_of("costwatch_billed_cost_usd") == "USD"
    assert unit_of("costwatch_attempt_duration_seconds") == "s"
    assert unit_of("costwatch_billed_tokens") == "{token}"
    # The same series with the same values, the second model capped to "other" in both.
    billed = metrics["costwatch_billed_tokens"].data
    assert billed.is_monotonic
    assert billed.aggregation_temporality is AggregationTemporality.CUMULATIVE
    otel_values = {(p.attributes["model"], p.attributes["token_type"]): p.value for p in billed.data_points}
    for (model, token_type), value in otel_values.items():
        labels = {"model": model, "token_type": token_type}
        assert registry.get_sample_value("costwatch_billed_tokens_total", labels) == value
    assert otel_values[("claude-sonnet-4-5", "input")] == 100
    assert otel_values[("other", "input")] == 100
    duration = metrics["costwatch_attempt_duration_seconds"].data.data_points[0]
    assert tuple(duration.explicit_bounds) == DURATION_BUCKETS
    per_request = metrics["costwatch_attempts_per_request"].data.data_points[0]
    assert tuple(per_request.explicit_bounds) == ATTEMPTS_PER_REQUEST_BUCKETS


def test_otlp_health_metrics_read_the_same_families_as_the_prometheus_collector(teed):
    _, registry, reader = teed
    metrics = otel_metrics(reader)
    assert metrics["costwatch_store_queue_depth"].data.data_points[0].value == registry.get_sample_value(
        "costwatch_store_queue_depth"
    )
    errors = metrics["costwatch_instrumentation_errors"].data
    assert errors.is_monotonic
    assert errors.data_points[0].value == registry.get_sample_value("costwatch_instrumentation_errors_total")


def test_otlp_counters_never_go_backwards_across_exports(teed):
    sink, _, reader = teed
    seen: dict[tuple[str, tuple], float] = {}
    for n in range(1, 6):
        sink.export([completed_attempt(n)])
        for name, metric in otel_metrics(reader).items():
            if not getattr(metric.data, "is_monotonic", False):
                continue
            for point in metric.data.data_points:
                key = (name, tuple(sorted(point.attributes.items())))
                assert point.value >= seen.get(key, 0), key
                seen[key] = point.value
    assert (
        seen[
            (
                "costwatch_attempts",
                (("error_type", ""), ("model", "claude-sonnet-4-5"), ("outcome", "completed")),
            )
        ]
        == 5
    )


# -- a real program, a real OTLP/HTTP receiver ---------------------------------------------------------
class OtlpReceiver:
    """An OTLP/HTTP metrics endpoint on loopback that keeps every decoded export request."""

    def __init__(self) -> None:
        self.requests: list[ExportMetricsServiceRequest] = []
        self.content_types: set[str] = set()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportMetricsServiceRequest()
                request.ParseFromString(body)
                receiver.content_types.add(self.headers["Content-Type"])
                if self.path == "/v1/metrics":
                    receiver.requests.append(request)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def sums(self) -> list[dict[tuple[str, tuple], float]]:
        """Per export request: every sum data point's value by (metric name, attributes)."""
        exports = []
        for request in self.requests:
            values: dict[tuple[str, tuple], float] = {}
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        if metric.WhichOneof("data") != "sum":
                            continue
                        assert metric.sum.is_monotonic, metric.name
                        for point in metric.sum.data_points:
                            attrs = tuple(sorted((a.key, a.value.string_value) for a in point.attributes))
                            value = point.as_double if point.HasField("as_double") else point.as_int
                            values[(metric.name, attrs)] = value
            exports.append(values)
        return exports


APP = """
import sys

import anthropic

client = anthropic.Anthropic(base_url=sys.argv[1], api_key="sk-ant-test-key", max_retries=0)
messages = [{"role": "user", "content": "hello"}]
for _ in range(3):
    try:
        with client.messages.stream(model="claude-sonnet-5-5", max_tokens=256, messages=messages) as s:
            s.get_final_message()
    except Exception as exc:
        print("dropped:", type(exc).__name__)
"""


def run_app(tmp_path: Path, server: FakeAnthropicServer, **extra: str):
    import subprocess

    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(APP))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.update(
        COSTWATCH_DATABASE_URL=f"sqlite:///{tmp_path / 'app.db'}",
        COSTWATCH_SPOOL_DIR=str(tmp_path / "spool"),
        COSTWATCH_METRICS_EXPORTER="otlp",
        OTEL_METRIC_EXPORT_INTERVAL="100",
        OTEL_SERVICE_NAME="otlp-test-app",
        **extra,
    )
    return subprocess.run(
        [str(BIN / "costwatch"), "run", "--", sys.executable, str(app), server.base_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_program_sends_its_metrics_over_otlp_http_and_they_match_the_api_ledger(tmp_path):
    with FakeAnthropicServer() as server, OtlpReceiver() as receiver:
        server.enqueue(None, Fault.cut_after_deltas(3), None)
        result = run_app(tmp_path, server, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        entries = server.ledger.entries
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("dropped: ") == 1
    assert receiver.requests, "no OTLP export arrived"
    assert receiver.content_types == {"application/x-protobuf"}
    resource = receiver.requests[-1].resource_metrics[0].resource
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "otlp-test-app"
    exports = receiver.sums()
    # Cumulative counters: no series ever reads less than it did in an earlier export.
    for earlier, later in itertools.pairwise(exports):
        for key, value in earlier.items():
            assert later.get(key, value) >= value, key
    last = exports[-1]
    model = entries[0].model
    input_key = ("costwatch_billed_tokens", (("model", model), ("token_type", "input")))
    assert last[input_key] == sum(entry.input_tokens for entry in entries)
    outcomes = {key[1]: value for key, value in last.items() if key[0] == "costwatch_attempts"}
    assert outcomes[(("error_type", "RemoteProtocolError"), ("model", model), ("outcome", "dropped"))] == 1
    assert outcomes[(("error_type", ""), ("model", model), ("outcome", "completed"))] == 2
    # The waste the exit settled (the dropped attempt, never retried) was exported before exit.
    wasted = [
        v for k, v in last.items() if k[0] == "costwatch_wasted_tokens" and ("token_type", "input") in k[1]
    ]
    assert sum(wasted) == entries[1].input_tokens


def test_an_otlp_protocol_costwatch_cannot_send_is_one_line_and_the_program_still_runs(tmp_path):
    with FakeAnthropicServer() as server:
        result = run_app(tmp_path, server, OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    assert result.returncode == 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "COSTWATCH_METRICS_EXPORTER=otlp" in lines[0] and "http/protobuf" in lines[0]
