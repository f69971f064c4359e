"""The fault matrix: every way a Messages API attempt can break, sync and async, on this SDK line.

Each case runs twice against a fresh fake server: once without costwatch and once instrumented. The
application must see exactly the same thing both times (the events or message it received, or the
exception's type, message, cause and context, with per-attempt ids normalised), and the instrumented
run's records must match the server's ledger one for one: input and cache tokens exact whenever
``message_start`` reached the application, output exact when the API reported it, otherwise
estimated from exactly the characters received and flagged as estimated.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anthropic
import pytest

import costwatch
from costwatch import AttemptRecord, Outcome
from costwatch.estimation import OutputEstimator
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.records import OutputSource
from costwatch.sinks import MemorySink
from costwatch.testing import Ending, FakeAnthropicServer, Fault, FaultKind, LedgerEntry, ResponseSpec

MODEL = "claude-haiku-4-5"
MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Summarise the incident report."}]
SMALL = ResponseSpec.small(60)
# Slow enough that the application is mid-stream (blocked in a read) when it cancels or closes.
SLOW = ResponseSpec.small(60, event_interval_s=0.03)
BREAK_AFTER = 6
# A stalled response ends only when the client's timeout fires: one second is ample for the headers
# and first deltas of a healthy response, and the tests are about what a timeout records, not how long.
STALLED_CLIENT = {"max_retries": 0, "timeout": 1.0}
_IDS = re.compile(r"\b(req|msg|toolu|srvtoolu)_\w+")
_ADDRESS = re.compile(r"0x[0-9a-f]+")
# Each run has a fresh server; anthropic 2.17 on names its host and port in a connection error.
_PORT = re.compile(r"\b(127\.0\.0\.1|localhost):\d+")


def normalised(text: str) -> str:
    """Text with per-attempt ids, object addresses and the fake's port replaced, so two runs compare
    equal."""
    return _PORT.sub(r"\1:…", _ADDRESS.sub("0x…", _IDS.sub(r"\1_…", text)))


@dataclass(frozen=True)
class Seen:
    """What the application saw: what it received, and the exception it got (if any)."""

    received: tuple[str, ...]
    error: tuple[Any, ...] | None


def describe_error(exc: BaseException) -> tuple[Any, ...]:
    def one(e: BaseException | None) -> tuple[str, str] | None:
        return None if e is None else (f"{type(e).__module__}.{type(e).__qualname__}", normalised(str(e)))

    return (*one(exc), one(exc.__cause__), one(exc.__context__), exc.__suppress_context__)  # type: ignore[misc]


def dump(model: Any) -> str:
    return normalised(json.dumps(model.model_dump(mode="json"), sort_keys=True))


@dataclass(frozen=True)
class Case:
    """One row of the matrix: faults in arrival order, how the application reads, what costwatch records."""

    faults: tuple[Fault | None, ...]
    outcomes: tuple[Outcome, ...]
    read: str = "events"
    """``events`` (create(stream=True)), ``helper`` (messages.stream), ``message`` (no stream), ``break``,
    ``unread`` (dropped unread and garbage-collected), ``cancel`` (asyncio), ``close_from_thread``."""
    client: Mapping[str, Any] = field(default_factory=lambda: {"max_retries": 0})
    spec: ResponseSpec = SMALL
    modes: tuple[str, ...] = ("sync", "async")


CASES: dict[str, Case] = {
    "completed": Case((None,), (Outcome.COMPLETED,)),
    "reset_before_headers": Case((Fault.reset(),), (Outcome.CONNECT_ERROR,)),
    "cut_before_first_delta": Case((Fault.cut_after_deltas(0),), (Outcome.DROPPED,)),
    "cut_inside_message_start": Case((Fault.cut_after_bytes(30),), (Outcome.DROPPED,)),
    "cut_between_events": Case((Fault.cut_after_events(9),), (Outcome.DROPPED,)),
    "cut_inside_event": Case((Fault.cut_mid_event(after_events=9),), (Outcome.DROPPED,)),
    "cut_inside_chunk_header": Case((Fault.cut_in_chunk_size(after_events=9),), (Outcome.DROPPED,)),
    "cut_after_message_delta": Case((Fault.cut_before_message_stop(),), (Outcome.DROPPED,)),
    "cut_under_stream_helper": Case(
        (Fault.cut_mid_event(after_events=12),), (Outcome.DROPPED,), read="helper"
    ),
    "cut_non_stream_body": Case((Fault.cut_after_bytes(40),), (Outcome.DROPPED,), read="message"),
    "sse_error_event": Case((Fault.error_event(after_deltas=5),), (Outcome.STREAM_ERROR,)),
    "sse_api_error_first": Case((Fault.error_event(0, error_type="api_error"),), (Outcome.STREAM_ERROR,)),
    "429_retried_by_sdk": Case(
        (Fault.rate_limited(), Fault.rate_limited(), None),
        (Outcome.HTTP_ERROR, Outcome.HTTP_ERROR, Outcome.COMPLETED),
        client={"max_retries": 2},
    ),
    "500_retries_exhausted": Case(
        (Fault.internal_server_error(), Fault.internal_server_error()),
        (Outcome.HTTP_ERROR, Outcome.HTTP_ERROR),
        client={"max_retries": 1},
    ),
    "529_retries_exhausted_no_stream": Case(
        (Fault.overloaded(), Fault.overloaded()),
        (Outcome.HTTP_ERROR, Outcome.HTTP_ERROR),
        read="message",
        client={"max_retries": 1},
    ),
    "reset_retried_by_sdk": Case(
        (Fault.reset(), None), (Outcome.CONNECT_ERROR, Outcome.COMPLETED), client={"max_retries": 1}
    ),
    "non_stream_cut_retried_by_sdk": Case(
        (Fault.cut_after_bytes(40), None),
        (Outcome.DROPPED, Outcome.COMPLETED),
        read="message",
        client={"max_retries": 1},
    ),
    "timeout_before_headers": Case(
        (Fault.stall_before_headers(),), (Outcome.CONNECT_ERROR,), client=STALLED_CLIENT
    ),
    "stall_mid_body": Case(
        (Fault.stall_mid_body(after_deltas=4),), (Outcome.DROPPED,), client=STALLED_CLIENT
    ),
    "application_breaks_out": Case((None,), (Outcome.CANCELLED,), read="break", spec=SLOW),
    "dropped_unread_and_collected": Case((None,), (Outcome.CANCELLED,), read="unread"),
    "asyncio_cancel_mid_stream": Case(
        (None,), (Outcome.CANCELLED,), read="cancel", spec=SLOW, modes=("async",)
    ),
    "closed_from_another_thread": Case(
        (None,), (Outcome.CANCELLED,), read="close_from_thread", spec=SLOW, modes=("sync",)
    ),
}

_TRANSPORT_ERRORS = {
    FaultKind.RESET: "ReadError",
    FaultKind.STALL_BEFORE_HEADERS: "ReadTimeout",
    FaultKind.STALL_MID_BODY: "ReadTimeout",
}


def transport_error_type(fault: Fault | None) -> str | None:
    """The HTTP client's exception class that ``fault`` breaks an attempt with (None: not broken)."""
    if fault is None:
        return None
    return "RemoteProtocolError" if fault.kind.cuts else _TRANSPORT_ERRORS.get(fault.kind)


PARAMS = [
    pytest.param(name, mode, id=f"{name}-{mode}") for name, case in CASES.items() for mode in case.modes
]


# -- the application, sync -----------------------------------------------------------------------------
def params(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 1024, "messages": MESSAGES, **extra}


def read_sync(client: anthropic.Anthropic, how: str) -> tuple[str, ...]:
    received: list[str] = []
    if how == "message":
        received.append(dump(client.messages.create(**params())))
    elif how == "helper":
        with client.messages.stream(**params()) as helper:
            for text in helper.text_stream:
                received.append(text)
            received.append(dump(helper.get_final_message()))
    elif how == "unread":
        stream = client.messages.create(**params(stream=True))
        del stream
        gc.collect()
    elif how == "close_from_thread":
        stream = client.messages.create(**params(stream=True))
        with stream:
            for event in stream:
                received.append(dump(event))
                if len(received) == BREAK_AFTER:
                    closer = threading.Thread(target=stream.close)
                    closer.start()
                    closer.join(10)
    else:
        with client.messages.create(**params(stream=True)) as stream:
            for event in stream:
                received.append(dump(event))
                if how == "break" and len(received) == BREAK_AFTER:
                    break
    return tuple(received)


def run_sync(server: FakeAnthropicServer, case: Case) -> Seen:
    with anthropic.Anthropic(base_url=server.base_url, api_key="sk-ant-matrix", **case.client) as client:
        received: tuple[str, ...] = ()
        try:
            received = read_sync(client, case.read)
        except Exception as exc:
            return Seen(received, describe_error(exc))
        return Seen(received, None)


# -- the application, async ----------------------------------------------------------------------------
async def read_async(client: anthropic.AsyncAnthropic, how: str, received: list[str]) -> None:
    if how == "message":
        received.append(dump(await client.messages.create(**params())))
    elif how == "helper":
        async with client.messages.stream(**params()) as helper:
            async for text in helper.text_stream:
                received.append(text)
            received.append(dump(await helper.get_final_message()))
    elif how == "unread":
        stream = await client.messages.create(**params(stream=True))
        del stream
        gc.collect()
    elif how == "cancel":
        reached = asyncio.Event()

        async def reader() -> None:
            async with await client.messages.create(**params(stream=True)) as stream:
                async for event in stream:
                    received.append(dump(event))
                    if len(received) == BREAK_AFTER:
                        reached.set()

        task = asyncio.create_task(reader())
        await asyncio.wait_for(reached.wait(), 10)
        task.cancel()
        await task
    else:
        async with await client.messages.create(**params(stream=True)) as stream:
            async for event in stream:
                received.append(dump(event))
                if how == "break" and len(received) == BREAK_AFTER:
                    break


def run_async(server: FakeAnthropicServer, case: Case) -> Seen:
    async def main() -> Seen:
        received: list[str] = []
        async with anthropic.AsyncAnthropic(
            base_url=server.base_url, api_key="sk-ant-matrix", **case.client
        ) as client:
            try:
                await asyncio.wait_for(read_async(client, case.read, received), 20)
            except (Exception, asyncio.CancelledError) as exc:
                return Seen(tuple(received), describe_error(exc))
            return Seen(tuple(received), None)

    return asyncio.run(main())


# -- one run -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def accounted(**settings: Any) -> Iterator[tuple[Pipeline, MemorySink]]:
    """costwatch instrumenting every client, records to memory, with a fresh (uncalibrated) estimator."""
    pipeline = Pipeline()
    sink = MemorySink()
    costwatch.instrument(
        pipeline=pipeline,
        sinks=[sink],
        listeners=[],
        prices=load_prices(),
        estimator=OutputEstimator(),
        **settings,
    )
    try:
        yield pipeline, sink
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def run(case: Case, mode: str, *, flush: bool = False) -> tuple[Seen, tuple[LedgerEntry, ...]]:
    """Run a case against a fresh fake; with ``flush``, deliver the records while the fake still
    answers (its ``count_tokens`` too)."""
    with FakeAnthropicServer(case.spec, faults=case.faults) as server:
        seen = run_sync(server, case) if mode == "sync" else run_async(server, case)
        gc.collect()  # the unread case: the stream's last reference may sit in a traceback or frame
        # A server still writing to a client that went away records the attempt when its write fails.
        entries = tuple(server.ledger.wait_for(len(case.outcomes), timeout=5))
        if flush:
            assert costwatch.flush(30)
    return seen, entries


# -- what the records must say -------------------------------------------------------------------------
def message_start_reached_client(entry: LedgerEntry) -> bool:
    if entry.http_status is None or entry.http_status >= 400:
        return False
    return entry.events_sent >= 1 if entry.stream else entry.ending is Ending.COMPLETED


def assert_billed_like_ledger(record: AttemptRecord, entry: LedgerEntry, case: Case) -> None:
    usage = record.usage
    # A non-stream body is read inside send(): when it is cut, send() raises and its headers are lost.
    if entry.http_status is not None and (entry.stream or entry.ending is not Ending.CUT):
        assert record.request_id == entry.request_id and record.http_status == entry.http_status
    if case.read == "unread" or not message_start_reached_client(entry):
        # Nothing of the usage reached the application, so nothing of it can be known: the record
        # exists with its outcome, and claims no tokens rather than guessing (see docs/guarantees.md).
        assert usage.billed_tokens == 0
        return
    assert (usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens) == (
        entry.input_tokens,
        entry.cache_read_tokens,
        entry.cache_write_tokens,
    )
    final_usage_seen = entry.stop_reason is not None and record.outcome is not Outcome.CANCELLED
    if final_usage_seen:
        assert usage.output_tokens == entry.output_tokens and not usage.output_estimated
        return
    assert usage.output_estimated and usage.estimated_output_tokens == usage.output_tokens
    if record.outcome is not Outcome.CANCELLED:
        # Estimated from exactly the characters the server wrote in whole events.
        chars = {k: v for k, v in entry.chars_by_type.items() if v}
        assert usage.output_tokens == OutputEstimator().estimate(entry.model or MODEL, chars)


@pytest.mark.parametrize(("name", "mode"), PARAMS)
def test_the_application_sees_the_same_and_records_match_the_ledger(name: str, mode: str) -> None:
    case = CASES[name]
    bare, _ = run(case, mode)
    with accounted() as (_pipeline, sink):
        seen, entries = run(case, mode)
        assert costwatch.flush(10)
        records = sink.records
    assert seen == bare
    assert [r.outcome for r in records] == list(case.outcomes), [r.to_dict() for r in records]
    assert len(entries) == len(records) == len({r.attempt_id for r in records})
    assert len({r.logical_request_id for r in records}) == 1
    assert [r.attempt_number for r in records] == list(range(1, len(records) + 1))
    for record, entry, fault in zip(records, entries, case.faults, strict=True):
        assert_billed_like_ledger(record, entry, case)
        # The HTTP client's exception class is kept for attempts the transport broke, the same on both
        # SDK lines whatever the SDK wraps it in; never for the application's own stop.
        assert record.error_type == transport_error_type(fault), record.to_dict()


COUNTED_CASES = (
    "cut_between_events",
    "cut_inside_event",
    "cut_inside_chunk_header",
    "cut_under_stream_helper",
    "sse_error_event",
    "stall_mid_body",
    "application_breaks_out",
    "asyncio_cancel_mid_stream",
    "closed_from_another_thread",
)


@pytest.mark.parametrize(("name", "mode"), [(n, m) for n in COUNTED_CASES for m in CASES[n].modes])
def test_with_count_partial_output_the_application_sees_the_same_and_cut_output_is_counted(
    name: str, mode: str
) -> None:
    case = CASES[name]
    bare, _ = run(case, mode)
    with accounted(count_partial_output=True) as (_pipeline, sink):
        seen, entries = run(case, mode, flush=True)
        records = sink.records
    assert seen == bare
    assert [r.outcome for r in records] == list(case.outcomes)
    for record, entry in zip(records, entries, strict=True):
        assert record.output_source is OutputSource.COUNTED, record.to_dict()
        if record.outcome is Outcome.CANCELLED:
            # The server may have sent more than the application read before it stopped.
            assert 0 < record.usage.output_tokens <= entry.output_tokens
        else:
            assert record.usage.output_tokens == entry.output_tokens
