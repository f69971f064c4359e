"""costwatch.instrument(): every SDK attempt becomes a record whose tokens match what the server billed."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import threading

import anthropic
import pytest
from conftest import async_client, raises_the_cut, sync_client

import costwatch
from costwatch import Outcome, WasteReason
from costwatch.health import instrumentation_errors
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.testing import BlockKind, BlockSpec, FakeAnthropicServer, Fault, ResponseSpec

MODEL = "claude-haiku-4-5"
MESSAGES = [{"role": "user", "content": "Refactor the billing module."}]
BETAS = ["code-execution-2025-08-25"]
HTTP_MODULE = importlib.import_module("httpx2" if anthropic.__version__.startswith("2") else "httpx")


def resource(client, beta: bool):
    return client.beta.messages if beta else client.messages


def extra(beta: bool) -> dict:
    return {"betas": BETAS} if beta else {}


def create(client, beta=False, **kw):
    return resource(client, beta).create(model=MODEL, max_tokens=8192, messages=MESSAGES, **extra(beta), **kw)


def create_stream(client, beta=False, **kw):
    return list(create(client, beta, stream=True, **kw))


def stream_helper(client, beta=False, **kw):
    with resource(client, beta).stream(
        model=MODEL, max_tokens=8192, messages=MESSAGES, **extra(beta), **kw
    ) as s:
        "".join(s.text_stream)
        return s.get_final_message()


async def acreate(client, beta=False, **kw):
    return await resource(client, beta).create(
        model=MODEL, max_tokens=8192, messages=MESSAGES, **extra(beta), **kw
    )


async def acreate_stream(client, beta=False, **kw):
    return [event async for event in await acreate(client, beta, stream=True, **kw)]


async def astream_helper(client, beta=False, **kw):
    async with resource(client, beta).stream(
        model=MODEL, max_tokens=8192, messages=MESSAGES, **extra(beta), **kw
    ) as s:
        async for _ in s.text_stream:
            pass
        return await s.get_final_message()


SYNC_CALLS = {"create": create, "create_stream": create_stream, "stream": stream_helper}
ASYNC_CALLS = {"create": acreate, "create_stream": acreate_stream, "stream": astream_helper}


def call(server, mode: str, name: str, beta: bool = False, **client_kw):
    """Make one SDK call of the given shape, sync or async, and return its result."""
    if mode == "sync":
        return SYNC_CALLS[name](sync_client(server, **client_kw), beta)

    async def run():
        return await ASYNC_CALLS[name](async_client(server, **client_kw), beta)

    return asyncio.run(run())


def assert_billed_like_ledger(record, entry, *, output_exact=True):
    usage = record.usage
    assert usage.input_tokens == entry.input_tokens
    assert usage.cache_read_tokens == entry.cache_read_tokens
    assert usage.cache_write_5m_tokens == entry.cache_write_5m_tokens
    assert usage.cache_write_1h_tokens == entry.cache_write_1h_tokens
    if output_exact:
        assert usage.output_tokens == entry.output_tokens
        assert not usage.output_estimated
    assert record.request_id == entry.request_id


CACHED = ResponseSpec(
    input_tokens=120_000, cache_read_tokens=30_000, cache_write_5m_tokens=2_000, cache_write_1h_tokens=500
)


@pytest.mark.parametrize("beta", [False, True], ids=["messages", "beta"])
@pytest.mark.parametrize("name", list(SYNC_CALLS))
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_every_entry_point_records_one_completed_attempt_billed_like_the_ledger(accounting, mode, name, beta):
    with FakeAnthropicServer(CACHED) as server:
        call(server, mode, name, beta)
        (entry,) = server.ledger.entries
    (record,) = accounting.records()
    assert record.outcome is Outcome.COMPLETED
    assert_billed_like_ledger(record, entry)
    assert record.stream is (name != "create")
    assert record.model_requested == MODEL and record.model == entry.model
    assert record.message_id == entry.message_id
    assert record.beta_features == (tuple(BETAS) if beta else ())
    assert record.attempt_number == 1 and record.sdk_retry == 0
    assert not record.wasted and record.waste_reason is None
    assert record.cost is not None and record.cost.total_usd > 0
    assert record.duration_s > 0
    if record.stream:
        assert record.events_received == entry.events_sent
        assert (
            record.time_to_first_token_s is not None and 0 < record.time_to_first_token_s <= record.duration_s
        )


def warm_up(server, count: int = 6) -> None:
    """Completed streams calibrate the output estimator, as they do in production."""
    client = sync_client(server)
    for _ in range(count):
        create_stream(client)


@pytest.mark.parametrize("name", ["create_stream", "stream"])
def test_scripted_drops_bill_exact_input_and_estimate_partial_output_within_ten_percent(accounting, name):
    with FakeAnthropicServer(CACHED) as server:
        warm_up(server)
        server.ledger.clear()
        accounting.forget()
        server.enqueue(Fault.cut_after_deltas(40), Fault.cut_after_deltas(900), None)
        client = sync_client(server)
        for _ in range(2):
            with raises_the_cut():
                SYNC_CALLS[name](client)
        SYNC_CALLS[name](client)
        entries = server.ledger.entries
    records = accounting.records()
    assert [r.outcome for r in records] == [Outcome.DROPPED, Outcome.DROPPED, Outcome.COMPLETED]
    assert len({r.logical_request_id for r in records}) == 1
    assert [r.attempt_number for r in records] == [1, 2, 3]
    for record, entry in zip(records, entries, strict=True):
        assert_billed_like_ledger(record, entry, output_exact=record.outcome is Outcome.COMPLETED)
    dropped = records[:2]
    assert all(
        r.usage.output_estimated and r.usage.estimated_output_tokens == r.usage.output_tokens for r in dropped
    )
    assert [r.output_source.value for r in records] == ["estimated", "estimated", "reported"]
    estimated = sum(r.usage.output_tokens for r in dropped)
    truth = sum(e.output_tokens for e in entries[:2])
    assert abs(estimated - truth) <= 0.10 * truth, (estimated, truth)
    assert all(r.wasted and r.waste_reason is WasteReason.RETRIED for r in dropped)
    assert records[2].wasted is False


def test_a_drop_is_abandoned_waste_until_the_application_retries(accounting):
    with FakeAnthropicServer(ResponseSpec.small(200)) as server:
        server.enqueue(Fault.cut_after_deltas(10), None)
        client = sync_client(server)
        with raises_the_cut():
            create_stream(client)
        (dropped,) = accounting.records()
        assert dropped.waste_reason is WasteReason.ABANDONED and dropped.wasted_tokens > 0
        create_stream(client)
    first, retry = accounting.records()
    assert first.attempt_id == dropped.attempt_id
    assert first.waste_reason is WasteReason.RETRIED and first.revision == 1
    assert retry.logical_request_id == first.logical_request_id and retry.attempt_number == 2


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sdk_internal_retries_are_unbilled_attempts_of_the_same_logical_request(accounting, mode):
    with FakeAnthropicServer(ResponseSpec.small(30)) as server:
        server.enqueue(Fault.overloaded(), Fault.internal_server_error(), None)
        call(server, mode, "create", max_retries=2)
        entries = server.ledger.entries
    records = accounting.records()
    assert [r.outcome for r in records] == [Outcome.HTTP_ERROR, Outcome.HTTP_ERROR, Outcome.COMPLETED]
    assert [r.http_status for r in records] == [529, 500, 200]
    assert [r.api_error_type for r in records[:2]] == ["overloaded_error", "api_error"]
    assert [r.sdk_retry for r in records] == [0, 1, 2]
    assert [r.attempt_number for r in records] == [1, 2, 3]
    assert len({r.logical_request_id for r in records}) == 1
    assert [r.usage.billed_tokens for r in records[:2]] == [0, 0]
    assert not any(r.wasted for r in records)
    assert [e.billed for e in entries] == [False, False, True]


def test_an_sse_error_event_is_a_stream_error_whose_billed_tokens_are_wasted(accounting):
    with FakeAnthropicServer(ResponseSpec.small(300)) as server:
        server.enqueue(Fault.error_event(after_deltas=20))
        with pytest.raises(anthropic.APIStatusError):
            create_stream(sync_client(server, max_retries=0))
        (entry,) = server.ledger.entries
    (record,) = accounting.records()
    assert record.outcome is Outcome.STREAM_ERROR and record.api_error_type == "overloaded_error"
    assert record.usage.input_tokens == entry.input_tokens and record.usage.output_estimated
    assert record.waste_reason is WasteReason.ABANDONED


def test_a_connection_reset_before_any_response_is_an_unbilled_connect_error(accounting):
    with FakeAnthropicServer(ResponseSpec.small(10)) as server:
        server.enqueue(Fault.reset())
        with pytest.raises(anthropic.APIConnectionError):
            create(sync_client(server, max_retries=0))
    (record,) = accounting.records()
    assert record.outcome is Outcome.CONNECT_ERROR and record.usage.billed_tokens == 0
    assert record.http_status is None and record.error_type is not None and not record.wasted


def test_breaking_out_of_a_stream_closes_it_and_records_a_cancelled_attempt(accounting):
    with FakeAnthropicServer(ResponseSpec.small(2000)) as server:
        client = sync_client(server)
        with client.messages.stream(model=MODEL, max_tokens=8192, messages=MESSAGES) as stream:
            for _ in stream.text_stream:
                break
        assert stream.response.is_closed
        (record,) = accounting.records()
    assert record.outcome is Outcome.CANCELLED and record.error_type is None
    assert record.usage.output_estimated and record.usage.input_tokens > 0
    assert record.wasted and record.waste_reason is WasteReason.CANCELLED


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_the_application_stopped_reading_stays_cancelled_waste_when_the_same_body_is_sent_again(
    accounting, mode
):
    with FakeAnthropicServer(ResponseSpec.small(2000)) as server:
        if mode == "sync":
            client = sync_client(server)
            for event in client.messages.create(model=MODEL, max_tokens=8192, messages=MESSAGES, stream=True):
                if event.type == "content_block_delta":
                    break
            create_stream(client)
        else:

            async def run():
                client = async_client(server)
                stream = await client.messages.create(
                    model=MODEL, max_tokens=8192, messages=MESSAGES, stream=True
                )
                async for event in stream:
                    if event.type == "content_block_delta":
                        break
                await stream.close()
                await acreate_stream(client)

            asyncio.run(run())
    cancelled, again = sorted(accounting.records(), key=lambda r: r.started_at)
    assert cancelled.outcome is Outcome.CANCELLED and cancelled.waste_reason is WasteReason.CANCELLED
    assert cancelled.revision == 0 and cancelled.wasted_tokens > 0
    assert again.outcome is Outcome.COMPLETED and again.attempt_number == 1
    assert again.logical_request_id != cancelled.logical_request_id


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    ("fault", "seen"),
    [(Fault.malformed_then_end(6), "JSONDecodeError"), (Fault.non_utf8_then_end(6), "UnicodeDecodeError")],
    ids=["malformed-json", "non-utf8"],
)
def test_an_unreadable_event_then_a_normal_end_records_the_exception_the_application_saw(
    accounting, mode, fault, seen
):
    with FakeAnthropicServer(ResponseSpec.small(300)) as server:
        server.enqueue(fault)
        with pytest.raises(Exception) as raised:
            call(server, mode, "create_stream", max_retries=0)
    (entry,) = server.ledger.entries  # once stopped: the server may still be writing what nobody reads
    assert type(raised.value).__name__ == seen
    (record,) = accounting.records()
    assert record.outcome is Outcome.STREAM_ERROR and record.error_type == seen
    assert record.usage.input_tokens == entry.input_tokens
    assert record.waste_reason is WasteReason.ABANDONED and record.wasted_tokens > 0


def test_an_unknown_event_then_a_normal_end_is_completed_and_exact(accounting):
    with FakeAnthropicServer(ResponseSpec.small(300)) as server:
        server.enqueue(Fault.unknown_event(6))
        create_stream(sync_client(server, max_retries=0))
        (entry,) = server.ledger.entries
    (record,) = accounting.records()
    assert record.outcome is Outcome.COMPLETED and record.error_type is None
    assert_billed_like_ledger(record, entry)


def test_a_non_streaming_body_cut_mid_way_is_a_dropped_attempt_the_sdk_retries(accounting):
    with FakeAnthropicServer(ResponseSpec.small(50)) as server:
        server.enqueue(Fault.cut_after_bytes(40), None)
        message = create(sync_client(server, max_retries=1))
    assert message.usage.output_tokens == 50
    dropped, completed = accounting.records()
    assert dropped.outcome is Outcome.DROPPED and dropped.error_type == "RemoteProtocolError"
    assert (
        completed.outcome is Outcome.COMPLETED and completed.logical_request_id == dropped.logical_request_id
    )


def failing_call(server, fault):
    server.enqueue(fault)
    try:
        create_stream(sync_client(server, max_retries=0))
    except Exception as exc:
        return exc
    raise AssertionError("the call should have failed")


def comparable(exc: BaseException) -> str:
    return re.sub(r"req_\w+", "req_…", str(exc))  # every attempt has its own request id


@pytest.mark.parametrize(
    "fault",
    [Fault.cut_after_deltas(5), Fault.error_event(after_deltas=3), Fault.overloaded(), Fault.reset()],
    ids=["cut", "error_event", "529", "reset"],
)
def test_the_application_sees_exactly_the_exception_it_would_without_costwatch(fault):
    with FakeAnthropicServer(ResponseSpec.small(100)) as server:
        bare = failing_call(server, fault)
        pipeline = Pipeline()
        costwatch.instrument(pipeline=pipeline, sinks=[], listeners=[])
        try:
            seen = failing_call(server, fault)
        finally:
            costwatch.uninstrument()
            pipeline.shutdown()
    assert type(seen) is type(bare)
    assert comparable(seen) == comparable(bare)
    assert type(seen.__cause__) is type(bare.__cause__)
    assert type(seen.__context__) is type(bare.__context__)
    assert seen.__suppress_context__ == bare.__suppress_context__


def test_a_bug_inside_the_hooks_is_counted_and_never_reaches_the_application(accounting, monkeypatch):
    def broken_feed(self, chunk):
        raise RuntimeError("injected bug")

    monkeypatch.setattr("costwatch.stream_meter.BodyMeter.feed", broken_feed)
    before = instrumentation_errors.total
    with FakeAnthropicServer(ResponseSpec.small(40)) as server:
        message = stream_helper(sync_client(server))
        (entry,) = server.ledger.entries
    assert message.usage.output_tokens == entry.output_tokens == 40
    assert instrumentation_errors.total > before
    assert len(accounting.records()) == 1


def test_tags_and_logical_requests_stay_with_their_own_thread(accounting):
    with FakeAnthropicServer(ResponseSpec.small(5)) as server:

        def work(i: int) -> None:
            client = sync_client(server)
            with costwatch.tags(workflow=f"wf-{i}"), costwatch.logical_request(f"job-{i}"):
                create(client)
                create(client)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    records = accounting.records()
    assert len(records) == 16
    for r in records:
        i = r.logical_request_id.removeprefix("job-")
        assert r.tags == {"workflow": f"wf-{i}"}
    for i in range(8):
        numbers = sorted(r.attempt_number for r in records if r.logical_request_id == f"job-{i}")
        assert numbers == [1, 2]


def test_tags_follow_asyncio_tasks_without_leaking_between_them(accounting):
    with FakeAnthropicServer(ResponseSpec.small(5, event_interval_s=0.001)) as server:

        async def one(client, i: int) -> None:
            with costwatch.tags(workflow=f"task-{i}"):
                await acreate_stream(client)

        async def main() -> None:
            client = async_client(server)
            with costwatch.tags(team="search"):
                await asyncio.gather(*(one(client, i) for i in range(10)))

        asyncio.run(main())
    records = accounting.records()
    assert sorted(r.tags["workflow"] for r in records) == sorted(f"task-{i}" for i in range(10))
    assert all(r.tags["team"] == "search" for r in records)


def test_nothing_of_the_prompt_completion_or_api_key_is_kept(accounting):
    secret_prompt = "SENTINEL-PROMPT-7f3a"
    with FakeAnthropicServer(ResponseSpec.small(30)) as server:
        client = sync_client(server)
        client.messages.create(
            model=MODEL,
            max_tokens=100,
            system="SENTINEL-SYSTEM-91",
            messages=[{"role": "user", "content": secret_prompt}],
        )
        completion = create(client).content[0].text
    dumped = json.dumps([r.to_dict() for r in accounting.records()])
    for secret in (secret_prompt, "SENTINEL-SYSTEM-91", "sk-ant-test-key", completion[:20]):
        assert secret not in dumped


def test_instrument_twice_does_nothing_and_uninstrument_restores_the_same_functions():
    classes = (HTTP_MODULE.Client, HTTP_MODULE.AsyncClient)
    originals = {cls: (cls.send, "send" in cls.__dict__) for cls in classes}
    assert costwatch.instrument(pipeline=Pipeline(), sinks=[], listeners=[]) is True
    try:
        assert costwatch.instrument(pipeline=Pipeline(), sinks=[], listeners=[]) is False
        assert all(cls.send is not fn for cls, (fn, _) in originals.items())
    finally:
        assert costwatch.uninstrument() is True
    assert costwatch.uninstrument() is False
    for cls, (fn, own) in originals.items():
        assert cls.send is fn
        assert ("send" in cls.__dict__) is own


def test_instrumenting_one_client_leaves_other_clients_unaccounted():
    pipeline = Pipeline()
    sink = costwatch.MemorySink()
    with FakeAnthropicServer(ResponseSpec.small(5)) as server:
        watched, other = sync_client(server), sync_client(server)
        costwatch.instrument(watched, pipeline=pipeline, sinks=[sink], listeners=[])
        try:
            create(watched)
            create(other)
            costwatch.flush(10)
        finally:
            costwatch.uninstrument()
            pipeline.shutdown()
        assert len(server.ledger.entries) == 2
    assert len(sink.records) == 1


def test_instrumenting_a_second_client_adds_it_and_says_nothing_was_installed():
    pipeline = Pipeline()
    sink = costwatch.MemorySink()
    with FakeAnthropicServer(ResponseSpec.small(5)) as server:
        first, second, other = sync_client(server), sync_client(server), sync_client(server)
        assert costwatch.instrument(first, pipeline=pipeline, sinks=[sink], listeners=[]) is True
        try:
            assert costwatch.instrument(second) is False
            for client in (first, second, other):
                create(client)
            costwatch.flush(10)
        finally:
            costwatch.uninstrument()
            pipeline.shutdown()
        assert len(server.ledger.entries) == 3
    assert len(sink.records) == 2


def test_other_http_traffic_is_passed_through_untouched(accounting):
    with FakeAnthropicServer(ResponseSpec.small(5)) as server:
        response = HTTP_MODULE.post(
            f"{server.base_url}/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": MESSAGES}
        )
        assert response.status_code == 200
        response = HTTP_MODULE.get(f"{server.base_url}/v1/models")
    assert accounting.records() == []


def test_unknown_models_keep_their_tokens_and_get_no_price(accounting):
    with FakeAnthropicServer(ResponseSpec.small(5, model="claude-from-the-future-9")) as server:
        create(sync_client(server))
        (entry,) = server.ledger.entries
    (record,) = accounting.records()
    assert record.model == "claude-from-the-future-9" and record.cost is None and not record.priced
    assert record.usage.output_tokens == entry.output_tokens == 5


def test_code_execution_and_tool_blocks_count_toward_the_estimate(accounting):
    spec = ResponseSpec(
        blocks=(BlockSpec(BlockKind.BASH_CODE_EXECUTION, 400), BlockSpec(BlockKind.TOOL_USE, 400))
    )
    with FakeAnthropicServer(spec) as server:
        server.enqueue(Fault.cut_after_deltas(150))
        with raises_the_cut():
            create_stream(sync_client(server), beta=True)
        (entry,) = server.ledger.entries
    (record,) = accounting.records()
    assert record.usage.output_estimated and record.usage.output_tokens > 0
    assert abs(record.usage.output_tokens - entry.output_tokens) <= 0.5 * entry.output_tokens


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_body_that_ends_cleanly_before_message_stop_is_dropped_not_cancelled(accounting, mode):
    with FakeAnthropicServer(ResponseSpec.small(200)) as server:
        server.enqueue(Fault.end_early(after_deltas=25))
        events = call(server, mode, "create_stream")
        (entry,) = server.ledger.entries
    assert events[-1].type == "content_block_delta"  # the application saw no error, just less text
    (record,) = accounting.records()
    assert record.outcome is Outcome.DROPPED and record.error_type is None
    assert record.usage.output_estimated and record.usage.input_tokens == entry.input_tokens
    assert record.waste_reason is WasteReason.ABANDONED


def test_a_stream_freed_by_the_garbage_collector_inside_a_costwatch_lock_does_not_deadlock(accounting):
    import gc

    tracker = costwatch.instrumentation._hooks.accountant.tracker
    with FakeAnthropicServer(ResponseSpec.small(500)) as server:
        client = sync_client(server)
        gc.disable()  # so that the abandoned stream is freed exactly where the test collects
        try:
            manager = client.messages.stream(model=MODEL, max_tokens=8192, messages=MESSAGES)
            stream = manager.__enter__()  # never exited: the application forgot about it
            next(iter(stream.text_stream))
            del manager, stream

            def collect_while_holding_the_lock() -> None:
                with tracker._lock:  # as if the collector ran while this thread was inside the tracker
                    gc.collect()

            worker = threading.Thread(target=collect_while_holding_the_lock, daemon=True)
            worker.start()
            worker.join(10)
        finally:
            gc.enable()
        assert not worker.is_alive(), "the finalizer deadlocked on costwatch's own lock"
        (record,) = accounting.records()
    assert record.outcome is Outcome.CANCELLED


def test_uninstrument_keeps_a_wrapper_another_library_stacked_on_ours_and_stops_accounting():
    pipeline = Pipeline()
    sink = costwatch.MemorySink()
    cls = HTTP_MODULE.Client
    original, own = cls.send, "send" in cls.__dict__
    seen: list[str] = []
    with FakeAnthropicServer(ResponseSpec.small(5)) as server:
        costwatch.instrument(pipeline=pipeline, sinks=[sink], listeners=[])
        ours = cls.send

        def theirs(self, request, *args, **kwargs):
            seen.append(request.url.path)
            return ours(self, request, *args, **kwargs)

        cls.send = theirs
        try:
            client = sync_client(server)
            create(client)
            costwatch.flush(10)
            assert costwatch.uninstrument() is True
            assert cls.send is theirs  # their wrapper is still there, still calling ours
            create(client)
        finally:
            if own:
                cls.send = original
            else:
                del cls.send
            pipeline.shutdown()
        assert len(server.ledger.entries) == 2
    assert len(seen) == 2
    assert len(sink.records) == 1  # the request after uninstrument() was passed through unaccounted


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_of_an_instrumented_process_runs_a_settler_thread_of_its_own():
    pipeline = Pipeline()
    costwatch.instrument(pipeline=pipeline, sinks=[], listeners=[])
    try:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report whether its settler thread runs, then leave at once
            from costwatch.instrumentation import _settler

            alive = _settler._thread is not None and _settler._thread.is_alive()
            os.write(write_end, b"alive" if alive else b"dead")
            os._exit(0)
        os.close(write_end)
        answer = os.read(read_end, 16)
        os.close(read_end)
        os.waitpid(pid, 0)
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()
    assert answer == b"alive"


@pytest.mark.parametrize("stream", [False, True])
def test_us_only_inference_and_web_searches_reported_in_usage_are_recorded_and_priced(accounting, stream):
    spec = ResponseSpec.small(
        5, model="claude-opus-4-6", inference_geo="us", server_tool_use={"web_search_requests": 4}
    )
    with FakeAnthropicServer(spec) as server:
        if stream:
            create_stream(sync_client(server))
        else:
            create(sync_client(server))
    (record,) = accounting.records()
    assert record.inference_geo == "us"
    assert record.server_tool_use["web_search_requests"] == 4
    prices = load_prices()
    tokens_only = prices.cost("claude-opus-4-6", record.usage)
    assert record.cost is not None and tokens_only is not None
    assert record.cost.server_tool_usd == pytest.approx(0.04)
    assert record.cost.total_usd == pytest.approx(tokens_only.total_usd * 1.1 + 0.04)


def test_the_sdk_takes_costwatch_parse_of_a_non_streaming_body_instead_of_parsing_it_again(
    accounting, monkeypatch
):
    parses: list[object] = []
    raw_decode = json.JSONDecoder.raw_decode  # under json.loads and every other JSONDecoder's decode

    def counted(self, *args, **kwargs):
        parsed = raw_decode(self, *args, **kwargs)
        if isinstance(parsed[0], dict) and parsed[0].get("type") == "message":  # not the fake's requests
            parses.append(parsed[0])
        return parsed

    with FakeAnthropicServer(ResponseSpec.small(20)) as server:
        client = sync_client(server, max_retries=0)
        bare = create(client)  # warm: the SDK's first call may parse more than the body
        monkeypatch.setattr(json.JSONDecoder, "raw_decode", counted)
        message = create(client)
        raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=8192, messages=MESSAGES)
        first, second = raw.http_response.json(), raw.http_response.json()
        monkeypatch.undo()
    assert len(parses) == 3  # one per answer, then the raw response's second json()
    assert message.model_dump(exclude={"id"}) == bare.model_dump(exclude={"id"})
    # Each caller owns what it gets: a later call parses afresh, and costwatch's json() is gone.
    assert first == second and first is not second and "json" not in vars(raw.http_response)
    assert raw.parse().usage.output_tokens == 20
    assert [record.usage.output_tokens for record in accounting.records()] == [20, 20, 20]


class _Noting:
    """A listener without ``is_listening``, which notes what it is told: told of every attempt."""

    def __init__(self) -> None:
        self.told: list[str] = []

    def attempt_started(self, attempt):
        self.told.append("started")
        return attempt.attempt_id

    def attempt_finished(self, state, record):
        self.told.append("finished" if state == record.attempt_id else "finished with another state")


class _SometimesListening(_Noting):
    """Listens only while ``on`` is set."""

    on = False

    def is_listening(self) -> bool:
        return self.on


def test_a_listener_that_is_not_listening_when_an_attempt_is_sent_is_told_of_neither_its_start_nor_end():
    sometimes, always = _SometimesListening(), _Noting()
    pipeline = Pipeline()
    assert costwatch.instrument(pipeline=pipeline, sinks=[], listeners=[sometimes, always])
    try:
        with FakeAnthropicServer(ResponseSpec.small(5)) as server:
            client = sync_client(server)
            create(client)
            sometimes.on = True
            create(client)
            create_stream(client)
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()
    assert sometimes.told == ["started", "finished"] * 2
    assert always.told == ["started", "finished"] * 3


@pytest.mark.sdk
@pytest.mark.parametrize(
    "raw",
    [
        [],
        [(b"Content-Type", b"application/json"), (b"Request-Id", b"req_1"), (b"Server", b"x")],
        [(b"x-amzn-RequestId", b"amzn-1"), (b"content-encoding", b"gzip")],
        [(b"request-id", b""), (b"x-amzn-requestid", b"amzn-2")],
        [(b"content-encoding", b"gzip"), (b"CONTENT-ENCODING", b"br"), (b"content-type", b"text/plain")],
        [(b"request-id", "r\u00e9q".encode()), (b"content-type", b"application/json")],
        [(b"request-id", "r\u00e9q".encode("latin-1")), (b"request-id", b"second")],
        [(b"request-id", b"first"), (b"request-id", "\u00e9".encode()), (b"Server", b"\xe9")],
    ],
)
def test_the_response_headers_read_in_one_pass_are_what_httpx_get_gives(raw):
    from costwatch.accounting import response_headers

    headers = HTTP_MODULE.Headers(raw)
    found = response_headers(headers)
    for name in ("request-id", "x-amzn-requestid", "content-type", "content-encoding"):
        assert found.get(name.encode()) == HTTP_MODULE.Headers(raw).get(name)
