"""A stream read at its end counts what one read event by event counts: usage, ids and events exactly,
and the characters of every stream that needs them (cut, stopped, or sampled for calibration)."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator

import pytest
from conftest import raises_the_cut, sync_client

from costwatch.estimation import OutputEstimator
from costwatch.health import instrumentation_errors
from costwatch.records import Outcome
from costwatch.stream_meter import BodyMeter
from costwatch.testing import FakeAnthropicServer, Fault, ResponseSpec

MODEL = "claude-opus-4-6"


def sse(data: dict) -> bytes:
    """One event in the API's own framing: named by its type, compact JSON."""
    return f"event: {data['type']}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def text_delta(index: int, text: str) -> bytes:
    return sse({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}})


START = sse(
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "model": MODEL,
            "usage": {"input_tokens": 1200, "cache_read_input_tokens": 50, "output_tokens": 1},
        },
    }
)
END = [
    sse({"type": "content_block_stop", "index": 1}),
    sse(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 77, "server_tool_use": {"web_search_requests": 1}},
        }
    ),
    sse({"type": "message_stop"}),
]


def stream(deltas: int = 200) -> list[bytes]:
    """A stream with thinking, text (with escapes and non-ASCII) and tool input, one event per chunk."""
    texts = ['Hé said "hi"\\\n', "naïve café ", "\U0001f600 ok ", "plain words here "]
    return [
        START,
        sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}
        ),
        sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "Let me think."},
            }
        ),
        sse({"type": "content_block_stop", "index": 0}),
        sse({"type": "ping"}),
        sse({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        *(text_delta(1, texts[i % len(texts)]) for i in range(deltas)),
        *END,
    ]


def read_event_by_event(chunks: list[bytes]) -> BodyMeter:
    meter = BodyMeter(stream=True, clock=lambda: 1.0)
    for chunk in chunks:
        meter.feed(chunk)
    return meter


def read_deferred(chunks: list[bytes], *, read_all: bool) -> BodyMeter:
    """What the hooks do: feed until the meter defers, keep the rest, read it when the body ends."""
    meter = BodyMeter(stream=True, clock=lambda: 1.0)
    kept = None
    for chunk in chunks:
        if kept is None:
            meter.feed(chunk)
            kept = meter.defer()
        else:
            kept.append(chunk)
    meter.finish_stream(read_all=read_all)
    return meter


def counts(meter: BodyMeter) -> tuple:
    usage = meter.usage
    return (
        meter.complete,
        meter.output_reported,
        meter.message_id,
        meter.model,
        meter.stop_reason,
        meter.api_error_type,
        meter.events,
        meter.bytes_received,
        meter.first_delta_at,
        (usage.input_tokens, usage.cache_read_tokens, usage.output_tokens, dict(usage.server_tool_use)),
    )


def test_a_completed_stream_read_from_its_tail_counts_usage_ids_and_events_exactly() -> None:
    chunks = stream()
    meter = read_deferred(chunks, read_all=False)
    assert counts(meter) == counts(read_event_by_event(chunks))
    assert meter.usage.output_tokens == 77 and meter.events == len(chunks)
    assert not meter.chars_measured and meter.chars == {}
    assert meter.kept is None  # nothing of the body is held once it is read


def test_a_stream_sampled_for_calibration_is_read_in_full() -> None:
    chunks = stream()
    meter = read_deferred(chunks, read_all=True)
    exact = read_event_by_event(chunks)
    assert counts(meter) == counts(exact)
    assert meter.chars_measured and meter.chars == exact.chars and meter.chars["text"] > 0


@pytest.mark.parametrize("cut", [7, 50, 137], ids=["first-delta", "early", "mid-stream"])
def test_a_cut_stream_read_at_its_end_has_exact_chars_per_content_type(cut: int) -> None:
    chunks = stream()[:cut]
    meter = read_deferred(chunks, read_all=False)  # no message_stop: read in full regardless
    exact = read_event_by_event(chunks)
    assert counts(meter) == counts(exact) and not meter.complete
    assert meter.chars_measured and meter.chars == exact.chars


def test_a_stream_cut_mid_event_keeps_exact_chars_of_the_events_that_arrived() -> None:
    whole = b"".join(stream())
    cut = whole[: len(whole) // 2]
    pieces = [cut[i : i + 97] for i in range(0, len(cut), 97)]
    meter = read_deferred(pieces, read_all=False)
    assert meter.chars == read_event_by_event(pieces).chars


def unusual_streams() -> Iterator[tuple[str, list[bytes]]]:
    chunks = stream(40)
    middle = len(chunks) // 2
    yield "comment", [*chunks[:middle], b": keep-alive\n\n", *chunks[middle:]]
    yield "blank lines", [*chunks[:middle], b"\n\n", *chunks[middle:]]
    yield "blank line before a name", [*chunks[:middle], b"\n", *chunks[middle:]]  # frames the same events
    yield "two blank lines before a name", [*chunks[:middle], b"\n\n\n", *chunks[middle:]]
    yield "error event", [*chunks[:middle], sse({"type": "error", "error": {"type": "overloaded_error"}})]
    early = sse({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 5}})
    yield "two message_deltas", [*chunks[:middle], early, *chunks[middle:]]
    yield (
        "unnamed event",
        [*chunks[:middle], b"data: " + chunks[middle].split(b"data: ")[1], *chunks[middle:]],
    )
    yield "crlf", [c.replace(b"\n", b"\r\n") for c in chunks]
    yield "no output count", [*chunks[:-2], sse({"type": "message_delta", "delta": {}}), chunks[-1]]
    yield "spaced json", [*chunks[:-1], b'event: message_stop\ndata: {"type": "message_stop"}\n\n']
    whole = b"".join(chunks)
    rng = random.Random(9)
    cuts = sorted(rng.sample(range(1, len(whole)), 60))
    yield "random chunks", [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]


@pytest.mark.parametrize(("name", "chunks"), list(unusual_streams()), ids=[n for n, _ in unusual_streams()])
def test_anything_unusual_in_the_skipped_part_is_read_exactly(name: str, chunks: list[bytes]) -> None:
    meter = read_deferred(chunks, read_all=False)
    exact = read_event_by_event(chunks)
    assert counts(meter) == counts(exact)
    # Only an ordinary stream in odd chunks or framing is read from its tail; anything unusual is
    # read in full.
    assert meter.chars_measured == (name not in ("random chunks", "blank line before a name"))
    if meter.chars_measured:
        assert meter.chars == exact.chars


def test_kept_chunks_are_read_early_once_they_pass_the_bound_and_the_totals_stay_exact() -> None:
    chunks = stream(2000)
    meter = BodyMeter(stream=True, clock=lambda: 1.0, fold_bytes=4096)
    kept = None
    most_kept = 0
    for chunk in chunks:
        if kept is None:
            meter.feed(chunk)
            kept = meter.defer()
            continue
        kept.append(chunk)
        if len(kept) % 16 == 0:
            meter.fold()
        most_kept = max(most_kept, sum(map(len, kept)))
    assert most_kept < 4096 + 16 * max(map(len, chunks))  # the bound, plus what arrives between checks
    meter.finish_stream(read_all=True)
    exact = read_event_by_event(chunks)
    assert counts(meter) == counts(exact) and meter.chars == exact.chars


def test_a_meter_without_a_clock_or_on_a_compressed_body_never_defers() -> None:
    unclocked = BodyMeter(stream=True)
    for chunk in stream(3):
        unclocked.feed(chunk)
        assert unclocked.defer() is None
    compressed = gzip.compress(b"".join(stream(3)))
    gzipped = BodyMeter(stream=True, content_encoding="gzip", clock=lambda: 1.0)
    for start in range(0, len(compressed), 64):
        gzipped.feed(compressed[start : start + 64])
        assert gzipped.defer() is None
    assert gzipped.first_delta_at is not None  # it did see the deltas, and still read them all


# -- through the hooks --------------------------------------------------------------------------
class RecordingEstimator(OutputEstimator):
    """An estimator past its first calibration phase that remembers the characters it was given."""

    def __init__(self) -> None:
        super().__init__(sample_every=1000)
        self.restore({"version": 1, "models": {MODEL: {"factor": 1.0, "samples": 50, "types": {}}}})
        self.estimated: list[dict[str, int]] = []
        self.observed: list[dict[str, int]] = []

    def estimate(self, model: str, chars) -> int:  # type: ignore[no-untyped-def, override]
        self.estimated.append(dict(chars))
        return super().estimate(model, chars)

    def observe(self, model: str, chars, output_tokens: int) -> None:  # type: ignore[no-untyped-def, override]
        self.observed.append(dict(chars))
        super().observe(model, chars, output_tokens)


@pytest.fixture
def estimator(accounting) -> RecordingEstimator:
    from costwatch import instrumentation

    recording = RecordingEstimator()
    assert instrumentation._hooks is not None
    instrumentation._hooks.accountant.estimator = recording
    return recording


def test_a_completed_stream_not_sampled_is_billed_exactly_and_calibrates_nothing(
    accounting, estimator
) -> None:
    with FakeAnthropicServer(ResponseSpec.small(300, model=MODEL)) as server:
        client = sync_client(server)
        with client.messages.stream(
            model=MODEL, max_tokens=300, messages=[{"role": "user", "content": "x"}]
        ) as s:
            s.until_done()
        (entry,) = server.ledger.entries
    (record,) = accounting.records()
    assert record.outcome is Outcome.COMPLETED
    assert record.usage.output_tokens == entry.output_tokens and not record.usage.output_estimated
    assert record.usage.input_tokens == entry.input_tokens
    assert record.events_received == entry.events_sent
    assert record.time_to_first_token_s is not None and record.time_to_first_token_s > 0
    assert estimator.observed == []  # nothing measured, nothing learnt


def test_a_stream_cut_after_the_meter_deferred_is_estimated_from_exact_chars(accounting, estimator) -> None:
    with FakeAnthropicServer(ResponseSpec.small(400, model=MODEL)) as server:
        server.enqueue(Fault.cut_after_deltas(100))
        client = sync_client(server, max_retries=0)
        with (
            raises_the_cut(),
            client.messages.stream(
                model=MODEL, max_tokens=400, messages=[{"role": "user", "content": "x"}]
            ) as s,
        ):
            s.until_done()
        (entry,) = server.ledger.entries
    (record,) = accounting.records()
    assert record.outcome is Outcome.DROPPED and record.usage.output_estimated
    (chars,) = estimator.estimated
    received = {k: v for k, v in chars.items() if v and k != "space"}  # whitespace: a subset of text
    assert received == {k: v for k, v in entry.chars_by_type.items() if v}
    assert record.events_received == entry.events_sent


def test_a_bug_reading_the_kept_chunks_settles_the_attempt_unmetered(
    accounting, estimator, monkeypatch
) -> None:
    def broken(self, *, read_all: bool) -> None:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(BodyMeter, "finish_stream", broken)
    before = instrumentation_errors.total
    with FakeAnthropicServer(ResponseSpec.small(60, model=MODEL)) as server:
        client = sync_client(server)
        with client.messages.stream(
            model=MODEL, max_tokens=60, messages=[{"role": "user", "content": "x"}]
        ) as s:
            message = s.get_final_message()
    assert message.usage.output_tokens == 60
    assert instrumentation_errors.total > before
    (record,) = accounting.records()
    assert record.message_id is None  # settled without the meter rather than lost
