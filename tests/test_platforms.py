"""Bedrock, Vertex and Foundry: their attempts are recognised by path and wire format, their models
mapped to canonical ids, Bedrock's event-stream read as it passes, and the fault matrix holds on every
platform client this SDK line ships, sync and async."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import anthropic
import pytest
from test_fault_matrix import (
    CASES,
    Seen,
    accounted,
    assert_billed_like_ledger,
    describe_error,
    read_async,
    read_sync,
)

import costwatch
from costwatch import Outcome
from costwatch.event_stream import EventStreamMeter, decode_frames, encode_frame
from costwatch.platforms import BEDROCK, FOUNDRY, VERTEX, Route, canonical_model, route_of
from costwatch.testing import FakeAnthropicServer, Fault
from costwatch.testing.plan import bedrock_exception_frame, bedrock_frame


# -- canonical models and routes (pure) ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("platform", "given", "canonical"),
    [
        (BEDROCK, "anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5-20250929"),
        (BEDROCK, "us.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5-20250929"),
        (BEDROCK, "global.anthropic.claude-haiku-4-5-20251001-v1:0", "claude-haiku-4-5-20251001"),
        (BEDROCK, "anthropic.claude-opus-4-6-v1", "claude-opus-4-6"),
        (
            BEDROCK,
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.anthropic.claude-opus-4-1-20250805-v1:0",
            "claude-opus-4-1-20250805",
        ),
        # An application inference profile names no model: kept as it is, so it stays unpriced.
        (
            BEDROCK,
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3",
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3",
        ),
        (VERTEX, "claude-sonnet-4-5@20250929", "claude-sonnet-4-5-20250929"),
        (VERTEX, "claude-opus-4-6", "claude-opus-4-6"),
        (FOUNDRY, "claude-sonnet-4-5", "claude-sonnet-4-5"),
    ],
)
def test_platform_model_names_map_to_canonical_model_ids(platform, given, canonical):
    assert canonical_model(platform, given) == canonical


def test_routes_name_the_platform_the_model_and_the_endpoint_kind():
    assert route_of(
        "bedrock-runtime.us-east-1.amazonaws.com",
        "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke-with-response-stream",
    ) == Route(BEDROCK, "claude-sonnet-4-5-20250929", stream=True, global_endpoint=False)
    assert route_of("h", "/model/global.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke") == Route(
        BEDROCK, "claude-sonnet-4-5-20250929", stream=False, global_endpoint=True
    )
    vertex = "/v1/projects/p/locations/{}/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict"
    assert route_of("h", vertex.format("global")).global_endpoint
    assert route_of("h", vertex.format("us-east5")) == Route(
        VERTEX, "claude-sonnet-4-5-20250929", global_endpoint=False
    )
    assert route_of("r.services.ai.azure.com", "/anthropic/v1/messages").platform == FOUNDRY
    assert route_of("127.0.0.1", "/anthropic/v1/messages", {"api-key"}).platform == FOUNDRY
    assert route_of("api.anthropic.com", "/v1/messages").platform == "anthropic"
    assert route_of("proxy", "/anthropic/v1/messages", {"x-api-key"}).platform == "anthropic"


# -- the event stream (pure) ---------------------------------------------------------------------------
def test_event_stream_frames_decode_whatever_the_chunking():
    frames = bedrock_frame(b'{"type":"ping"}') + bedrock_exception_frame("throttlingException", "slow down")
    for size in (1, 7, len(frames)):
        buffer = bytearray()
        decoded = []
        for at in range(0, len(frames), size):
            buffer += frames[at : at + size]
            decoded.extend(decode_frames(buffer))
        assert not buffer
        (chunk_headers, chunk_payload), (error_headers, _) = decoded
        assert chunk_headers[":event-type"] == "chunk"
        assert base64.b64decode(json.loads(chunk_payload)["bytes"]) == b'{"type":"ping"}'
        assert error_headers[":exception-type"] == "throttlingException"


def test_a_corrupt_frame_is_counted_and_stops_the_meter_without_raising():
    frame = bytearray(encode_frame({":event-type": "chunk"}, b'{"bytes":""}'))
    frame[-1] ^= 0xFF
    meter = EventStreamMeter()
    meter.feed(bytes(frame))
    meter.feed(bedrock_frame(b'{"type":"message_stop"}'))
    assert meter.malformed_events == 1 and not meter.complete
    assert meter.bytes_received == len(frame) + len(bedrock_frame(b'{"type":"message_stop"}'))


def test_bedrock_invocation_metrics_fill_in_usage_the_events_did_not_report():
    start = {"type": "message_start", "message": {"id": "msg_1", "model": "m", "usage": {"input_tokens": 7}}}
    stop = {
        "type": "message_stop",
        "amazon-bedrock-invocationMetrics": {"inputTokenCount": 7, "outputTokenCount": 42},
    }
    meter = EventStreamMeter()
    meter.feed(bedrock_frame(json.dumps(start).encode()) + bedrock_frame(json.dumps(stop).encode()))
    assert meter.complete and meter.output_reported
    assert (meter.usage.input_tokens, meter.usage.output_tokens) == (7, 42)
    assert meter.invocation_metrics == stop["amazon-bedrock-invocationMetrics"]


# -- the platform clients of this SDK line -------------------------------------------------------------
def _bedrock_auth() -> dict[str, Any]:
    # anthropic 2.x takes a Bedrock API key (a bearer token); 0.x signs with AWS keys (botocore).
    code = anthropic.AnthropicBedrock.__init__.__code__
    return (
        {"api_key": "bedrock-key"}
        if "api_key" in code.co_varnames
        else {"aws_access_key": "AK", "aws_secret_key": "SK"}
    )


def _clients(base_url: str) -> dict[str, tuple[Callable[..., Any], Callable[..., Any]]]:
    bedrock = {"base_url": base_url, "aws_region": "us-east-1", **_bedrock_auth()}
    vertex = {"base_url": base_url, "region": "us-east5", "project_id": "proj", "access_token": "token"}
    foundry = {"base_url": base_url + "/anthropic/", "api_key": "foundry-key"}
    return {
        BEDROCK: (
            lambda **kw: anthropic.AnthropicBedrock(**bedrock, **kw),
            lambda **kw: anthropic.AsyncAnthropicBedrock(**bedrock, **kw),
        ),
        VERTEX: (
            lambda **kw: anthropic.AnthropicVertex(**vertex, **kw),
            lambda **kw: anthropic.AsyncAnthropicVertex(**vertex, **kw),
        ),
        FOUNDRY: (
            lambda **kw: anthropic.AnthropicFoundry(**foundry, **kw),
            lambda **kw: anthropic.AsyncAnthropicFoundry(**foundry, **kw),
        ),
    }


PLATFORM_CASES = (
    "completed",
    "reset_before_headers",
    "cut_before_first_delta",
    "cut_inside_message_start",
    "cut_between_events",
    "cut_inside_event",
    "cut_inside_chunk_header",
    "cut_after_message_delta",
    "cut_under_stream_helper",
    "cut_non_stream_body",
    "sse_error_event",
    "429_retried_by_sdk",
    "reset_retried_by_sdk",
    "application_breaks_out",
)


def run_on(platform: str, name: str, mode: str):
    case = CASES[name]
    with FakeAnthropicServer(case.spec, faults=case.faults) as server:
        sync_client, async_client = _clients(server.base_url)[platform]
        if mode == "sync":
            with sync_client(**case.client) as client:
                received: tuple[str, ...] = ()
                try:
                    received = read_sync(client, case.read)
                    seen = Seen(received, None)
                except Exception as exc:
                    seen = Seen(received, describe_error(exc))
        else:

            async def main() -> Seen:
                got: list[str] = []
                async with async_client(**case.client) as client:
                    try:
                        await asyncio.wait_for(read_async(client, case.read, got), 20)
                    except Exception as exc:
                        return Seen(tuple(got), describe_error(exc))
                    return Seen(tuple(got), None)

            seen = asyncio.run(main())
        entries = tuple(server.ledger.wait_for(len(case.outcomes), timeout=5))
    return seen, entries


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("name", PLATFORM_CASES)
@pytest.mark.parametrize("platform", [BEDROCK, VERTEX, FOUNDRY])
def test_every_platform_client_sees_the_same_and_records_match_the_ledger(platform, name, mode):
    case = CASES[name]
    bare, _ = run_on(platform, name, mode)
    with accounted() as (_pipeline, sink):
        seen, entries = run_on(platform, name, mode)
        assert costwatch.flush(10)
        records = sink.records
    assert seen == bare
    assert [r.outcome for r in records] == list(case.outcomes), [r.to_dict() for r in records]
    assert len(entries) == len(records)
    assert len({r.logical_request_id for r in records}) == 1
    for record, entry in zip(records, entries, strict=True):
        assert_billed_like_ledger(record, entry, case)
        # The price table is the first-party API's: a platform's attempt is unpriced, never guessed.
        assert record.cost is None


def test_platform_attempts_are_recorded_under_the_canonical_model(accounting):
    with FakeAnthropicServer() as server:
        clients = _clients(server.base_url)
        messages = [{"role": "user", "content": "hi"}]
        named = {
            BEDROCK: "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            VERTEX: "claude-sonnet-4-5@20250929",
        }
        server.enqueue(Fault.reset(), Fault.reset())
        for platform, model in named.items():
            with clients[platform][0](max_retries=0) as client, pytest.raises(anthropic.APIConnectionError):
                client.messages.create(model=model, max_tokens=10, messages=messages)
        records = accounting.records()
    # No answer arrived: the model is the one the path named, mapped to its first-party id.
    assert [(r.outcome, r.model_name) for r in records] == [
        (Outcome.CONNECT_ERROR, "claude-sonnet-4-5-20250929")
    ] * 2


# -- the platform dimension: records, store, metrics ---------------------------------------------------
def test_the_platform_reaches_the_record_the_store_and_the_metrics(store_url):
    from prometheus_client import CollectorRegistry

    from costwatch.metrics import MetricsSink
    from costwatch.pipeline import Pipeline
    from costwatch.pricing import load_prices
    from costwatch.sinks import MemorySink
    from costwatch.store import SqlStore

    registry = CollectorRegistry()
    pipeline = Pipeline()
    memory = MemorySink()
    store = SqlStore(store_url)
    sinks = [memory, store, MetricsSink(registry=registry, pipeline=pipeline)]
    costwatch.instrument(pipeline=pipeline, sinks=sinks, listeners=[], prices=load_prices())
    try:
        with FakeAnthropicServer() as server:
            clients = _clients(server.base_url)
            for platform, model in ((BEDROCK, "anthropic.claude-haiku-4-5-20251001-v1:0"), (FOUNDRY, "x")):
                with (
                    clients[platform][0](max_retries=0) as client,
                    client.messages.stream(
                        model=model, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
                    ) as stream,
                ):
                    stream.get_final_message()
            entries = server.ledger.entries
        assert costwatch.flush(10)
        bedrock, foundry = memory.records
        assert (bedrock.platform, foundry.platform) == (BEDROCK, FOUNDRY)
        assert store.attempt(bedrock.attempt_id).platform == BEDROCK  # type: ignore[union-attr]
        assert store.attempt(foundry.attempt_id).platform == FOUNDRY  # type: ignore[union-attr]
        for platform, entry in zip((BEDROCK, FOUNDRY), entries, strict=True):
            labels = {"platform": platform, "outcome": "completed"}
            assert registry.get_sample_value("costwatch_platform_attempts_total", labels) == 1
            tokens = {"platform": platform, "token_type": "input"}
            assert (
                registry.get_sample_value("costwatch_platform_billed_tokens_total", tokens)
                == entry.input_tokens
            )
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def _platform_records() -> list[Any]:
    """One completed attempt per platform, in one hour; the Vertex one dropped and abandoned."""
    import dataclasses
    from datetime import datetime, timezone

    from costwatch.records import AttemptRecord, Cost, Usage, WasteReason

    started = datetime(2026, 11, 1, 9, 5, tzinfo=timezone.utc)
    base = AttemptRecord(
        attempt_id="",
        logical_request_id="",
        attempt_number=1,
        started_at=started,
        outcome=Outcome.COMPLETED,
        model_requested="claude-haiku-4-5",
        duration_s=1.0,
        usage=Usage(input_tokens=100, output_tokens=10),
    )
    return [
        dataclasses.replace(base, attempt_id="a", logical_request_id="a", cost=Cost(input_usd=0.01)),
        dataclasses.replace(base, attempt_id="b", logical_request_id="b", platform=BEDROCK),
        dataclasses.replace(
            base,
            attempt_id="v",
            logical_request_id="v",
            platform=VERTEX,
            outcome=Outcome.DROPPED,
            wasted=True,
            waste_reason=WasteReason.ABANDONED,
        ),
        dataclasses.replace(
            base, attempt_id="f", logical_request_id="f", platform=FOUNDRY, cost=Cost(input_usd=0.02)
        ),
        # A platform name this version does not know (a store written by a later one): bounded.
        dataclasses.replace(base, attempt_id="x", logical_request_id="x", platform="somewhere-new"),
    ]


def test_the_report_groups_by_platform_from_the_rollups(tmp_path, capsys):
    from costwatch.cli import main
    from costwatch.store import SqlStore

    db = f"sqlite:///{tmp_path / 'store.db'}"
    store = SqlStore(db)
    store.write(_platform_records())
    store.shutdown()
    assert main(["report", "--by", "platform", "--format", "json", "--db", db]) == 0
    report = json.loads(capsys.readouterr().out)
    groups = {group["platform"]: group for group in report["groups"]}
    assert set(groups) == {"anthropic", BEDROCK, VERTEX, FOUNDRY, "somewhere-new"}
    assert groups[FOUNDRY]["billed_cost_usd"] == pytest.approx(0.02)
    assert groups[BEDROCK]["unpriced_attempts"] == 1 and groups[BEDROCK]["billed_cost_usd"] == 0
    assert groups[VERTEX]["attempts"] == 1 and groups[VERTEX]["billed_tokens"]["input"] == 100
    assert main(["report", "--by", "platform", "--format", "csv", "--db", db]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("platform,") and len(lines) == 1 + 5


def test_the_fleet_exporter_labels_by_platform_with_a_bounded_label(tmp_path):
    from datetime import datetime, timedelta, timezone

    from costwatch.exporter import FleetCollector
    from costwatch.store import SqlStore

    db = f"sqlite:///{tmp_path / 'store.db'}"
    store = SqlStore(db)
    store.write(_platform_records())
    store.shutdown()
    later = datetime(2026, 11, 2, tzinfo=timezone.utc)
    collector = FleetCollector(db, retry_window=timedelta(minutes=10), clock=lambda: later)
    try:
        samples = collector.read()
    finally:
        collector.close()
    attempts = samples.counters["costwatch_platform_attempts"]
    assert attempts == {
        ("anthropic", "completed"): 1,
        (BEDROCK, "completed"): 1,
        (VERTEX, "dropped"): 1,
        (FOUNDRY, "completed"): 1,
        ("other", "completed"): 1,
    }
    assert samples.counters["costwatch_platform_billed_cost_usd"][(FOUNDRY,)] == pytest.approx(0.02)
    assert samples.counters["costwatch_platform_unpriced_attempts"] == {
        (BEDROCK,): 1,
        (VERTEX,): 1,
        ("other",): 1,
    }
    assert samples.counters["costwatch_platform_billed_tokens"][(VERTEX, "input")] == 100
