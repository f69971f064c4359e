"""The attempt spans: names, parents, GenAI attributes, error status and links between retries."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

import anthropic
import pytest
import sqlalchemy as sa
from conftest import read_stream_through_a_cut
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import costwatch
from costwatch import semconv
from costwatch.estimation import OutputEstimator
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, AttemptStart, Cost, Outcome, OutputSource, Usage, WasteReason
from costwatch.sinks import MemorySink
from costwatch.spans import SpanListener, attempt_attributes
from costwatch.spool import Spool
from costwatch.store import SqlStore
from costwatch.store.rows import record_from_row
from costwatch.store.schema import ATTEMPTS
from costwatch.testing import BlockKind, BlockSpec, FakeAnthropicServer, Fault, ResponseSpec

MODEL = "claude-sonnet-4-6"
HAIKU = "claude-haiku-4-5"
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
SDK_2 = int(anthropic.__version__.split(".")[0]) >= 1


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield tracer_provider
    tracer_provider.shutdown()


def start(attempt_id: str = "a1", number: int = 1, request: str = "r1") -> AttemptStart:
    return AttemptStart(
        attempt_id=attempt_id,
        logical_request_id=request,
        attempt_number=number,
        started_at=T0,
        model_requested=MODEL,
    )


def finished(attempt_id: str = "a1", number: int = 1, request: str = "r1", **kw: Any) -> AttemptRecord:
    fields: dict[str, Any] = dict(
        attempt_id=attempt_id,
        logical_request_id=request,
        attempt_number=number,
        started_at=T0,
        outcome=Outcome.COMPLETED,
        model_requested=MODEL,
        model=MODEL,
        message_id="msg_1",
        stop_reason="end_turn",
        usage=Usage(
            input_tokens=100,
            cache_read_tokens=20,
            cache_write_5m_tokens=3,
            cache_write_1h_tokens=4,
            output_tokens=50,
        ),
        cost=Cost(input_usd=0.25, output_usd=0.5),
        duration_s=2.5,
        stream=True,
        time_to_first_token_s=0.4,
        tags=MappingProxyType({}),
    )
    fields.update(kw)
    return AttemptRecord(**fields)


def dropped(attempt_id: str = "a1", number: int = 1, **kw: Any) -> AttemptRecord:
    return finished(
        attempt_id,
        number,
        outcome=Outcome.DROPPED,
        stop_reason=None,
        error_type="RemoteProtocolError",
        usage=Usage(input_tokens=900, output_tokens=12, output_estimated=True, estimated_output_tokens=12),
        cost=Cost(input_usd=2.7, output_usd=0.18),
        wasted=True,
        waste_reason=WasteReason.ABANDONED,
        **kw,
    )


def run(listener: SpanListener, start_: AttemptStart, record: AttemptRecord) -> None:
    listener.attempt_finished(listener.attempt_started(start_), record)


def only(spans: Any) -> ReadableSpan:
    assert len(spans) == 1
    span: ReadableSpan = spans[0]
    return span


# -- one attempt --------------------------------------------------------------------------------------
def test_completed_attempt_span_has_exactly_the_genai_and_costwatch_attributes(provider, exporter):
    run(SpanListener(provider, environ={}), start(), finished())
    span = only(exporter.get_finished_spans())
    assert span.name == f"chat {MODEL}"
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": MODEL,
        "gen_ai.response.model": MODEL,
        "gen_ai.response.id": "msg_1",
        "gen_ai.response.finish_reasons": ("end_turn",),
        "gen_ai.usage.input_tokens": 127,  # Anthropic input + cache reads + cache writes
        "gen_ai.usage.output_tokens": 50,
        "gen_ai.usage.cache_read.input_tokens": 20,
        "gen_ai.usage.cache_creation.input_tokens": 7,
        "costwatch.attempt.number": 1,
        "costwatch.logical_request.id": "r1",
        "costwatch.attempt.outcome": "completed",
        "costwatch.wasted.tokens": 0,
        "costwatch.usage.output_estimated": False,
        "costwatch.usage.output_source": "reported",
        "costwatch.cost.usd": 0.75,
        "costwatch.cost.priced": True,
    }


def test_span_runs_from_the_attempt_start_for_its_duration(provider, exporter):
    run(SpanListener(provider, environ={}), start(), finished(duration_s=2.5))
    span = only(exporter.get_finished_spans())
    assert span.start_time == int(T0.timestamp() * 1e9)
    assert (
        span.end_time is not None
        and span.end_time - span.start_time == int(timedelta(seconds=2.5) / timedelta(microseconds=1)) * 1000
    )


def test_dropped_attempt_span_has_error_status_error_type_and_its_waste(provider, exporter):
    run(SpanListener(provider, environ={}), start(), dropped())
    span = only(exporter.get_finished_spans())
    attributes = dict(span.attributes or {})
    assert span.status.status_code is StatusCode.ERROR
    assert attributes["error.type"] == "RemoteProtocolError"
    assert attributes["costwatch.attempt.outcome"] == "dropped"
    assert attributes["costwatch.wasted.tokens"] == 912
    assert attributes["costwatch.waste.reason"] == "abandoned"
    assert attributes["costwatch.usage.output_estimated"] is True
    assert attributes["costwatch.usage.output_source"] == "estimated"
    assert attributes["costwatch.cost.usd"] == pytest.approx(2.88)
    assert "gen_ai.response.finish_reasons" not in attributes


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"api_error_type": "overloaded_error", "http_status": 529}, "overloaded_error"),
        ({"http_status": 500}, "500"),
        ({}, "cancelled"),
    ],
)
def test_error_type_falls_back_to_the_api_error_then_the_status_then_the_outcome(
    provider, exporter, fields, expected
):
    outcome = Outcome.CANCELLED if not fields else Outcome.HTTP_ERROR
    run(SpanListener(provider, environ={}), start(), finished(outcome=outcome, error_type=None, **fields))
    assert dict(only(exporter.get_finished_spans()).attributes or {})["error.type"] == expected


def test_latest_experimental_opt_in_switches_the_changed_names(provider, exporter):
    listener = SpanListener(
        provider, environ={"OTEL_SEMCONV_STABILITY_OPT_IN": "http, gen_ai_latest_experimental"}
    )
    run(listener, start(), finished())
    attributes = dict(only(exporter.get_finished_spans()).attributes or {})
    assert attributes["gen_ai.usage.cache_write.input_tokens"] == 7
    assert "gen_ai.usage.cache_creation.input_tokens" not in attributes
    assert attributes["gen_ai.request.stream"] is True
    assert attributes["gen_ai.response.time_to_first_chunk"] == 0.4
    assert attributes["gen_ai.provider.name"] == "anthropic"


def test_default_names_are_those_of_semconv_1_41():
    assert semconv.gen_ai_names({}) is semconv.V1_41
    assert (
        semconv.gen_ai_names({"OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental"})
        is semconv.LATEST
    )
    assert "gen_ai.request.stream" not in attempt_attributes(finished())


# -- retries ---------------------------------------------------------------------------------------
def test_retry_span_links_to_every_earlier_attempt_of_its_logical_request(provider, exporter):
    listener = SpanListener(provider, environ={})
    run(listener, start("a1", 1), dropped("a1", 1))
    run(listener, start("a2", 2), dropped("a2", 2))
    run(listener, start("x", 1, request="other"), finished("x", 1, request="other"))
    run(listener, start("a3", 3), finished("a3", 3))
    spans = {s.context.span_id: s for s in exporter.get_finished_spans()}
    by_attempt = {
        (
            dict(s.attributes or {})["costwatch.logical_request.id"],
            dict(s.attributes or {})["costwatch.attempt.number"],
        ): s
        for s in spans.values()
    }
    first, second, third = by_attempt[("r1", 1)], by_attempt[("r1", 2)], by_attempt[("r1", 3)]
    assert [link.context.span_id for link in first.links] == []
    assert [link.context.span_id for link in second.links] == [first.context.span_id]
    assert [link.context.span_id for link in third.links] == [first.context.span_id, second.context.span_id]
    assert list(by_attempt[("other", 1)].links) == []


def test_remembered_logical_requests_are_bounded(provider, exporter):
    listener = SpanListener(provider, environ={}, max_requests=1)
    run(listener, start("a1", 1, request="r1"), dropped("a1", 1))
    run(listener, start("b1", 1, request="r2"), dropped("b1", 1, request="r2"))
    run(listener, start("a2", 2, request="r1"), finished("a2", 2))
    retry = next(
        s
        for s in exporter.get_finished_spans()
        if s.name and dict(s.attributes or {})["costwatch.attempt.number"] == 2
    )
    assert list(retry.links) == []


# -- end to end through the real SDK ----------------------------------------------------------------
SECRET = "the-prompt-text-must-never-appear"


def test_attempt_spans_nest_under_the_current_span_and_match_the_ledger(provider, exporter, tmp_path):
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"))
    memory = MemorySink()
    pipeline.add_sink(memory)
    listener = SpanListener(provider, environ={})
    tracer = provider.get_tracer("app")
    with FakeAnthropicServer() as server:
        server.enqueue(Fault.cut_after_deltas(15), None)
        costwatch.instrument(pipeline=pipeline, sinks=[], listeners=[listener])
        try:
            options: dict[str, Any] = {}
            if SDK_2:  # the 2.x SDK traces its own calls; give it the same provider
                options["open_telemetry"] = {"tracer_provider": provider}
            client = anthropic.Anthropic(base_url=server.base_url, api_key="test", max_retries=0, **options)
            with tracer.start_as_current_span("job") as job:
                for _ in range(2):
                    try:
                        with client.messages.stream(
                            model=MODEL, max_tokens=4096, messages=[{"role": "user", "content": SECRET}]
                        ) as stream:
                            for _event in stream:
                                pass
                        break
                    except Exception:
                        continue
            assert costwatch.flush(10)
        finally:
            costwatch.uninstrument()
        pipeline.shutdown(10)

    spans = exporter.get_finished_spans()
    attempts = sorted(
        (s for s in spans if s.name == f"chat {MODEL}"),
        key=lambda s: dict(s.attributes or {})["costwatch.attempt.number"],
    )
    entries = server.ledger.entries
    assert len(attempts) == len(entries) == len(memory.records) == 2
    first, retry = attempts
    assert first.instrumentation_scope is not None and first.instrumentation_scope.name == "costwatch"

    # Parents: the SDK's call span on 2.x (one per call, so one per attempt here), else the app's span.
    for span in attempts:
        assert span.parent is not None
        parent = next(s for s in spans if s.context.span_id == span.parent.span_id)
        if SDK_2:
            assert parent.name == "anthropic.messages.create" and parent.kind is SpanKind.CLIENT
            assert parent.parent is not None and parent.parent.span_id == job.get_span_context().span_id
        else:
            assert parent.name == "job"
        assert span.context.trace_id == job.get_span_context().trace_id

    assert first.status.status_code is StatusCode.ERROR
    assert retry.status.status_code is StatusCode.UNSET
    assert [link.context.span_id for link in retry.links] == [first.context.span_id]
    record_of = {r.attempt_number: r for r in memory.records}
    for span, entry in zip(attempts, entries, strict=True):
        attributes = dict(span.attributes or {})
        number = attributes["costwatch.attempt.number"]
        record = record_of[number]
        assert attributes["gen_ai.usage.input_tokens"] == (
            entry.input_tokens + entry.cache_read_tokens + entry.cache_write_tokens
        )
        assert attributes["gen_ai.usage.cache_read.input_tokens"] == entry.cache_read_tokens
        assert attributes["gen_ai.usage.output_tokens"] == record.usage.output_tokens
        assert attributes["gen_ai.response.id"] == entry.message_id
        assert attributes["gen_ai.response.model"] == entry.model
        assert attributes["costwatch.logical_request.id"] == record.logical_request_id
        assert attributes["costwatch.cost.usd"] == pytest.approx(record.cost.total_usd if record.cost else 0)
    assert dict(first.attributes or {})["costwatch.waste.reason"] == "abandoned"
    assert dict(first.attributes or {})["error.type"] == record_of[1].error_type
    assert dict(retry.attributes or {})["gen_ai.response.finish_reasons"] == (entries[1].stop_reason,)
    assert dict(retry.attributes or {})["gen_ai.usage.output_tokens"] == entries[1].output_tokens
    for span in attempts:
        assert not any(SECRET in str(value) for value in (span.attributes or {}).values())


_CHILD_START = """
from datetime import datetime, timezone
from opentelemetry import trace
from costwatch.records import AttemptStart
from costwatch.spans import SpanListener

listener = SpanListener()
start = AttemptStart(
    attempt_id="a", logical_request_id="r", attempt_number=1,
    started_at=datetime.now(timezone.utc), model_requested="claude-opus-4-6",
)
"""


def run_in_a_child(body: str, *, tracer_provider: str | None) -> None:
    """Run ``body`` in a fresh process (a global tracer provider can be set once per process) after
    :data:`_CHILD_START` (a default ``listener`` and an attempt's ``start``), with
    ``OTEL_PYTHON_TRACER_PROVIDER`` set to ``tracer_provider`` (``None``: unset); it prints ok."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("OTEL_PYTHON_TRACER_PROVIDER", None)
    if tracer_provider is not None:
        env["OTEL_PYTHON_TRACER_PROVIDER"] = tracer_provider
    script = _CHILD_START + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_default_listener_makes_no_span_until_the_application_sets_a_tracer_provider() -> None:
    run_in_a_child(
        """
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        assert listener.attempt_started(start) is None
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        assert listener.attempt_started(start) is not None
        print("ok")
        """,
        tracer_provider=None,
    )


def test_default_listener_makes_spans_with_a_provider_named_by_the_environment() -> None:
    # OTEL_PYTHON_TRACER_PROVIDER: OpenTelemetry loads the provider at the first look for the global one.
    run_in_a_child(
        """
        assert listener.attempt_started(start) is not None
        assert type(trace.get_tracer_provider()).__module__.startswith("opentelemetry.sdk")
        print("ok")
        """,
        tracer_provider="sdk_tracer_provider",
    )


def test_a_platform_attempt_span_names_the_platform_and_its_provider(provider, exporter):
    run(SpanListener(provider, environ={}), start(), finished(platform="bedrock"))
    attributes = dict(only(exporter.get_finished_spans()).attributes or {})
    assert attributes["gen_ai.provider.name"] == "aws.bedrock"
    assert attributes["costwatch.platform"] == "bedrock"


# -- figures that arrive after the attempt ended ----------------------------------------------------
def estimated(attempt_id: str = "a1", tokens: int = 12, revision: int = 0) -> AttemptRecord:
    record = dropped(attempt_id, output_chars=MappingProxyType({"text": 42}))
    usage = dataclasses.replace(record.usage, output_tokens=tokens, estimated_output_tokens=tokens)
    return dataclasses.replace(
        record, usage=usage, cost=Cost(input_usd=2.7, output_usd=tokens * 0.015), revision=revision
    )


def test_a_revised_estimate_gets_a_root_span_linked_to_the_attempt_span_with_the_new_figure(
    provider, exporter
):
    listener = SpanListener(provider, environ={})
    run(listener, start(), estimated(tokens=12))
    listener.attempt_revised(estimated(tokens=20, revision=1))
    listener.attempt_revised(estimated(tokens=18, revision=2))
    attempt, first, second = exporter.get_finished_spans()
    assert dict(attempt.attributes or {})["gen_ai.usage.output_tokens"] == 12  # its first figure, for good
    for span in (first, second):
        assert span.name == "revise output" and span.kind is SpanKind.INTERNAL
        assert span.parent is None and span.context.trace_id != attempt.context.trace_id
        assert [link.context for link in span.links] == [attempt.context]
        assert span.instrumentation_scope is not None and span.instrumentation_scope.name == "costwatch"
    assert dict(first.attributes or {}) == {
        "costwatch.logical_request.id": "r1",
        "costwatch.attempt.number": 1,
        "costwatch.revision.number": 1,
        "costwatch.revision.model": MODEL,
        "costwatch.revision.output_tokens": 20,
        "costwatch.revision.previous_output_tokens": 12,
        "costwatch.usage.output_source": "estimated",
        "costwatch.revision.cost.usd": pytest.approx(2.7 + 20 * 0.015),
    }
    assert dict(second.attributes or {})["costwatch.revision.previous_output_tokens"] == 20
    assert dict(second.attributes or {})["costwatch.revision.output_tokens"] == 18
    assert not any(name.startswith("gen_ai.") for name in dict(second.attributes or {}))


def test_no_revision_span_without_a_changed_figure_or_an_attempt_span_of_this_listener(provider, exporter):
    listener = SpanListener(provider, environ={})
    run(listener, start(), estimated(tokens=12))
    run(listener, start("c1", request="r2"), finished("c1", request="r2"))
    listener.attempt_revised(estimated(tokens=12, revision=1))  # the same figure: a waste flip, say
    listener.attempt_revised(estimated("other", tokens=30, revision=1))  # another process's attempt
    listener.attempt_revised(dataclasses.replace(finished("c1", request="r2"), revision=1))  # reported
    assert len(exporter.get_finished_spans()) == 2


def test_remembered_estimated_attempts_are_bounded(provider, exporter):
    listener = SpanListener(provider, environ={}, max_revisable=1)
    run(listener, start("a1"), estimated("a1"))
    run(listener, start("a2", request="r2"), estimated("a2"))
    listener.attempt_revised(estimated("a1", tokens=40, revision=1))  # forgotten: no span
    listener.attempt_revised(estimated("a2", tokens=40, revision=1))
    assert [s.name for s in exporter.get_finished_spans()] == [f"chat {MODEL}"] * 2 + ["revise output"]


def _instrument_counting(listener: SpanListener, pipeline: Pipeline, memory: MemorySink) -> None:
    """Instrument with ``count_partial_output``: a cut stream's output is counted by the API."""
    costwatch.instrument(
        pipeline=pipeline,
        sinks=[memory],
        listeners=[listener],
        prices=load_prices(),
        estimator=OutputEstimator(),
        count_partial_output=True,
    )


def test_a_counted_cut_streams_span_ends_with_the_count_at_the_attempts_end(provider, exporter):
    listener = SpanListener(provider, environ={})
    pipeline, memory = Pipeline(), MemorySink()
    spec = ResponseSpec(blocks=(BlockSpec(BlockKind.TEXT, 900),))
    with FakeAnthropicServer(spec) as server:
        server.count_tokens_delay_s = 0.3  # the count arrives after the attempt ended
        _instrument_counting(listener, pipeline, memory)
        try:
            server.enqueue(Fault.cut_after_deltas(120))
            client = anthropic.Anthropic(base_url=server.base_url, api_key="test", max_retries=0)
            with pytest.raises(Exception, match=r"incomplete|closed"):
                for _ in client.messages.create(
                    model=MODEL, max_tokens=4096, messages=[{"role": "user", "content": "go"}], stream=True
                ):
                    pass
            ended_at = time.time_ns()
            assert exporter.get_finished_spans() == ()  # held until the count arrives
            assert costwatch.flush(30)
        finally:
            costwatch.uninstrument()
            pipeline.shutdown(10)
        (entry,) = server.ledger.entries
    (record,) = memory.records
    span = only(exporter.get_finished_spans())
    assert record.output_source is OutputSource.COUNTED and record.usage.output_tokens == entry.output_tokens
    assert span.end_time is not None and span.end_time <= ended_at  # the attempt's end, not the count's
    assert span.end_time - span.start_time == int(record.duration_s * 1e9)
    assert record.cost is not None
    assert dict(span.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": MODEL,
        "gen_ai.response.model": entry.model,
        "gen_ai.response.id": entry.message_id,
        "gen_ai.usage.input_tokens": entry.input_tokens,
        "gen_ai.usage.output_tokens": entry.output_tokens,  # counted: 0 off the fake's bill
        "gen_ai.usage.cache_read.input_tokens": 0,
        "gen_ai.usage.cache_creation.input_tokens": 0,
        "error.type": record.error_type,
        "costwatch.attempt.number": 1,
        "costwatch.logical_request.id": record.logical_request_id,
        "costwatch.attempt.outcome": "dropped",
        "costwatch.wasted.tokens": entry.input_tokens + entry.output_tokens,
        "costwatch.waste.reason": "abandoned",
        "costwatch.usage.output_estimated": False,
        "costwatch.usage.output_source": "counted",
        "costwatch.cost.usd": record.cost.total_usd,
        "costwatch.cost.priced": True,
    }


def test_a_retry_made_while_the_count_was_on_its_way_shows_on_the_counted_spans_waste_reason(
    provider, exporter
):
    listener = SpanListener(provider, environ={})
    pipeline, memory = Pipeline(), MemorySink()
    with FakeAnthropicServer(ResponseSpec(blocks=(BlockSpec(BlockKind.TEXT, 900),))) as server:
        server.count_tokens_delay_s = 0.5  # the application resends before the count arrives
        _instrument_counting(listener, pipeline, memory)
        try:
            server.enqueue(Fault.cut_after_deltas(60), None)
            for _ in range(2):
                read_stream_through_a_cut(server, 0, MODEL)
            assert costwatch.flush(30)
        finally:
            costwatch.uninstrument()
            pipeline.shutdown(10)
        cut_entry = server.ledger.entries[0]
    by_number = {
        dict(s.attributes or {})["costwatch.attempt.number"]: s for s in exporter.get_finished_spans()
    }
    cut = dict(by_number[1].attributes or {})
    assert cut["costwatch.waste.reason"] == "retried"
    assert cut["costwatch.usage.output_source"] == "counted"
    assert cut["gen_ai.usage.output_tokens"] == cut_entry.output_tokens
    assert [link.context for link in by_number[2].links] == [by_number[1].context]


def test_estimates_revised_at_flush_get_spans_linked_to_their_attempts_with_the_stored_figures(
    provider, exporter, tmp_path
):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    listener = SpanListener(provider, environ={})
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"))
    with FakeAnthropicServer(ResponseSpec.small(600)) as server:
        costwatch.instrument(
            pipeline=pipeline, sinks=[SqlStore(url)], listeners=[listener], prices=load_prices()
        )
        try:
            for i in range(3):  # cut before any stream completed: estimated with the defaults
                server.enqueue(Fault.cut_after_deltas(60 + 30 * i))
                read_stream_through_a_cut(server, i, HAIKU)
            for i in range(3):
                read_stream_through_a_cut(server, 10 + i, HAIKU)
            assert costwatch.flush(30)
        finally:
            costwatch.uninstrument()
            pipeline.shutdown(10)
    store = SqlStore(url)
    try:
        with store.engine.connect() as connection:
            rows = [record_from_row(r) for r in connection.execute(sa.select(ATTEMPTS)).mappings()]
    finally:
        store.shutdown()
    cuts = {r.attempt_id: r for r in rows if r.outcome is Outcome.DROPPED}
    assert len(cuts) == 3 and all(r.revision >= 1 for r in cuts.values())
    spans = exporter.get_finished_spans()
    revisions = [s for s in spans if s.name == "revise output"]
    for span in (s for s in spans if s.name == f"chat {HAIKU}"):
        attributes = dict(span.attributes or {})
        if attributes["costwatch.attempt.outcome"] != "dropped":
            continue
        stored = next(
            r for r in cuts.values() if r.logical_request_id == attributes["costwatch.logical_request.id"]
        )
        linked = [s for s in revisions if [link.context for link in s.links] == [span.context]]
        assert linked, "every revised estimate has its span"
        # A chain from the attempt span's figure to the stored one, one span per revision.
        carried = attributes["gen_ai.usage.output_tokens"]
        for revision in linked:
            revised = dict(revision.attributes or {})
            assert revised["costwatch.revision.previous_output_tokens"] == carried
            carried = revised["costwatch.revision.output_tokens"]
        assert dict(linked[-1].attributes or {}) == {
            "costwatch.logical_request.id": stored.logical_request_id,
            "costwatch.attempt.number": stored.attempt_number,
            "costwatch.revision.number": stored.revision,
            "costwatch.revision.model": HAIKU,
            "costwatch.revision.output_tokens": stored.usage.output_tokens,
            "costwatch.revision.previous_output_tokens": dict(
                (linked[-2] if len(linked) > 1 else span).attributes or {}
            )["costwatch.revision.output_tokens" if len(linked) > 1 else "gen_ai.usage.output_tokens"],
            "costwatch.usage.output_source": "estimated",
            "costwatch.revision.cost.usd": pytest.approx(stored.cost.total_usd if stored.cost else 0),
        }
    assert len({tuple(link.context.span_id for link in s.links) for s in revisions}) == 3
