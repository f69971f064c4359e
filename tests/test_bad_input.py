"""Bad input: malformed or surprising responses, corrupt files, bad settings and hostile tags.

Each is handled with a clear message or not at all: no exception reaches the application that it
would not get without costwatch, and nothing is lost. Tags come back from the store exactly (up to
the documented 200-character cut) and metric label values stay bounded in number and length.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import anthropic
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import costwatch
from costwatch import AttemptRecord, Outcome, Usage
from costwatch.metrics import MetricsSink
from costwatch.pipeline import Pipeline
from costwatch.pricing import PriceFileError, load_prices
from costwatch.records import WORKFLOW_LABEL_LENGTH, WasteReason
from costwatch.settings import SettingsError
from costwatch.sinks import MemorySink
from costwatch.spool import Spool
from costwatch.store import SqlStore
from costwatch.stream_meter import BodyMeter
from costwatch.testing import FakeAnthropicServer, Fault, ResponseSpec
from costwatch.validation import MAX_TOKENS_PER_ATTEMPT, clean_text, storable


@pytest.fixture
def store_url(new_store_url: str) -> str:
    """A store at the newest revision already (conftest's ``new_store_url``): these tests are of what
    a store does, not of how it is created."""
    return new_store_url


MODEL = "claude-haiku-4-5"
MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Check the totals."}]


@pytest.fixture
def accounting() -> Iterator[tuple[Pipeline, MemorySink]]:
    pipeline = Pipeline()
    sink = MemorySink()
    costwatch.instrument(pipeline=pipeline, sinks=[sink], listeners=[], prices=load_prices())
    try:
        yield pipeline, sink
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def stream_events(server: FakeAnthropicServer) -> list[str]:
    client = anthropic.Anthropic(base_url=server.base_url, api_key="sk-ant-bad", max_retries=0)
    with client, client.messages.create(model=MODEL, max_tokens=512, messages=MESSAGES, stream=True) as s:
        return [event.type for event in s]


# -- surprising responses ----------------------------------------------------------------------------
def test_a_malformed_sse_event_raises_the_sdk_own_error_and_is_recorded_with_exact_input(accounting) -> None:
    _pipeline, sink = accounting
    with FakeAnthropicServer(ResponseSpec.small(40), faults=[Fault.malformed_json(after_events=8)]) as server:
        with pytest.raises(json.JSONDecodeError):
            stream_events(server)
        (entry,) = server.ledger.wait_for(1)
    assert costwatch.flush(10)
    (record,) = sink.records
    # The SDK raised at its parse error and closed the body: that error is what the application saw,
    # not a stop of its own.
    assert record.outcome is Outcome.STREAM_ERROR and record.error_type == "JSONDecodeError"
    assert record.usage.input_tokens == entry.input_tokens
    assert record.usage.output_estimated and record.waste_reason is WasteReason.ABANDONED


def test_unknown_sse_events_are_skipped_and_the_attempt_is_billed_exactly(accounting) -> None:
    _pipeline, sink = accounting
    with FakeAnthropicServer(ResponseSpec.small(40), faults=[Fault.unknown_event(after_events=5)]) as server:
        stream_events(server)
        (entry,) = server.ledger.wait_for(1)
    assert costwatch.flush(10)
    (record,) = sink.records
    assert record.outcome is Outcome.COMPLETED
    assert record.usage.output_tokens == entry.output_tokens and not record.usage.output_estimated
    assert record.events_received == entry.events_sent


def sse(*events: dict) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


START = {
    "type": "message_start",
    "message": {"id": "msg_1", "model": MODEL, "usage": {"input_tokens": 120, "output_tokens": 1}},
}


def test_unknown_block_and_delta_types_are_counted_as_events_and_never_raise() -> None:
    meter = BodyMeter(stream=True)
    meter.feed(
        sse(
            START,
            {"type": "content_block_start", "index": 0, "content_block": {"type": "hologram", "x": [1]}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "hologram_delta", "text": "zzz"}},
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": 7}},
            {"type": "content_block_delta", "index": 1, "delta": "not an object"},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}},
            {"type": "message_stop"},
        )
    )
    assert meter.complete and meter.events == 7 and meter.malformed_events == 0
    assert meter.usage.input_tokens == 120 and meter.usage.output_tokens == 9
    assert meter.chars == {"text": 0, "thinking": 0, "tool_input": 0, "cjk": 0, "symbol": 0, "space": 0}


@pytest.mark.parametrize(
    "usage",
    [None, {}, {"input_tokens": None}, {"input_tokens": -5, "output_tokens": -1}, {"input_tokens": "120"}],
    ids=["missing", "empty", "null", "negative", "string"],
)
def test_missing_or_nonsensical_usage_counts_as_zero_and_never_raises(usage: dict | None) -> None:
    message: dict = {"id": "msg_1", "model": MODEL}
    if usage is not None:
        message["usage"] = usage
    meter = BodyMeter(stream=True)
    meter.feed(sse({"type": "message_start", "message": message}, {"type": "message_stop"}))
    assert meter.complete and meter.usage.input_tokens == 0 and meter.usage.output_tokens == 0


HUGE = 10**20  # beyond a 64-bit integer


def test_absurd_token_counts_are_clamped_and_flagged_through_the_sdk_and_the_store(
    store_url: str, accounting
) -> None:
    _pipeline, sink = accounting
    spec = ResponseSpec.small(10, input_tokens=HUGE, cache_read_tokens=HUGE + 1)
    with FakeAnthropicServer(spec) as server:
        stream_events(server)
    assert costwatch.flush(10)
    (record,) = sink.records
    assert record.usage.input_tokens == record.usage.cache_read_tokens == MAX_TOKENS_PER_ATTEMPT
    assert record.usage.output_tokens < MAX_TOKENS_PER_ATTEMPT and record.usage.tokens_clamped
    assert record.cost is not None and 1e3 < record.cost.total_usd < 1e5
    store = SqlStore(store_url)
    try:
        store.export([record])
        assert store.attempt(record.attempt_id) == record
    finally:
        store.shutdown()


def test_token_counts_up_to_the_clamp_are_kept_exactly_through_the_sdk_and_the_store(
    store_url: str, accounting
) -> None:
    _pipeline, sink = accounting
    spec = ResponseSpec.small(
        10, input_tokens=MAX_TOKENS_PER_ATTEMPT, cache_read_tokens=MAX_TOKENS_PER_ATTEMPT - 1
    )
    with FakeAnthropicServer(spec) as server:
        stream_events(server)
    assert costwatch.flush(10)
    (record,) = sink.records
    assert record.usage.input_tokens == MAX_TOKENS_PER_ATTEMPT
    assert record.usage.cache_read_tokens == MAX_TOKENS_PER_ATTEMPT - 1
    assert not record.usage.tokens_clamped
    store = SqlStore(store_url)
    try:
        store.export([record])
        assert store.attempt(record.attempt_id) == record
    finally:
        store.shutdown()


# -- corrupt files and bad settings ------------------------------------------------------------------
def record(i: int, **tags: str) -> AttemptRecord:
    return AttemptRecord(
        attempt_id=f"att-{i}",
        logical_request_id=f"req-{i}",
        attempt_number=1,
        started_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        outcome=Outcome.COMPLETED,
        model_requested=MODEL,
        model=MODEL,
        usage=Usage(input_tokens=100 + i, output_tokens=10),
        tags=tags,
    )


def test_a_corrupt_spool_segment_replays_every_readable_record_and_quarantines_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path)
    folder = spool.sink_directory("memory")
    folder.mkdir(parents=True)
    good = [record(i) for i in range(3)]
    lines = [json.dumps(r.to_dict()).encode() for r in good]
    corrupt = [b"\xff\xfe\x00garbage", b'{"attempt_id": "x"}', b"[1, 2", b"null"]
    (folder / "4242-crashed.jsonl").write_bytes(
        b"\n".join([lines[0], corrupt[0], lines[1], corrupt[1], corrupt[2], corrupt[3], lines[2][:-7]])
        + b"\n"
        + lines[2]
        + b"\n"
    )
    sink = MemorySink()
    with caplog.at_level(logging.WARNING, logger="costwatch"):
        delivered = spool.replay("memory", sink.export)
    assert delivered == 3 and {r.attempt_id for r in sink.records} == {"att-0", "att-1", "att-2"}
    quarantined = (folder / "quarantine" / "4242-crashed.jsonl").read_bytes().splitlines()
    assert len(quarantined) == 5 and corrupt[0] in quarantined
    assert len([r for r in caplog.records if "unreadable spooled record" in r.getMessage()]) == 5
    assert not list(folder.glob("*.jsonl"))


def test_a_malformed_price_override_stops_instrument_with_a_message_naming_the_file(tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text('{"models": {"claude-haiku-4-5": {"input": "cheap"}}}')
    with pytest.raises(PriceFileError) as caught:
        costwatch.instrument(prices_file=str(prices), sinks=[], listeners=[], pipeline=Pipeline())
    assert str(prices) in str(caught.value) and "\n" not in str(caught.value)
    assert not costwatch.is_instrumented()


def test_a_malformed_setting_stops_instrument_with_a_message_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COSTWATCH_QUEUE_CAPACITY", "lots")
    with pytest.raises(SettingsError, match="COSTWATCH_QUEUE_CAPACITY='lots'"):
        costwatch.instrument(sinks=[], listeners=[], pipeline=Pipeline())
    assert not costwatch.is_instrumented()


# -- hostile tags ------------------------------------------------------------------------------------
HOSTILE = {
    "workflow": "'; DROP TABLE costwatch_attempts; --",
    "quotes": "say \"hi\" and 'bye' \\ back\\slash",
    "lines": "one\ntwo\r\nthree\ttab",
    "braces": '{le="+Inf"} }{ ${x} {{template}}',
    "long": "x" * 5000,
    "unicode": "naïve 雪 🚀 \u202e reversed",
    "percent": "%s %d %(name)s {0}",
    "nul": "before\x00after",
}


def test_hostile_tags_round_trip_through_the_sdk_and_the_store_up_to_200_chars_without_control_characters(
    store_url: str, accounting
) -> None:
    _pipeline, sink = accounting
    with FakeAnthropicServer(ResponseSpec.small(5)) as server, costwatch.tags(**HOSTILE):
        stream_events(server)
    assert costwatch.flush(10)
    (recorded,) = sink.records
    assert dict(recorded.tags) == {name: clean_text(value[:200]) for name, value in HOSTILE.items()}
    assert (
        recorded.tags["nul"] == "before\ufffdafter"
        and recorded.tags["lines"] == "one\ufffdtwo\ufffd\ufffdthree\ufffdtab"
    )
    store = SqlStore(store_url)
    try:
        store.export([recorded])
        assert store.attempt(recorded.attempt_id) == recorded
        (totals,) = store.rollup_totals(group_by=["workflow"], where={"workflow": HOSTILE["workflow"]})
        assert totals.attempts == 1
    finally:
        store.shutdown()


def test_hostile_workflow_tags_give_parseable_bounded_metric_labels() -> None:
    registry = CollectorRegistry()
    metrics = MetricsSink(registry=registry, retry_window_s=600, workflow_label_limit=20)
    records = [record(i, workflow=value) for i, value in enumerate(HOSTILE.values())]
    records.append(record(99, workflow="\x00nul\x00"))
    metrics.export(records)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    workflows = {s.labels["workflow"] for s in families["costwatch_billed_cost_usd"].samples}
    assert workflows == {str(r.tags["workflow"])[:WORKFLOW_LABEL_LENGTH] for r in records}
    assert all(len(value) <= WORKFLOW_LABEL_LENGTH for value in workflows)


def _named(model_requested: str, tags: dict[str, str] | None = None) -> AttemptRecord:
    """A bare completed attempt whose texts the test chooses."""
    return AttemptRecord(
        attempt_id="a1",
        logical_request_id="r1",
        attempt_number=1,
        started_at=datetime.now(timezone.utc),
        outcome=Outcome.COMPLETED,
        model_requested=model_requested,
        tags=tags or {},
    )


def test_storable_keeps_unprintable_text_it_can_store_and_replaces_only_controls_and_surrogates() -> None:
    # Not printable, yet storable (the quick all-printable check must fall back to the search):
    # a no-break space, a line separator, a private-use character; beside them, a C1 control.
    storable_text = "a\u00a0b\u2028c\ue000d ✓"
    record = _named(storable_text, {"workflow": storable_text})
    assert storable(record) is record
    dirty = dataclasses.replace(record, model_requested=storable_text + "\x85", tags={"w": "\ud800x"})
    cleaned = storable(dirty)
    assert cleaned.model_requested == storable_text + "\ufffd"
    assert dict(cleaned.tags) == {"w": "\ufffdx"}


@pytest.mark.parametrize("where", ["model_requested", "tag"])
def test_storable_replaces_exactly_the_controls_in_ascii_text(where: str) -> None:
    """Of the ASCII characters only the C0 controls and DEL are replaced."""
    for code in range(128):
        text = f"claude-{chr(code)}-x"
        record = _named("claude-x", {"workflow": text}) if where == "tag" else _named(text)
        cleaned = storable(record)
        control = code < 0x20 or code == 0x7F
        assert (cleaned is not record) == control, code
        kept = cleaned.tags["workflow"] if where == "tag" else cleaned.model_requested
        assert kept == ("claude-\ufffd-x" if control else text), code
