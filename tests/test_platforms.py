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
    Case,
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
from costwatch.platforms import (
    BEDROCK,
    FOUNDRY,
    GLOBAL,
    REGIONAL,
    VERTEX,
    Route,
    canonical_model,
    route_of,
)
from costwatch.pricing import load_prices
from costwatch.records import WasteReason
from costwatch.testing import FakeAnthropicServer, Fault
from costwatch.testing.plan import bedrock_exception_frame, bedrock_frame


@pytest.fixture
def store_url(new_store_url: str) -> str:
    """A store at the newest revision already (conftest's ``new_store_url``): these tests are of what
    a store does, not of how it is created."""
    return new_store_url


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
    ) == Route(BEDROCK, "claude-sonnet-4-5-20250929", stream=True, endpoint=REGIONAL)
    assert route_of("h", "/model/global.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke") == Route(
        BEDROCK, "claude-sonnet-4-5-20250929", stream=False, endpoint=GLOBAL
    )
    vertex = "/v1/projects/p/locations/{}/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict"
    assert route_of("h", vertex.format("global")).endpoint == GLOBAL
    # Multi-region (us, eu) and regional locations both carry the premium.
    for location in ("us-east5", "us", "eu"):
        assert route_of("h", vertex.format(location)) == Route(
            VERTEX, "claude-sonnet-4-5-20250929", endpoint=REGIONAL
        )
    assert route_of("api.anthropic.com", "/v1/messages").platform == "anthropic"
    assert route_of("proxy", "/anthropic/v1/messages", {"x-api-key"}).platform == "anthropic"


@pytest.mark.parametrize(
    ("host", "path", "headers"),
    [
        # AnthropicFoundry(resource=...): https://{resource}.services.ai.azure.com/anthropic/
        ("r.services.ai.azure.com", "/anthropic/v1/messages", set()),
        # base_url=... with an API key: `api-key` is sent (besides x-api-key) whatever the URL.
        ("127.0.0.1", "/anthropic/v1/messages", {"api-key", "x-api-key"}),
        ("gateway.example.com", "/v1/messages", {"api-key", "x-api-key"}),
        ("gateway.example.com", "/team-a/claude/v1/messages", {"api-key"}),
    ],
)
def test_foundry_is_recognised_by_its_host_or_behind_any_base_url_by_its_api_key_header(host, path, headers):
    assert route_of(host, path, headers) == Route(FOUNDRY)


def test_bedrock_mantle_is_bedrock_whose_endpoint_kind_the_request_does_not_tell():
    # AnthropicBedrockMantle: https://bedrock-mantle.{region}.api.aws/anthropic/v1/messages, the model in
    # the body; behind a custom base URL it signs with SigV4 (x-amz-date).
    assert route_of("bedrock-mantle.us-east-1.api.aws", "/anthropic/v1/messages") == Route(BEDROCK)
    assert route_of("10.0.0.1", "/anthropic/v1/messages", {"x-amz-date", "authorization"}) == Route(BEDROCK)
    # Claude Platform on AWS (AnthropicAWS) is Anthropic's own API, billed at its rates.
    assert route_of("aws-external-anthropic.us-east-1.api.aws", "/v1/messages", {"x-amz-date"}).platform == (
        "anthropic"
    )
    assert canonical_model(BEDROCK, "anthropic.claude-opus-5-5") == "claude-opus-5-5"


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


MANTLE = "bedrock-mantle"
"""AnthropicBedrockMantle: Claude in Amazon Bedrock over the Messages API (platform ``bedrock``)."""


def _clients(base_url: str) -> dict[str, tuple[Callable[..., Any], Callable[..., Any]]]:
    bedrock = {"base_url": base_url, "aws_region": "us-east-1", **_bedrock_auth()}
    # Signed with SigV4 (x-amz-date), as with AWS credentials: behind this base URL the signature is
    # what tells it apart from the first-party API.
    mantle = {"base_url": base_url + "/anthropic", "aws_region": "us-east-1", "aws_access_key": "AK"}
    mantle["aws_secret_key"] = "SK"
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
        MANTLE: (
            lambda **kw: anthropic.AnthropicBedrockMantle(**mantle, **kw),
            lambda **kw: anthropic.AsyncAnthropicBedrockMantle(**mantle, **kw),
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
    "stall_mid_body",
    "malformed_event_then_end",
    "unknown_event_type",
)
PLATFORM_ONLY_CASES = {
    # A carried event that is not JSON (on Bedrock, inside a well-formed frame), then a normal end:
    # the SDK raises its own parse error, which is what the application sees and the record names.
    "malformed_event_then_end": Case((Fault.malformed_then_end(6),), (Outcome.STREAM_ERROR,)),
    # An event type no SDK knows (the API may add them): skipped, the attempt completes exactly.
    "unknown_event_type": Case((Fault.unknown_event(6),), (Outcome.COMPLETED,)),
}
"""Rows of the matrix run here on every platform client (the first-party ones are in test_bad_input)."""


def case_named(name: str) -> Case:
    return PLATFORM_ONLY_CASES.get(name) or CASES[name]


def run_on(platform: str, name: str, mode: str):
    case = case_named(name)
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
@pytest.mark.parametrize("client", [BEDROCK, VERTEX, FOUNDRY, MANTLE])
def test_every_platform_client_sees_the_same_and_records_match_the_ledger(client, name, mode):
    platform = BEDROCK if client == MANTLE else client
    case = case_named(name)
    bare, _ = run_on(client, name, mode)
    with accounted() as (_pipeline, sink):
        seen, entries = run_on(client, name, mode)
        assert costwatch.flush(10)
        records = sink.records
    assert seen == bare
    assert [r.outcome for r in records] == list(case.outcomes), [r.to_dict() for r in records]
    assert {r.platform for r in records} == {platform}
    assert len(entries) == len(records)
    assert len({r.logical_request_id for r in records}) == 1
    for record, entry in zip(records, entries, strict=True):
        if name == "malformed_event_then_end":
            # The SDK stopped reading at the event it could not parse, though the server sent the
            # rest: input exact, output estimated from what was read, the error the application saw.
            assert bare.error is not None and bare.error[0].endswith("." + str(record.error_type))
            assert record.usage.input_tokens == entry.input_tokens
            # The server bills what it sent until the client closed, which can be barely more than
            # what was read: an estimate of the read part is not always below the bill, so only its
            # presence is a fact here (its accuracy is the estimator's tests' and benchmark's).
            assert record.usage.output_estimated and record.usage.output_tokens > 0
            assert sum(record.output_chars.values()) > 0
            assert record.waste_reason is WasteReason.ABANDONED
        else:
            assert_billed_like_ledger(record, entry, case)
        # Foundry bills at the Claude API's rates; the built-in table holds no Bedrock or Vertex
        # price, so their attempts are unpriced, never priced at a guess.
        if platform == FOUNDRY:
            assert record.cost is not None
            assert record.cost == load_prices().cost(record.model_name, record.usage)
        else:
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


def test_requests_to_one_host_and_path_are_told_apart_by_their_route_headers_each_time(accounting):
    # The route is worked out once per host, path and route header: Foundry's `api-key` and Mantle's
    # SigV4 `x-amz-date` still tell a request apart from the first-party one sent before and after it.
    with FakeAnthropicServer() as server:
        clients = _clients(server.base_url)
        first_party = lambda **kw: anthropic.Anthropic(  # noqa: E731
            base_url=server.base_url + "/anthropic", api_key="sk-ant-test-key", **kw
        )
        for make in (first_party, clients[FOUNDRY][0], first_party, clients[MANTLE][0], first_party):
            with make(max_retries=0) as client:
                client.messages.create(
                    model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
                )
        paths = {entry.path for entry in server.ledger.entries}
        records = accounting.records()
    assert paths == {"/anthropic/v1/messages"}
    assert [r.platform for r in records] == ["anthropic", FOUNDRY, "anthropic", BEDROCK, "anthropic"]


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


# -- prices per platform --------------------------------------------------------------------------------
def _with_bedrock_prices(tmp_path, monkeypatch) -> Any:
    """A prices file a Bedrock user would add: AWS's global-endpoint price of one model."""
    override = {
        "version": "acme-aws-1",
        "platforms": {
            BEDROCK: {
                "models": {
                    "claude-haiku-4-5-20251001": {
                        "input_usd_per_mtok": 1.0,
                        "output_usd_per_mtok": 5.0,
                        "source": "https://aws.amazon.com/bedrock/pricing/",
                        "retrieved": "2026-12-03",
                    }
                }
            }
        },
        "models": {},
    }
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(override))
    monkeypatch.setenv("COSTWATCH_PRICES_FILE", str(path))
    return load_prices()


def test_the_built_in_table_prices_foundry_at_claude_api_rates_and_leaves_bedrock_and_vertex_unpriced():
    from costwatch.records import Usage

    table = load_prices()
    usage = Usage(input_tokens=1000, output_tokens=100)
    first_party = table.cost("claude-haiku-4-5", usage)
    assert first_party is not None and first_party.total_usd > 0
    assert table.cost("claude-haiku-4-5", usage, platform=FOUNDRY) == first_party
    for platform in (BEDROCK, VERTEX):
        for endpoint in (GLOBAL, REGIONAL, None):
            assert table.cost("claude-haiku-4-5", usage, platform=platform, endpoint=endpoint) is None
    assert table.cost("claude-haiku-4-5", usage, platform="somewhere-new") is None
    # Each platform's entry says where its rates come from, and when that was read.
    for entry in table.platforms.values():
        assert entry.source.startswith("https://platform.claude.com/") and entry.retrieved


def test_a_platform_entry_prices_its_model_globally_and_at_the_regional_premium(tmp_path, monkeypatch):
    from costwatch.records import Usage

    table = _with_bedrock_prices(tmp_path, monkeypatch)
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000)
    bedrock = {"platform": BEDROCK}
    assert table.cost("claude-haiku-4-5", usage, **bedrock, endpoint=GLOBAL).total_usd == pytest.approx(1.5)
    assert table.cost("claude-haiku-4-5", usage, **bedrock, endpoint=REGIONAL).total_usd == pytest.approx(
        1.65
    )
    # Unpriced: the endpoint kind not known (Mantle), a model without a Bedrock price, a server-tool
    # fee the table does not know, and Vertex (no price of its own).
    assert table.cost("claude-haiku-4-5", usage, **bedrock, endpoint=None) is None
    assert table.cost("claude-sonnet-4-5", usage, **bedrock, endpoint=GLOBAL) is None
    searched = {"web_search_requests": 1}
    assert table.cost("claude-haiku-4-5", usage, **bedrock, endpoint=GLOBAL, server_tool_use=searched) is None
    assert table.cost("claude-haiku-4-5", usage, platform=VERTEX, endpoint=GLOBAL) is None
    # The override's entry joins the built-in one, whose regional premium and provenance it keeps.
    assert table.platforms[BEDROCK].name == "Amazon Bedrock"


def test_a_prices_file_naming_a_platform_costwatch_does_not_know_is_one_clear_error(tmp_path):
    from costwatch.pricing import PriceFileError

    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {}, "platforms": {"azure-openai": {"models": {}}}}))
    with pytest.raises(PriceFileError, match=r"'azure-openai'.* choose from bedrock, vertex, foundry"):
        load_prices(path)


def test_bedrock_and_foundry_attempts_are_priced_from_their_platform_entry_end_to_end(
    accounting, tmp_path, monkeypatch
):
    table = _with_bedrock_prices(tmp_path, monkeypatch)
    costwatch.uninstrument()
    from costwatch.pipeline import Pipeline
    from costwatch.sinks import MemorySink

    pipeline, sink = Pipeline(), MemorySink()
    costwatch.instrument(pipeline=pipeline, sinks=[sink], listeners=[], prices=table)
    try:
        with FakeAnthropicServer() as server:
            clients = _clients(server.base_url)
            named = (
                (BEDROCK, "global.anthropic.claude-haiku-4-5-20251001-v1:0"),
                (BEDROCK, "us.anthropic.claude-haiku-4-5-20251001-v1:0"),
                (BEDROCK, "global.anthropic.claude-sonnet-4-5-20250929-v1:0"),
                (VERTEX, "claude-haiku-4-5@20251001"),
                (FOUNDRY, "claude-haiku-4-5"),
            )
            for platform, model in named:
                with clients[platform][0](max_retries=0) as client:
                    client.messages.create(
                        model=model, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
                    )
        assert costwatch.flush(10)
        records = sink.records
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()
    assert [(r.platform, r.endpoint) for r in records] == [
        (BEDROCK, GLOBAL),
        (BEDROCK, REGIONAL),
        (BEDROCK, GLOBAL),
        (VERTEX, REGIONAL),
        (FOUNDRY, None),
    ]
    global_, regional, no_price, vertex, foundry = records
    price = table.platforms[BEDROCK].models["claude-haiku-4-5-20251001"]
    assert global_.cost == price.cost(global_.usage)
    assert regional.cost is not None and regional.cost.total_usd == pytest.approx(
        1.1 * price.cost(regional.usage).total_usd
    )
    assert no_price.cost is None and vertex.cost is None
    assert foundry.cost == table.cost("claude-haiku-4-5", foundry.usage)
    # Repricing a stored record prices it the same way (its platform and endpoint are kept).
    assert [table.cost_of(r) for r in records] == [r.cost for r in records]


def test_costwatch_prices_says_how_each_platform_is_priced_and_where_that_is_stated(capsys):
    from costwatch.cli import main

    assert main(["prices"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "foundry (Claude in Microsoft Foundry): the rates above." in out
    assert "bedrock (Amazon Bedrock): its own prices, for no model (its attempts are unpriced);" in out
    assert "regional endpoints x1.1. source: https://platform.claude.com/" in out
