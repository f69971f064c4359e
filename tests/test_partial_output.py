"""count_partial_output: the text of a cut stream counted by the API's count_tokens, exact on the fake.

Every test drives the real SDK against the fake API over loopback; the fake counts with the tokenizer
it bills with, so a counted output must equal the ledger's billed output of the cut attempt, 0 off.
"""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
from typing import Any

import anthropic
import pytest
import sqlalchemy as sa
from conftest import raises_the_cut, sample_value
from prometheus_client import CollectorRegistry
from test_fault_matrix import accounted
from test_platforms import _clients

import costwatch
import costwatch.partial_output
from costwatch import Outcome, WasteReason
from costwatch.health import instrumentation_errors
from costwatch.metrics import MetricsSink
from costwatch.pipeline import Pipeline
from costwatch.platforms import BEDROCK, FOUNDRY, VERTEX
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, OutputSource, Usage
from costwatch.report import build_report, rollup_group_by
from costwatch.sinks import MemorySink
from costwatch.store import SqlStore
from costwatch.store.schema import ATTEMPTS
from costwatch.testing import BlockKind, BlockSpec, FakeAnthropicServer, Fault, ResponseSpec
from costwatch.testing.tokenizer import MESSAGE_FRAMING_TOKENS, REQUEST_FRAMING_TOKENS

HTTP_MODULE = importlib.import_module("httpx2" if anthropic.__version__.startswith("2") else "httpx")
MODEL = "claude-sonnet-4-5"
KEY = "sk-ant-count-test"

CONTENT = {
    "text": ResponseSpec(blocks=(BlockSpec(BlockKind.TEXT, 900),)),
    "thinking": ResponseSpec(blocks=(BlockSpec(BlockKind.THINKING, 900), BlockSpec(BlockKind.TEXT, 300))),
    "tool_input": ResponseSpec(blocks=(BlockSpec(BlockKind.TEXT, 40), BlockSpec(BlockKind.TOOL_USE, 700))),
    "bash_code_execution": ResponseSpec(blocks=(BlockSpec(BlockKind.BASH_CODE_EXECUTION, 700),)),
    "code_execution": ResponseSpec(blocks=(BlockSpec(BlockKind.CODE_EXECUTION, 700),)),
    "a_whole_agentic_turn": ResponseSpec(),  # thinking, text, code, text, tool input
}
CUTS = {  # after how many deltas each stream is cut: early, and deep into a later block
    "text": (7, 300),
    "thinking": (7, 500),
    "tool_input": (7, 300),
    "bash_code_execution": (7, 300),
    "code_execution": (7, 300),
    "a_whole_agentic_turn": (7, 1850),
}


def counting(**settings: Any) -> Any:
    """costwatch with count_partial_output on, records to memory (the fault matrix's setup)."""
    return accounted(count_partial_output=True, **settings)


def stream_sync(client: Any, model: str = MODEL) -> list[str]:
    """Read a stream to its end (or its cut); the event types the application saw."""
    seen: list[str] = []
    with client.messages.create(
        model=model, max_tokens=20_000, messages=[{"role": "user", "content": "go"}], stream=True
    ) as stream:
        for event in stream:
            seen.append(event.type)
    return seen


async def stream_async(client: Any) -> list[str]:
    seen: list[str] = []
    stream = await client.messages.create(
        model=MODEL, max_tokens=20_000, messages=[{"role": "user", "content": "go"}], stream=True
    )
    async with stream:
        async for event in stream:
            seen.append(event.type)
    return seen


def cut_once(server: FakeAnthropicServer, mode: str, deltas: int, **client_kw: Any) -> None:
    """One stream the server cuts after ``deltas`` deltas, read as the application would."""
    server.enqueue(Fault.cut_after_deltas(deltas))
    if mode == "sync":
        client = anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0, **client_kw)
        with raises_the_cut():
            stream_sync(client)
        return

    async def main() -> None:
        client = anthropic.AsyncAnthropic(base_url=server.base_url, api_key=KEY, max_retries=0, **client_kw)
        with raises_the_cut():
            await stream_async(client)
        await client.close()

    asyncio.run(main())


# -- exact on the fake -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("content", list(CONTENT))
def test_a_cut_streams_output_is_counted_exactly_as_the_fake_billed_it(content, mode):
    with counting() as (_, sink), FakeAnthropicServer(CONTENT[content]) as server:
        for deltas in CUTS[content]:
            cut_once(server, mode, deltas)
        assert costwatch.flush(30)
        records, entries = sink.records, server.ledger.entries
    assert len(records) == len(entries) == 2
    for record, entry in zip(records, entries, strict=True):
        assert record.outcome is Outcome.DROPPED
        assert record.output_source is OutputSource.COUNTED, record.to_dict()
        assert record.usage.output_tokens == entry.output_tokens  # 0 tokens off
        assert not record.usage.output_estimated and record.usage.estimated_output_tokens == 0
        assert record.usage.input_tokens == entry.input_tokens
        assert record.cost == load_prices().cost(MODEL, record.usage)


TOKENIZERS = [
    (script, scale)
    for script in ("latin", "cjk", "emoji_cjk")
    for scale in (0.6, 1.0, 1.6)
    if (script, scale) != ("latin", 1.0)  # the default: every test above
]
MIXED_BLOCKS = (
    BlockSpec(BlockKind.THINKING, 400),
    BlockSpec(BlockKind.TEXT, 300),
    BlockSpec(BlockKind.TOOL_USE, 200),
    BlockSpec(BlockKind.TEXT, 250),
    BlockSpec(BlockKind.TOOL_USE, 150),
)


@pytest.mark.parametrize(("script", "scale"), TOKENIZERS)
def test_counted_output_is_exact_in_every_script_and_at_every_scale_of_the_fakes_tokenizer(script, scale):
    # The fake bills and counts with one tokenizer (its spec's script and scale): a count of the text
    # of thinking, text and tool input that arrived, framing off, is the billed output, 0 tokens off.
    spec = ResponseSpec(blocks=MIXED_BLOCKS, script=script, chars_per_token_scale=scale)
    with counting() as (_, sink), FakeAnthropicServer(spec) as server:
        stream_sync(anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0))
        whole = server.ledger.entries[0].deltas_sent  # the same body: the same deltas, cut below
        # One delta; into the thinking; into the first text; into the last tool input (the blocks
        # before it joined to the blocks of their content type).
        for deltas in (1, whole // 8, whole // 2, whole - 15):
            cut_once(server, "sync", deltas)
        assert costwatch.flush(30)
        records, entries, counts = sink.records[1:], server.ledger.entries[1:], server.token_counts
    assert len(records) == len(entries) == 4
    assert entries[3].tokens_by_type.keys() == {"thinking", "text", "tool_input"}
    for record, entry in zip(records, entries, strict=True):
        assert record.output_source is OutputSource.COUNTED, record.to_dict()
        assert record.usage.output_tokens == entry.output_tokens  # 0 tokens off
    # The framing baseline: one one-character message, counted once, one token plus the framing.
    baseline = counts[0].body["messages"][0]["content"]
    assert baseline == "." and [c.body["messages"][0]["content"] for c in counts].count(".") == 1
    assert spec.tokenizer.count_request(counts[0].body) == REQUEST_FRAMING_TOKENS + MESSAGE_FRAMING_TOKENS + 1


def test_the_fakes_count_tokens_counts_with_the_tokenizer_it_bills_with():
    text = "\u6211\u4eec\u7684\u8bf7\u6c42 The request is the cost of a stream."
    answers = {}
    for scale in (0.6, 1.0, 1.6):
        with FakeAnthropicServer(ResponseSpec(chars_per_token_scale=scale)) as server:
            answered = HTTP_MODULE.post(
                server.base_url + "/v1/messages/count_tokens",
                json={"model": MODEL, "messages": [{"role": "user", "content": text}]},
                headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
            )
        framing = REQUEST_FRAMING_TOKENS + MESSAGE_FRAMING_TOKENS
        answers[scale] = answered.json()["input_tokens"] - framing
        assert answers[scale] == ResponseSpec(chars_per_token_scale=scale).tokenizer.count(text)
    assert answers[0.6] > answers[1.0] > answers[1.6]


def test_counts_go_to_the_same_base_url_and_route_with_the_same_key_as_user_messages():
    with counting() as (_, sink), FakeAnthropicServer(CONTENT["thinking"]) as server:
        gateway = server.base_url + "/gateway"
        server.enqueue(Fault.cut_after_deltas(500))  # into the text block: thinking and text arrived
        client = anthropic.Anthropic(base_url=gateway, api_key=KEY, max_retries=0)
        with raises_the_cut():
            stream_sync(client)
        assert costwatch.flush(30)
        (record,), (entry,), counts = sink.records, server.ledger.entries, server.token_counts
    assert record.output_source is OutputSource.COUNTED and record.usage.output_tokens == entry.output_tokens
    assert entry.tokens_by_type["thinking"] > 0 and entry.tokens_by_type["text"] > 0
    # A baseline for the model, then one count per content type that arrived.
    assert len(counts) == 3
    assert {c.path for c in counts} == {"/gateway/v1/messages/count_tokens"}
    assert {c.api_key_id for c in counts} == {entry.api_key_id} and entry.api_key_id is not None
    for count in counts:
        assert [m["role"] for m in count.body["messages"]] == ["user"]  # never an assistant prefill
        assert count.body["model"] == MODEL
    assert counts[0].body["messages"][0]["content"] == "."  # the baseline: one token and the framing


def test_the_baseline_is_counted_once_per_model():
    with counting() as (_, sink), FakeAnthropicServer(CONTENT["text"]) as server:
        for _ in range(3):
            cut_once(server, "sync", 50)
        assert costwatch.flush(30)
        assert len(server.token_counts) == 1 + 3
        assert [r.output_source for r in sink.records] == [OutputSource.COUNTED] * 3


def test_a_bearer_token_client_is_counted_with_its_token():
    with counting() as (_, sink), FakeAnthropicServer(CONTENT["text"]) as server:
        server.enqueue(Fault.cut_after_deltas(40))
        client = anthropic.Anthropic(base_url=server.base_url, auth_token="bearer-count-test", max_retries=0)
        with raises_the_cut():
            stream_sync(client)
        assert costwatch.flush(30)
        (record,), (entry,) = sink.records, server.ledger.entries
    assert record.output_source is OutputSource.COUNTED and record.usage.output_tokens == entry.output_tokens


def test_a_retry_arriving_before_the_count_flips_the_counted_record():
    with counting() as (_, sink), FakeAnthropicServer(CONTENT["text"]) as server:
        server.count_tokens_delay_s = 0.5  # the application resends while the count is on its way
        server.enqueue(Fault.cut_after_deltas(60), None)
        client = anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0)
        with raises_the_cut():
            stream_sync(client)
        stream_sync(client)
        assert costwatch.flush(30)  # waits for the count
        records, entries = sink.records, server.ledger.entries
    latest = {r.attempt_id: r for r in sorted(records, key=lambda r: r.revision)}
    cut, retry = sorted(latest.values(), key=lambda r: r.attempt_number)
    assert cut.waste_reason is WasteReason.RETRIED and cut.output_source is OutputSource.COUNTED
    assert cut.usage.output_tokens == entries[0].output_tokens
    assert retry.outcome is Outcome.COMPLETED and retry.output_source is OutputSource.REPORTED
    # Nothing went out with the estimate: every revision of the cut attempt carries the count.
    assert all(r.output_source is OutputSource.COUNTED for r in records if r.attempt_id == cut.attempt_id)


def test_a_retry_after_the_count_flips_the_record_with_its_count():
    with counting() as (_, sink), FakeAnthropicServer(CONTENT["text"]) as server:
        server.enqueue(Fault.cut_after_deltas(60), None)
        client = anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0)
        with raises_the_cut():
            stream_sync(client)
        assert costwatch.flush(30)
        (first,) = sink.records
        assert first.waste_reason is WasteReason.ABANDONED and first.output_source is OutputSource.COUNTED
        stream_sync(client)
        assert costwatch.flush(30)
        flipped = [r for r in sink.records if r.attempt_id == first.attempt_id and r.revision == 1]
    assert len(flipped) == 1 and flipped[0].waste_reason is WasteReason.RETRIED
    assert flipped[0].usage == first.usage and flipped[0].cost == first.cost


# -- falling back to the estimate ------------------------------------------------------------------
def estimate_without_counting(spec: ResponseSpec, deltas: int) -> AttemptRecord:
    pipeline, sink = Pipeline(), MemorySink()
    costwatch.instrument(pipeline=pipeline, sinks=[sink], listeners=[], prices=load_prices())
    try:
        with FakeAnthropicServer(spec) as server:
            cut_once(server, "sync", deltas)
            assert costwatch.flush(30)
            (record,) = sink.records
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()
    return record


@pytest.mark.parametrize(
    "failure",
    [Fault.internal_server_error(), Fault.rate_limited(retry_after_s=0), Fault.reset(), "timeout"],
    ids=["500", "429", "reset", "timeout"],
)
def test_a_count_that_fails_leaves_the_estimate_and_is_counted_as_an_instrumentation_error(
    failure, monkeypatch, caplog
):
    if failure == "timeout":
        monkeypatch.setattr(costwatch.partial_output, "CALL_TIMEOUT_S", 0.5)
        failure = Fault.stall_before_headers(5)
    estimated = estimate_without_counting(CONTENT["text"], 80)
    before = instrumentation_errors.by_place().get("count_partial_output", 0)
    with counting() as (_, sink), FakeAnthropicServer(CONTENT["text"]) as server:
        server.enqueue_count_tokens(failure)
        cut_once(server, "sync", 80)
        assert costwatch.flush(30)
        (record,) = sink.records
    assert record.output_source is OutputSource.ESTIMATED
    assert record.usage == estimated.usage and record.cost == estimated.cost
    assert instrumentation_errors.by_place()["count_partial_output"] == before + 1


def test_beyond_the_rate_limit_a_record_keeps_its_estimate_once_its_wait_is_over(monkeypatch):
    monkeypatch.setattr(costwatch.partial_output, "HOLD_S", 0.3)
    with (
        counting(count_partial_output_rate=0.01) as (_, sink),
        FakeAnthropicServer(CONTENT["text"]) as server,
    ):
        # 11 calls: the baseline and 10 counts. A burst of 10 go at once; the 11th would wait 100 s.
        for _ in range(10):
            cut_once(server, "sync", 20)
        assert costwatch.flush(30)
        sources = [r.output_source for r in sink.records]
        assert len(server.token_counts) == costwatch.partial_output.BURST_CALLS
    assert sources.count(OutputSource.COUNTED) == costwatch.partial_output.BURST_CALLS - 1
    assert sources.count(OutputSource.ESTIMATED) == 1


def test_platform_attempts_are_not_counted():
    with counting() as (_, sink), FakeAnthropicServer(CONTENT["text"]) as server:
        clients = _clients(server.base_url)
        for platform, model in (
            (BEDROCK, "us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
            (VERTEX, "claude-sonnet-4-5@20250929"),
            (FOUNDRY, MODEL),
        ):
            server.enqueue(Fault.cut_after_deltas(30))
            with (
                clients[platform][0](max_retries=0) as client,
                raises_the_cut(),
            ):
                stream_sync(client, model)
        assert costwatch.flush(30)
        records = sink.records
        assert server.token_counts == []
    assert [r.output_source for r in records] == [OutputSource.ESTIMATED] * 3


# -- the report and the metrics --------------------------------------------------------------------
def test_report_and_metrics_split_counted_output_from_reported(tmp_path):
    registry = CollectorRegistry()
    metrics = MetricsSink(registry=registry, retry_window_s=600, workflow_label_limit=5, model_label_limit=5)
    store = SqlStore(f"sqlite:///{tmp_path / 'costwatch.db'}")
    pipeline = Pipeline()
    costwatch.instrument(
        pipeline=pipeline,
        sinks=[store, metrics],
        listeners=[],
        prices=load_prices(),
        count_partial_output=True,
    )
    try:
        with FakeAnthropicServer(CONTENT["text"]) as server:
            server.enqueue(Fault.cut_after_deltas(120), None)
            client = anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0)
            with raises_the_cut():
                stream_sync(client)
            stream_sync(client)
            assert costwatch.flush(30)
            cut, completed = server.ledger.entries
        report = build_report(store.rollup_totals(group_by=rollup_group_by("model")), "model")
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()
    split = report["output_by_source"]
    assert split["counted"]["tokens"] == cut.output_tokens
    assert split["reported"]["tokens"] == completed.output_tokens
    assert split["estimated"]["tokens"] == 0 and report["estimated_output_tokens"] == 0
    counted_cost = load_prices().cost(MODEL, Usage(output_tokens=cut.output_tokens))
    assert split["counted"]["cost_usd"] == pytest.approx(counted_cost.output_usd)
    for source, figures in split.items():
        assert (
            sample_value(registry, "costwatch_output_tokens_total", model=MODEL, source=source)
            == (figures["tokens"])
        )


# -- the fake's count_tokens -----------------------------------------------------------------------
def test_the_fakes_count_tokens_answers_without_billing_and_refuses_what_the_api_refuses():
    with FakeAnthropicServer() as server:
        url = server.base_url + "/v1/messages/count_tokens"
        headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
        user = {"model": MODEL, "messages": [{"role": "user", "content": " the request"}]}
        prefill = {"model": MODEL, "messages": [*user["messages"], {"role": "assistant", "content": " the"}]}
        answered = HTTP_MODULE.post(url, json=user, headers=headers)
        refused = HTTP_MODULE.post(url, json=prefill, headers=headers)
        keyless = HTTP_MODULE.post(url, json=user, headers={"anthropic-version": "2023-06-01"})
        assert server.ledger.entries == ()  # free: no attempt was billed
    assert answered.status_code == 200
    assert answered.json() == {"input_tokens": REQUEST_FRAMING_TOKENS + MESSAGE_FRAMING_TOKENS + 2}
    assert refused.status_code == 400 and "prefill" in refused.json()["error"]["message"]
    assert keyless.status_code == 401


EXITING_CHILD = """
import sys
import anthropic
import costwatch

url, base_url = sys.argv[1], sys.argv[2]
costwatch.instrument(
    database_url=url, spool_dir=sys.argv[3], metrics=False, listeners=[], count_partial_output=True
)
client = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-exit-test", max_retries=0)
try:
    messages = [{"role": "user", "content": "go"}]
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=9000, messages=messages) as s:
        for _ in s.text_stream:
            pass
except Exception as exc:  # anthropic 2.17 on wraps the cut in an APIConnectionError
    cut = exc.__cause__ if isinstance(exc, anthropic.APIConnectionError) else exc
    print(type(cut).__name__, flush=True)
# no flush(): the count is made while the interpreter exits
"""


def test_a_script_that_exits_right_after_a_drop_stores_its_counted_output(tmp_path):
    url = f"sqlite:///{tmp_path / 'costwatch.db'}"
    with FakeAnthropicServer(CONTENT["text"]) as server:
        server.count_tokens_delay_s = 0.3
        server.enqueue(Fault.cut_after_deltas(90))
        done = subprocess.run(
            [sys.executable, "-c", EXITING_CHILD, url, server.base_url, str(tmp_path / "spool")],
            capture_output=True,
            text=True,
            timeout=240,  # seconds idle; minutes at load 15 with the suite on several workers
        )
        (entry,) = server.ledger.entries
    assert done.returncode == 0 and done.stdout.strip() == "RemoteProtocolError", done.stderr
    store = SqlStore(url)
    try:
        with store.engine.connect() as connection:
            (row,) = connection.execute(
                sa.select(ATTEMPTS.c.outcome, ATTEMPTS.c.output_source, ATTEMPTS.c.output_tokens)
            ).all()
    finally:
        store.shutdown()
    assert tuple(row) == ("dropped", "counted", entry.output_tokens)
