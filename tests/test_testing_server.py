"""The fake Anthropic server, driven by the real SDK over real sockets, on whichever SDK line is installed."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import anthropic
import pytest
from conftest import http_client_error

from costwatch.testing import (
    FAULT_HEADER,
    BlockKind,
    BlockSpec,
    DropProfile,
    Ending,
    FakeAnthropicServer,
    Fault,
    ReceivedRequest,
    ResponseSpec,
)

SDK_MAJOR = int(anthropic.__version__.split(".")[0])
HTTP_MODULE = "httpx" if SDK_MAJOR == 0 else "httpx2"
DROP_MESSAGE = "peer closed connection without sending complete message body (incomplete chunked read)"
MODEL = "claude-opus-4-6"
# A stall ends when the client's timeout fires; these tests are about what a stall bills, not how long.
STALL_TIMEOUT_S = 1.0
MESSAGES: Any = [{"role": "user", "content": "Summarise the billing table."}]

# Every content type, few tokens: each stream has about 45 delta events.
SMALL = ResponseSpec(
    blocks=(
        BlockSpec(BlockKind.THINKING, 25),
        BlockSpec(BlockKind.TEXT, 30),
        BlockSpec(BlockKind.BASH_CODE_EXECUTION, 20),
        BlockSpec(BlockKind.TOOL_USE, 15),
    ),
    cache_read_tokens=1200,
    cache_write_5m_tokens=300,
    cache_write_1h_tokens=40,
)

_BLOCK_CONTENT_TYPE = {
    "text": "text",
    "thinking": "thinking",
    "tool_use": "tool_input",
    "server_tool_use": "server_tool_input",
}


@pytest.fixture
def server() -> Iterator[FakeAnthropicServer]:
    with FakeAnthropicServer(SMALL) as fake:
        yield fake


@dataclass
class Received:
    """What the application saw through the SDK: characters per content type, deltas, the error."""

    chars: dict[str, int] = field(default_factory=dict)
    deltas: int = 0
    error: BaseException | None = None
    final_usage: Any = None
    stop_reason: str | None = None

    def take(self, event: Any, block_types: dict[int, str]) -> None:
        if event.type == "content_block_start":
            block_types[event.index] = _BLOCK_CONTENT_TYPE.get(event.content_block.type, "")
        elif event.type == "content_block_delta":
            self.deltas += 1
            delta = event.delta
            piece = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}
            if delta.type in piece:
                key = block_types[event.index]
                self.chars[key] = self.chars.get(key, 0) + len(getattr(delta, piece[delta.type]))
        elif event.type == "message_delta":
            self.final_usage = event.usage
            self.stop_reason = event.delta.stop_reason


BETAS = ["code-execution-2025-08-25"]


def consume(client: anthropic.Anthropic, *, beta: bool = False, **kwargs: Any) -> Received:
    """Stream one request to its end or its failure, counting what arrived."""
    received = Received()
    blocks: dict[int, str] = {}
    messages: Any = client.messages
    if beta:
        messages, kwargs = client.beta.messages, {**kwargs, "betas": BETAS}
    try:
        for event in messages.create(model=MODEL, max_tokens=1024, messages=MESSAGES, stream=True, **kwargs):
            received.take(event, blocks)
    except Exception as exc:
        received.error = exc
    return received


async def consume_async(client: anthropic.AsyncAnthropic, *, beta: bool = False, **kwargs: Any) -> Received:
    """The async twin of :func:`consume`."""
    received = Received()
    blocks: dict[int, str] = {}
    messages: Any = client.messages
    if beta:
        messages, kwargs = client.beta.messages, {**kwargs, "betas": BETAS}
    try:
        stream = await messages.create(model=MODEL, max_tokens=1024, messages=MESSAGES, stream=True, **kwargs)
        async for event in stream:
            received.take(event, blocks)
    except Exception as exc:
        received.error = exc
    return received


def client_for(server: FakeAnthropicServer, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="test", **{"max_retries": 0, **kwargs})


def async_client_for(server: FakeAnthropicServer, **kwargs: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.base_url, api_key="test", **{"max_retries": 0, **kwargs})


def nonzero(counts: Any) -> dict[str, int]:
    return {key: value for key, value in dict(counts).items() if value}


# -- drops -----------------------------------------------------------------------------------------------


def test_dropped_stream_raises_remote_protocol_error_and_bills_input_and_partial_output(
    server: FakeAnthropicServer,
) -> None:
    server.enqueue(Fault.cut_after_deltas(7))
    received = consume(client_for(server))

    assert received.error is not None
    cut = http_client_error(received.error)  # wrapped since anthropic 2.17
    assert type(cut).__name__ == "RemoteProtocolError"
    assert type(cut).__module__.split(".")[0] == HTTP_MODULE
    assert str(cut) == DROP_MESSAGE
    (entry,) = server.ledger.entries
    assert entry.ending is Ending.CUT
    assert entry.deltas_sent == received.deltas == 7
    assert entry.input_tokens > 0 and entry.cache_read_tokens == 1200 and entry.cache_write_1h_tokens == 40
    assert 7 <= entry.output_tokens <= 21  # 1 to 3 tokens per delta
    assert entry.output_tokens == sum(entry.tokens_by_type.values())
    assert nonzero(entry.chars_by_type) == received.chars
    assert entry.stop_reason is None


async def test_dropped_stream_raises_the_same_error_on_the_async_client(server: FakeAnthropicServer) -> None:
    server.enqueue(Fault.cut_after_deltas(12))
    received = await consume_async(async_client_for(server))

    assert received.error is not None
    cut = http_client_error(received.error)
    assert type(cut).__name__ == "RemoteProtocolError"
    assert type(cut).__module__.split(".")[0] == HTTP_MODULE
    assert str(cut) == DROP_MESSAGE
    (entry,) = server.ledger.entries
    assert entry.ending is Ending.CUT and entry.deltas_sent == received.deltas == 12
    assert nonzero(entry.chars_by_type) == received.chars


def test_sse_error_event_raises_api_status_error_with_overloaded_body(server: FakeAnthropicServer) -> None:
    server.enqueue(Fault.error_event(after_deltas=5))
    received = consume(client_for(server))

    error = received.error
    assert isinstance(error, anthropic.APIStatusError)
    # Both SDK lines pick the exception class from the HTTP status, which was 200: the overload
    # shows in the body, not as OverloadedError.
    assert not isinstance(error, anthropic.OverloadedError)
    assert error.status_code == 200
    assert isinstance(error.body, dict) and error.body["error"]["type"] == "overloaded_error"
    (entry,) = server.ledger.entries
    assert error.body["request_id"] == entry.request_id
    assert entry.ending is Ending.ERROR_EVENT
    assert entry.deltas_sent == received.deltas == 5
    assert nonzero(entry.chars_by_type) == received.chars
    assert entry.output_tokens == sum(entry.tokens_by_type.values()) > 0


async def test_sse_error_event_raises_api_status_error_on_the_async_client(
    server: FakeAnthropicServer,
) -> None:
    server.enqueue(Fault.error_event(after_deltas=3))
    received = await consume_async(async_client_for(server))

    assert isinstance(received.error, anthropic.APIStatusError)
    assert received.error.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert server.ledger[0].ending is Ending.ERROR_EVENT and received.deltas == 3


# -- HTTP errors and SDK retries ---------------------------------------------------------------------------


def test_sdk_retries_529_itself_and_the_ledger_shows_the_retries_unbilled(
    server: FakeAnthropicServer,
) -> None:
    server.enqueue(Fault.overloaded(), Fault.overloaded())
    received = consume(client_for(server, max_retries=2))

    assert received.error is None and received.stop_reason == "tool_use"
    first, second, third = server.ledger.wait_for(3, timeout=5)
    assert [e.retry_count for e in (first, second, third)] == [0, 1, 2]
    assert [e.ending for e in (first, second, third)] == [
        Ending.HTTP_ERROR,
        Ending.HTTP_ERROR,
        Ending.COMPLETED,
    ]
    assert [e.http_status for e in (first, second, third)] == [529, 529, 200]
    assert first.billed_tokens == second.billed_tokens == 0
    assert third.output_tokens == SMALL.output_tokens == received.final_usage.output_tokens
    assert [e.arrival for e in (first, second, third)] == [1, 2, 3]
    assert server.ledger.totals().billed_attempts == 1


async def test_async_sdk_gives_up_after_max_retries_with_overloaded_error(
    server: FakeAnthropicServer,
) -> None:
    server.enqueue(*[Fault.overloaded()] * 3)
    received = await consume_async(async_client_for(server, max_retries=2))

    assert isinstance(received.error, anthropic.OverloadedError)
    assert received.error.status_code == 529
    assert [e.ending for e in server.ledger] == [Ending.HTTP_ERROR] * 3
    assert server.ledger.totals().billed_tokens == 0


@pytest.mark.parametrize(
    ("fault", "error_class"),
    [
        (Fault.internal_server_error(), anthropic.InternalServerError),
        (Fault.rate_limited(), anthropic.RateLimitError),
        (Fault.overloaded(retry_after_s=0), anthropic.OverloadedError),
    ],
)
def test_http_errors_carry_the_api_error_body_and_bill_nothing(
    server: FakeAnthropicServer, fault: Fault, error_class: type[anthropic.APIStatusError]
) -> None:
    server.enqueue(fault)
    with pytest.raises(error_class) as caught:
        client_for(server).messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)

    (entry,) = server.ledger.entries
    assert caught.value.response.headers["request-id"] == entry.request_id
    assert isinstance(caught.value.body, dict) and caught.value.body["error"]["type"] == fault.error_type
    assert entry.http_status == fault.status and entry.billed_tokens == 0 and not entry.stream


# -- no response at all ----------------------------------------------------------------------------------


def test_reset_before_any_response_is_a_connection_error_and_bills_nothing(
    server: FakeAnthropicServer,
) -> None:
    server.enqueue(Fault.reset())
    received = consume(client_for(server))

    assert isinstance(received.error, anthropic.APIConnectionError)
    (entry,) = server.ledger.entries
    assert entry.ending is Ending.RESET and entry.http_status is None and entry.billed_tokens == 0


def test_stall_before_headers_times_the_client_out_and_bills_nothing(server: FakeAnthropicServer) -> None:
    server.enqueue(Fault.stall_before_headers())
    received = consume(client_for(server, timeout=STALL_TIMEOUT_S))

    assert isinstance(received.error, anthropic.APITimeoutError)
    (entry,) = server.ledger.entries
    assert entry.ending is Ending.STALL and entry.billed_tokens == 0


def test_stall_mid_body_times_the_client_out_and_bills_what_was_sent(server: FakeAnthropicServer) -> None:
    server.enqueue(Fault.stall_mid_body(after_deltas=4))
    received = consume(client_for(server, timeout=STALL_TIMEOUT_S))

    assert type(http_client_error(received.error)).__name__ == "ReadTimeout"
    (entry,) = server.ledger.entries
    assert entry.ending is Ending.STALL and received.deltas == entry.deltas_sent == 4
    assert entry.input_tokens > 0 and nonzero(entry.chars_by_type) == received.chars


# -- every cut: the ledger equals what arrived -------------------------------------------------------------

# h11 words a cut inside a chunk-size line differently: it was still parsing a framing line.
IN_FRAMING_MESSAGE = "peer unexpectedly closed connection"
CUTS = [
    (Fault.cut_after_events(9), DROP_MESSAGE),
    (Fault.cut_after_deltas(0), DROP_MESSAGE),
    (Fault.cut_after_deltas(30), DROP_MESSAGE),
    (Fault.cut_after_bytes(2500), DROP_MESSAGE),
    (Fault.cut_mid_event(after_events=20), DROP_MESSAGE),
    (Fault.cut_in_chunk_size(after_events=20), IN_FRAMING_MESSAGE),
]


@pytest.mark.parametrize(("fault", "message"), CUTS, ids=[fault.header_value() for fault, _ in CUTS])
def test_every_cut_drops_the_stream_and_bills_exactly_the_output_that_arrived(
    server: FakeAnthropicServer, fault: Fault, message: str
) -> None:
    received = consume(client_for(server), extra_headers={FAULT_HEADER: fault.header_value()})

    assert received.error is not None
    cut = http_client_error(received.error)
    assert type(cut).__name__ == "RemoteProtocolError"
    assert type(cut).__module__.split(".")[0] == HTTP_MODULE
    assert str(cut) == message
    (entry,) = server.ledger.entries
    assert entry.fault == fault and entry.ending is Ending.CUT
    assert entry.deltas_sent == received.deltas
    assert nonzero(entry.chars_by_type) == received.chars
    assert entry.output_tokens == sum(entry.tokens_by_type.values())
    assert entry.input_tokens > 0


def test_cut_after_bytes_stops_at_that_body_byte(server: FakeAnthropicServer) -> None:
    server.enqueue(Fault.cut_after_bytes(3001))
    consume(client_for(server))

    assert server.ledger[0].body_bytes_sent == 3001


def test_cut_before_message_stop_delivers_full_usage_but_still_drops(server: FakeAnthropicServer) -> None:
    server.enqueue(Fault.cut_before_message_stop())
    received = consume(client_for(server))

    assert str(http_client_error(received.error)) == DROP_MESSAGE
    (entry,) = server.ledger.entries
    assert entry.ending is Ending.CUT and entry.stop_reason == "tool_use"
    assert received.final_usage.output_tokens == entry.output_tokens == SMALL.output_tokens


def test_cut_after_seconds_cuts_a_paced_stream_in_time(server: FakeAnthropicServer) -> None:
    server.spec = ResponseSpec.small(200, event_interval_s=0.01)
    server.enqueue(Fault.cut_after_seconds(0.2))
    started = time.monotonic()
    received = consume(client_for(server))

    assert str(http_client_error(received.error)) == DROP_MESSAGE
    assert 0.15 < time.monotonic() - started < 2.0
    (entry,) = server.ledger.entries
    assert 0 < entry.deltas_sent == received.deltas < 100
    assert nonzero(entry.chars_by_type) == received.chars


def test_random_drop_profile_cuts_mid_delta_and_bills_the_whole_deltas_before(
    server: FakeAnthropicServer,
) -> None:
    server.drop_profile = DropProfile(drop_rate=1.0, seed=7)
    received = consume(client_for(server))

    assert str(http_client_error(received.error)) == DROP_MESSAGE
    (entry,) = server.ledger.entries
    assert entry.fault is not None and entry.fault.kind.value == "cut_mid_event"
    assert entry.deltas_sent == received.deltas
    assert nonzero(entry.chars_by_type) == received.chars


def test_drop_profile_is_reproducible_and_drops_about_its_rate() -> None:
    def endings() -> list[Ending]:
        with FakeAnthropicServer(ResponseSpec.small(20), drop_profile=DropProfile(0.5, seed=3)) as fake:
            client = client_for(fake)
            for number in range(30):
                consume(client, system=f"request {number}")
            return [entry.ending for entry in fake.ledger]

    first = endings()
    assert first == endings()
    assert 5 <= first.count(Ending.CUT) <= 25
    assert set(first) == {Ending.CUT, Ending.COMPLETED}


# -- malformed streams -------------------------------------------------------------------------------------


def test_malformed_json_event_raises_a_json_error_and_bills_like_a_cut(server: FakeAnthropicServer) -> None:
    server.enqueue(Fault.malformed_json(after_events=10))
    received = consume(client_for(server))

    assert isinstance(received.error, json.JSONDecodeError)
    (entry,) = server.ledger.entries
    assert entry.ending is Ending.MALFORMED
    assert entry.deltas_sent == received.deltas and nonzero(entry.chars_by_type) == received.chars


def test_unknown_event_type_does_not_break_the_stream(server: FakeAnthropicServer) -> None:
    server.enqueue(Fault.unknown_event(after_events=5))
    received = consume(client_for(server))

    (entry,) = server.ledger.entries
    assert entry.ending is Ending.COMPLETED
    assert received.error is None, received.error
    assert received.final_usage.output_tokens == entry.output_tokens == SMALL.output_tokens


# -- completed responses: usage equals the ledger -----------------------------------------------------------


def _assert_usage_matches(usage: Any, entry: Any) -> None:
    assert usage.input_tokens == entry.input_tokens
    assert usage.output_tokens == entry.output_tokens
    assert usage.cache_read_input_tokens == entry.cache_read_tokens
    assert usage.cache_creation_input_tokens == entry.cache_write_tokens


@pytest.mark.parametrize("beta", [False, True], ids=["messages", "beta.messages"])
def test_completed_stream_usage_equals_the_ledger(server: FakeAnthropicServer, beta: bool) -> None:
    received = consume(client_for(server), beta=beta)

    assert received.error is None
    (entry,) = server.ledger.entries
    assert entry.ending is Ending.COMPLETED and entry.beta is beta and entry.stream
    assert entry.path == "/v1/messages"
    _assert_usage_matches(received.final_usage, entry)
    assert entry.output_tokens == SMALL.output_tokens
    assert nonzero(entry.chars_by_type) == received.chars


@pytest.mark.parametrize("beta", [False, True], ids=["messages", "beta.messages"])
def test_stream_helper_final_message_has_every_block_and_the_ledger_usage(
    server: FakeAnthropicServer, beta: bool
) -> None:
    client = client_for(server)
    messages: Any = client.messages
    extra = {"betas": BETAS} if beta else {}
    if beta:
        messages = client.beta.messages
    with messages.stream(model=MODEL, max_tokens=1024, messages=MESSAGES, **extra) as stream:
        message = stream.get_final_message()

    (entry,) = server.ledger.entries
    assert [block.type for block in message.content] == [
        "thinking",
        "text",
        "server_tool_use",
        "bash_code_execution_tool_result",
        "tool_use",
    ]
    assert message.id == entry.message_id and message.stop_reason == entry.stop_reason == "tool_use"
    assert message.content[0].signature
    assert isinstance(message.content[4].input, dict) and message.content[4].input
    assert "command" in message.content[2].input
    assert message.content[3].content.type == "bash_code_execution_result"
    assert message.usage.cache_creation.ephemeral_1h_input_tokens == 40
    assert message.usage.server_tool_use.web_search_requests == 0
    _assert_usage_matches(message.usage, entry)
    assert len(message.content[1].text) == entry.chars_by_type["text"]
    assert len(message.content[0].thinking) == entry.chars_by_type["thinking"]


@pytest.mark.parametrize("beta", [False, True], ids=["messages", "beta.messages"])
def test_non_stream_create_returns_the_same_content_and_usage(
    server: FakeAnthropicServer, beta: bool
) -> None:
    client = client_for(server)
    if beta:
        message: Any = client.beta.messages.create(
            model=MODEL, max_tokens=1024, messages=MESSAGES, betas=BETAS
        )
    else:
        message = client.messages.create(model=MODEL, max_tokens=1024, messages=MESSAGES)

    (entry,) = server.ledger.entries
    assert not entry.stream and entry.beta is beta and entry.ending is Ending.COMPLETED
    assert message.model == MODEL and message.id == entry.message_id
    _assert_usage_matches(message.usage, entry)
    assert len(message.content[1].text) == entry.chars_by_type["text"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_first_party_response_carries_the_rate_limit_headers_of_the_real_api(
    server: FakeAnthropicServer, stream: bool
) -> None:
    sent = datetime.now(timezone.utc)
    response = client_for(server).messages.with_raw_response.create(
        model=MODEL, max_tokens=16, messages=MESSAGES, stream=stream
    )
    received = datetime.now(timezone.utc)
    headers = response.headers
    assert headers["anthropic-organization-id"]
    for limit in ("requests", "tokens", "input-tokens", "output-tokens"):
        assert (
            0
            <= int(headers[f"anthropic-ratelimit-{limit}-remaining"])
            < int(headers[f"anthropic-ratelimit-{limit}-limit"])
        )
        reset = datetime.fromisoformat(headers[f"anthropic-ratelimit-{limit}-reset"].replace("Z", "+00:00"))
        assert sent < reset <= received + timedelta(seconds=60)
    parsed: Any = response.parse()
    if stream:
        assert [event.type for event in parsed][-1] == "message_stop"
    else:
        assert parsed.usage.output_tokens > 0


async def test_async_stream_helper_and_beta_non_stream(server: FakeAnthropicServer) -> None:
    client = async_client_for(server)
    async with client.messages.stream(model=MODEL, max_tokens=1024, messages=MESSAGES) as stream:
        message = await stream.get_final_message()
    beta_message = await client.beta.messages.create(
        model=MODEL,
        max_tokens=1024,
        messages=MESSAGES,
        betas=BETAS,
    )

    streamed, plain = server.ledger.wait_for(2, timeout=5)
    _assert_usage_matches(message.usage, streamed)
    _assert_usage_matches(beta_message.usage, plain)
    assert plain.beta and not streamed.beta


def test_non_stream_body_cut_drops_the_call_but_bills_the_full_output(server: FakeAnthropicServer) -> None:
    server.enqueue(Fault.cut_after_bytes(100))
    with pytest.raises(anthropic.APIConnectionError):
        client_for(server).messages.create(model=MODEL, max_tokens=100, messages=MESSAGES)

    (entry,) = server.ledger.entries
    assert entry.ending is Ending.CUT and entry.body_bytes_sent == 100
    assert entry.output_tokens == SMALL.output_tokens


def test_input_tokens_follow_the_request_body_size_unless_set(server: FakeAnthropicServer) -> None:
    client = client_for(server)
    consume(client)
    consume(client, system="x" * 4000)
    server.spec = ResponseSpec.small(5, input_tokens=150_000)
    consume(client)

    short, long, explicit = server.ledger.entries
    assert short.input_tokens == math.ceil(short.request_body_bytes / 4)
    assert long.input_tokens == math.ceil(long.request_body_bytes / 4) > short.input_tokens + 1000
    assert explicit.input_tokens == 150_000


def test_beta_route_is_a_query_on_the_0x_sdk_and_only_the_beta_header_on_2x(
    server: FakeAnthropicServer,
) -> None:
    client = client_for(server)
    client.beta.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    client.beta.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES, betas=BETAS)

    bare, named = server.ledger.entries
    route = "beta=true" if SDK_MAJOR == 0 else ""
    assert bare.query == named.query == route
    assert bare.beta is (SDK_MAJOR == 0) and bare.beta_features == ()
    assert named.beta and named.beta_features == tuple(BETAS)


# -- scheduling ----------------------------------------------------------------------------------------------


def test_schedule_keyed_on_the_body_fails_a_retry_loop_twice_then_lets_it_succeed(
    server: FakeAnthropicServer,
) -> None:
    def schedule(request: ReceivedRequest) -> Fault | None:
        return {1: Fault.cut_after_deltas(3), 2: Fault.error_event(after_deltas=2)}.get(request.arrival)

    server.schedule = schedule
    client = client_for(server)
    outcomes = []
    for _ in range(3):
        received = consume(client)
        outcomes.append(type(http_client_error(received.error)).__name__ if received.error else "ok")
        if received.error is None:
            break

    assert outcomes == ["RemoteProtocolError", "APIStatusError", "ok"]
    assert [e.ending for e in server.ledger] == [Ending.CUT, Ending.ERROR_EVENT, Ending.COMPLETED]
    assert [e.arrival for e in server.ledger] == [1, 2, 3]
    totals = server.ledger.totals()
    assert totals.input_tokens == 3 * server.ledger[0].input_tokens
    assert totals.output_tokens == sum(e.output_tokens for e in server.ledger) > SMALL.output_tokens


def test_queue_is_consumed_in_order_and_none_means_no_fault(server: FakeAnthropicServer) -> None:
    server.enqueue(None, Fault.cut_after_deltas(2), None)
    client = client_for(server)
    errors = [consume(client).error for _ in range(4)]

    assert [error is None for error in errors] == [True, False, True, True]
    assert [e.ending for e in server.ledger] == [
        Ending.COMPLETED,
        Ending.CUT,
        Ending.COMPLETED,
        Ending.COMPLETED,
    ]


def test_header_fault_wins_over_the_queue(server: FakeAnthropicServer) -> None:
    server.enqueue(Fault.overloaded())
    received = consume(client_for(server), extra_headers={FAULT_HEADER: "cut_after_deltas:count=4"})

    assert str(http_client_error(received.error)) == DROP_MESSAGE
    assert server.ledger[0].fault == Fault.cut_after_deltas(4)
    assert consume(client_for(server)).error is not None  # the queued 529 is still there


def test_unparseable_fault_header_is_a_400(server: FakeAnthropicServer) -> None:
    with pytest.raises(anthropic.BadRequestError):
        client_for(server).messages.create(
            model=MODEL, max_tokens=10, messages=MESSAGES, extra_headers={FAULT_HEADER: "no_such_fault"}
        )
    assert server.ledger[0].http_status == 400


# -- ledger, fixture, scale ----------------------------------------------------------------------


def test_ledger_wait_for_times_out_and_clear_empties_it(server: FakeAnthropicServer) -> None:
    consume(client_for(server))
    assert len(server.ledger.wait_for(1, timeout=10)) == 1
    with pytest.raises(TimeoutError):
        server.ledger.wait_for(2, timeout=0.05)
    server.ledger.clear()
    assert len(server.ledger) == 0 and server.ledger.totals().attempts == 0


def test_fixture_yields_a_started_server_with_the_realistic_default(
    fake_anthropic: FakeAnthropicServer,
) -> None:
    client = client_for(fake_anthropic)
    with client.messages.stream(model=MODEL, max_tokens=8192, messages=MESSAGES) as stream:
        text = {"text": 0, "thinking": 0}
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                text["text"] += len(event.delta.text)
            elif event.type == "content_block_delta" and event.delta.type == "thinking_delta":
                text["thinking"] += len(event.delta.thinking)
        message = stream.get_final_message()

    (entry,) = fake_anthropic.ledger.entries
    assert entry.events_sent >= 1800 and message.usage.output_tokens == entry.output_tokens == 3800
    assert text == {"text": entry.chars_by_type["text"], "thinking": entry.chars_by_type["thinking"]}
    prose_ratio = (entry.chars_by_type["text"] + entry.chars_by_type["thinking"]) / 3000
    assert 4.0 <= prose_ratio <= 4.5
    assert 2.8 <= entry.chars_by_type["tool_input"] / entry.tokens_by_type["tool_input"] <= 3.4


async def test_256_concurrent_streams_are_served_at_once() -> None:
    # Every request waits at the barrier until all 256 are in flight: a server that served them
    # one at a time would break the barrier instead of answering.
    barrier = threading.Barrier(256, timeout=20)
    spec = ResponseSpec.small(4)

    def all_at_once(request: ReceivedRequest) -> ResponseSpec:
        barrier.wait()
        return spec

    with FakeAnthropicServer(spec_for=all_at_once) as fake:
        client = async_client_for(fake, timeout=30)
        results = await asyncio.wait_for(
            asyncio.gather(*(consume_async(client) for _ in range(256))), timeout=40
        )
        await client.close()

        assert [r.error for r in results] == [None] * 256
        assert len(fake.ledger) == 256 and fake.peak_open_responses == 256
        assert fake.ledger.totals().output_tokens == 256 * 4


@pytest.mark.parametrize("stream", [True, False])
def test_output_stops_at_max_tokens_with_stop_reason_max_tokens_and_is_billed_so(stream: bool) -> None:
    # The default answer is 3,800 output tokens; asked for at most 1,000, the API stops at 1,000.
    with FakeAnthropicServer(ResponseSpec()) as fake:
        client = client_for(fake)
        if stream:
            with client.messages.stream(model=MODEL, max_tokens=1000, messages=MESSAGES) as events:
                message = events.get_final_message()
        else:
            message = client.messages.create(model=MODEL, max_tokens=1000, messages=MESSAGES)
        (entry,) = fake.ledger.entries
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 1000 == entry.output_tokens
    assert entry.stop_reason == "max_tokens" and entry.ending is Ending.COMPLETED
    # Generation stopped inside the first block: its 1,500 thinking tokens are cut to 1,000.
    assert [block.type for block in message.content] == ["thinking"]


def test_an_answer_within_max_tokens_is_not_cut(server: FakeAnthropicServer) -> None:
    message = client_for(server).messages.create(
        model=MODEL, max_tokens=SMALL.output_tokens, messages=MESSAGES
    )
    assert message.stop_reason == "tool_use" and message.usage.output_tokens == SMALL.output_tokens
