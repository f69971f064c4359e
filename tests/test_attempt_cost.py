"""What an attempt costs the caller's thread: records built cheaply, large bodies fingerprinted later.

None of these tests measures speed; each pins down that a faster path keeps the same behaviour.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import Accounting, completed_attempt, raises_the_cut, sync_client
from test_instrumentation import HTTP_MODULE

import costwatch
import costwatch.pipeline
from costwatch import Outcome, WasteReason
from costwatch.accounting import Accountant
from costwatch.attribution import RetryTracker
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, AttemptStart, Cost, Usage, fingerprint_of, new_id
from costwatch.sinks import MemorySink
from costwatch.spool import Spool
from costwatch.stream_meter import BodyMeter
from costwatch.testing import FakeAnthropicServer, Fault, ResponseSpec

MODEL = "claude-haiku-4-5"
LARGE_PROMPT = "Summarise the quarterly report. " + "lorem ipsum " * 10_000  # ~120 KB of request body


def request(body: bytes) -> Any:
    return HTTP_MODULE.Request(
        "POST", "http://api.test/v1/messages", headers={"anthropic-version": "2023-06-01"}, content=body
    )


# -- records -----------------------------------------------------------------------------------------
def test_a_record_given_only_its_required_fields_has_every_declared_default() -> None:
    record = AttemptRecord("a", "r", 1, datetime(2025, 3, 1, tzinfo=timezone.utc), Outcome.COMPLETED)
    for f in dataclasses.fields(AttemptRecord)[5:]:
        declared = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        assert getattr(record, f.name) == declared, f.name
    assert record.usage == Usage() and record.tags == {} and record.cost is None
    assert Cost(1.0, 2.0).total_usd == 3.0 and Usage(1, output_tokens=2).billed_tokens == 3
    assert AttemptStart("a", "r", 1, record.started_at).tags == {}


def test_records_stay_immutable_and_copy_with_replace() -> None:
    record = completed_attempt(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.revision = 5  # type: ignore[misc]
    copy = dataclasses.replace(record, fingerprint="fp")
    assert copy.fingerprint == "fp" and copy.attempt_id == record.attempt_id and record.fingerprint is None
    assert AttemptRecord.from_dict(copy.to_dict()) == copy


def test_records_are_built_as_their_own_class_and_a_subclass_still_constructs() -> None:
    when = datetime(2025, 3, 1, tzinfo=timezone.utc)
    record = AttemptRecord("a", "r", 1, when, Outcome.COMPLETED, usage=Usage(3), cost=Cost(0.5))
    assert type(record) is AttemptRecord and type(record.usage) is Usage and type(record.cost) is Cost
    assert type(dataclasses.replace(record, revision=1)) is AttemptRecord

    class Labelled(AttemptRecord):
        __slots__ = ("label",)

    labelled = Labelled("a", "r", 1, when, Outcome.DROPPED, revision=2)
    assert type(labelled) is Labelled and labelled.outcome is Outcome.DROPPED and labelled.revision == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        labelled.revision = 3  # type: ignore[misc]


def test_missing_record_fields_are_still_a_type_error() -> None:
    with pytest.raises(TypeError):
        AttemptRecord("a", "r", 1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Usage(unknown=1)  # type: ignore[call-arg]


def test_new_ids_are_32_hex_digits_and_never_repeat() -> None:
    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_new_ids_are_uuid7_and_ids_drawn_a_millisecond_apart_sort_in_order() -> None:
    before = time.time_ns() // 1_000_000
    first = new_id()
    time.sleep(0.002)
    second = new_id()
    after = time.time_ns() // 1_000_000
    for drawn in (first, second):
        parsed = uuid.UUID(drawn)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
        assert before <= int(drawn[:12], 16) <= after  # the first 48 bits are Unix milliseconds
    assert first < second


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_draws_ids_of_its_own() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave without running the parent's cleanup
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child_id = os.read(read, 64).decode()
    os.close(read)
    assert len(child_id) == 32 and child_id != new_id()


# -- the retry tracker ---------------------------------------------------------------------------------
def test_the_tracker_wants_a_fingerprint_only_while_a_failure_of_that_body_size_may_be_resent() -> None:
    tracker = RetryTracker()
    first = tracker.begin(explicit_id=None, fingerprint=None, previous_id=None)
    assert not tracker.wants_fingerprint(5_000)
    failed = dataclasses.replace(
        completed_attempt(1),
        logical_request_id=first.logical_request_id,
        outcome=Outcome.DROPPED,
        fingerprint="fp",
    )
    tracker.finish(failed, body_size=5_000)
    assert tracker.wants_fingerprint(5_000) and not tracker.wants_fingerprint(5_001)
    resent = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    assert resent.logical_request_id == first.logical_request_id and resent.attempt_number == 2
    assert not tracker.wants_fingerprint(5_000)


def test_a_failure_of_unknown_body_size_makes_the_tracker_want_every_fingerprint() -> None:
    tracker = RetryTracker()
    first = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    tracker.finish(
        dataclasses.replace(
            completed_attempt(1),
            logical_request_id=first.logical_request_id,
            outcome=Outcome.DROPPED,
            fingerprint="fp",
        )
    )
    assert tracker.wants_fingerprint(1) and tracker.wants_fingerprint(10_000_000)


# -- the pipeline fingerprints what the caller left -----------------------------------------------------
def test_a_body_left_to_the_writer_reaches_every_sink_with_its_fingerprint(tmp_path: Path) -> None:
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"))
    sink = MemorySink()
    pipeline.add_sink(sink)
    body = b'{"model":"m","messages":[]}' * 1000
    pipeline.submit(completed_attempt(1), body_to_fingerprint=body)
    assert pipeline.flush(10)
    (record,) = sink.records
    assert record.fingerprint == fingerprint_of(body)
    assert pipeline._unhashed_bytes == 0
    pipeline.shutdown()


def test_a_writer_that_is_behind_makes_the_caller_hash_rather_than_hold_more_bodies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(costwatch.pipeline, "MAX_UNHASHED_BYTES", 100)
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"))
    pipeline.submit(completed_attempt(1), body_to_fingerprint=b"x" * 101)
    (queued,) = pipeline._queue
    assert isinstance(queued, AttemptRecord) and queued.fingerprint == fingerprint_of(b"x" * 101)
    pipeline._queue.clear()
    pipeline.shutdown()


def test_records_spilled_from_a_full_queue_or_at_shutdown_carry_their_fingerprints(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    pipeline = Pipeline(capacity=1, batch_size=1000, interval_s=60, spool=spool)
    sink = MemorySink()
    pipeline.add_sink(sink)
    blocker = threading.Event()
    original_export = sink.export
    sink.export = lambda records: (blocker.wait(10), original_export(records))  # type: ignore[method-assign]
    bodies = [f"body {n}".encode() * 500 for n in range(4)]
    for n, body in enumerate(bodies):
        pipeline.submit(completed_attempt(n), body_to_fingerprint=body)
    assert spool.pending("memory") >= 1  # one in the writer's hands, one queued, the rest spilled
    blocker.set()
    pipeline.shutdown()
    replayed = MemorySink()
    Spool(tmp_path / "spool").replay("memory", replayed.export, batch_size=100)
    delivered = {r.attempt_id: r.fingerprint for r in [*sink.records, *replayed.records]}
    assert delivered == {f"att-{n}": fingerprint_of(body) for n, body in enumerate(bodies)}


# -- the accountant ------------------------------------------------------------------------------------
_ANSWER = b"".join(
    b"event: " + name + b"\ndata: " + data + b"\n\n"
    for name, data in [
        (
            b"message_start",
            b'{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant",'
            b'"model":"claude-haiku-4-5-20251001","content":[],"stop_reason":null,'
            b'"usage":{"input_tokens":310,"cache_read_input_tokens":7,"output_tokens":1}}}',
        ),
        (b"content_block_start", b'{"type":"content_block_start","index":0,"content_block":{"type":"text"}}'),
        *[
            (
                b"content_block_delta",
                b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" word"}}',
            )
        ]
        * 30,
        (b"content_block_stop", b'{"type":"content_block_stop","index":0}'),
        (
            b"message_delta",
            b'{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":31}}',
        ),
        (b"message_stop", b'{"type":"message_stop"}'),
    ]
)


@pytest.mark.parametrize("outcome", [Outcome.COMPLETED, Outcome.STREAM_ERROR])
def test_a_settled_attempt_records_every_fact_its_account_gathered(tmp_path: Path, outcome: Outcome) -> None:
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"))
    sink = MemorySink()
    pipeline.add_sink(sink)
    accountant = Accountant(pipeline=pipeline, prices=load_prices())
    body = b'{"messages":[{"role":"user","content":"hi"}],"model":"' + MODEL.encode() + b'"}'
    sent = HTTP_MODULE.Request(
        "POST",
        "http://api.test/v1/messages",
        headers={
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "b1, b2",
            "x-stainless-retry-count": "0",
        },
        content=body,
    )
    with costwatch.tags(workflow="nightly"):
        opened = accountant.begin(sent)
    opened.http_status, opened.stream, opened.request_id = 200, True, "req_1"
    ticks = iter([opened.started + 0.25])
    meter = opened.meter = BodyMeter(stream=True, clock=lambda: next(ticks))
    meter.feed(_ANSWER)
    error = RuntimeError("cut") if outcome is Outcome.STREAM_ERROR else None
    accountant.settle(opened, outcome, error)
    assert pipeline.flush(10)
    (record,) = sink.records
    usage = Usage(input_tokens=310, cache_read_tokens=7, output_tokens=31)
    failed = outcome is not Outcome.COMPLETED
    assert record == AttemptRecord(
        attempt_id=opened.attempt_id,
        logical_request_id=opened.logical_request_id,
        attempt_number=1,
        started_at=opened.started_at,
        outcome=outcome,
        model_requested=MODEL,
        model="claude-haiku-4-5-20251001",
        stream=True,
        beta_features=("b1", "b2"),
        request_id="req_1",
        message_id="msg_1",
        sdk_retry=0,
        http_status=200,
        error_type="RuntimeError" if failed else None,
        api_error_type=None,
        time_to_first_token_s=0.25,
        duration_s=record.duration_s,
        usage=usage,
        server_tool_use={},
        stop_reason="end_turn",
        events_received=meter.events,
        bytes_received=len(_ANSWER),
        cost=load_prices().cost(MODEL, usage),
        wasted=failed,
        waste_reason=WasteReason.ABANDONED if failed else None,
        tags={"workflow": "nightly"},
        fingerprint=fingerprint_of(body),
        revision=0,
        # A completed stream measured to calibrate keeps its counts, as a sample for the fleet.
        output_chars={} if failed else {key: n for key, n in meter.chars.items() if n},
    )
    assert failed or record.output_chars["text"] > 0
    assert 0 < record.duration_s < 10 and record.events_received == 35
    pipeline.shutdown()


@pytest.mark.parametrize("size", [100, 1_000_000], ids=["small body", "large body"])
def test_every_record_gets_the_fingerprint_of_its_request_body(tmp_path: Path, size: int) -> None:
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"))
    sink = MemorySink()
    pipeline.add_sink(sink)
    accountant = Accountant(pipeline=pipeline, prices=load_prices())
    body = (
        b'{"messages":[{"role":"user","content":"' + b"a" * size + b'"}],"model":"' + MODEL.encode() + b'"}'
    )
    opened = accountant.begin(request(body))
    assert opened.model_requested == MODEL
    opened.settle(Outcome.COMPLETED, None)
    assert opened.body is None  # the attempt lets go of the body once it is settled
    assert pipeline.flush(10)
    (record,) = sink.records
    assert record.fingerprint == fingerprint_of(body)
    assert "a" * 50 not in repr(record) and "a" * 50 not in repr(opened)
    pipeline.shutdown()


def test_a_dropped_large_request_resent_by_the_application_is_its_retry(accounting: Accounting) -> None:
    messages = [{"role": "user", "content": LARGE_PROMPT}]
    with FakeAnthropicServer(ResponseSpec.small(200)) as server:
        server.enqueue(Fault.cut_after_deltas(10), None)
        client = sync_client(server)
        with raises_the_cut():
            list(client.messages.create(model=MODEL, max_tokens=1024, messages=messages, stream=True))
        list(client.messages.create(model=MODEL, max_tokens=1024, messages=messages, stream=True))
        client.messages.create(model=MODEL, max_tokens=1024, messages=messages)  # not a retry: 1st succeeded
    first, retry, again = accounting.records()
    assert first.outcome is Outcome.DROPPED and first.waste_reason is WasteReason.RETRIED
    assert retry.logical_request_id == first.logical_request_id and retry.attempt_number == 2
    assert again.logical_request_id != first.logical_request_id and again.attempt_number == 1
    assert first.fingerprint == retry.fingerprint is not None
    assert again.fingerprint is not None and again.fingerprint != first.fingerprint  # not streamed
