"""costwatch.stream_with_retries and its async twin, against the fake API over real sockets."""

from __future__ import annotations

import asyncio
import importlib
import json
import random
import threading
from typing import Any

import anthropic
import pytest
from conftest import async_client, raises_the_cut, sync_client

import costwatch
from costwatch.pricing import load_prices
from costwatch.prompt_prefix import count_breakpoints, with_cache_breakpoint
from costwatch.records import Usage, WasteReason
from costwatch.retries import IncompleteStreamError, RetryPolicy, is_retryable, retry_after_s
from costwatch.testing import Ending, FakeAnthropicServer, Fault, LedgerEntry, ReceivedRequest, ResponseSpec

HTTP_MODULE = importlib.import_module("httpx2" if anthropic.__version__.startswith("2.") else "httpx")
MODEL = "claude-sonnet-4-5"
FAST = {"initial_backoff_s": 0.001, "max_backoff_s": 0.01}


def agent_turn(prefix_chars: int = 40_000) -> dict[str, Any]:
    """An agent loop's request: tools, a system prompt and earlier turns (the stable prefix), a new turn."""
    return {
        "model": MODEL,
        "max_tokens": 1024,
        "tools": [{"name": "read_file", "description": "Read a file.", "input_schema": {"type": "object"}}],
        "system": "You are a careful agent. " + "Rules of the repository. " * (prefix_chars // 50),
        "messages": [
            {"role": "user", "content": "Find the failing test. " + "log line\n" * (prefix_chars // 20)},
            {"role": "assistant", "content": [{"type": "text", "text": "I will read the test file."}]},
            {"role": "user", "content": "Here it is; now fix it."},
        ],
    }


def run(mode: str, server: FakeAnthropicServer, **kwargs: Any) -> costwatch.RetriedStream:
    if mode == "sync":
        return costwatch.stream_with_retries(sync_client(server), **kwargs)

    async def go() -> costwatch.RetriedStream:
        client = async_client(server)
        try:
            return await costwatch.astream_with_retries(client, **kwargs)
        finally:
            await client.close()

    return asyncio.run(go())


class BodiesSeen:
    """A ``spec_for`` that keeps each request body the fake received, so tests can look at them."""

    def __init__(self, spec: ResponseSpec) -> None:
        self.spec = spec
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, request: ReceivedRequest) -> ResponseSpec:
        with self._lock:
            self.bodies.append(request.body)
        return self.spec


MID_BODY_FAILURES = {
    "cut_mid_event": Fault.cut_mid_event(after_events=12),
    "cut_in_chunk_size": Fault.cut_in_chunk_size(after_events=8),
    "cut_before_message_stop": Fault.cut_before_message_stop(),
    "overloaded_error_event": Fault.error_event(after_deltas=5),
    "ended_early": Fault.end_early(after_deltas=5),
    "reset_before_headers": Fault.reset(),
    "http_529": Fault.overloaded(),
    "http_500": Fault.internal_server_error(),
}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("failure", sorted(MID_BODY_FAILURES))
def test_a_stream_that_fails_is_retried_until_it_completes_as_one_logical_request(accounting, mode, failure):
    with FakeAnthropicServer(ResponseSpec.small(60)) as server:
        server.enqueue(MID_BODY_FAILURES[failure], MID_BODY_FAILURES[failure], None)
        result = run(mode, server, **agent_turn(2_000), **FAST)
        entries = server.ledger.entries
    assert result.attempts == 3 and len(entries) == 3
    assert entries[-1].ending is Ending.COMPLETED
    assert result.events[-1].type == "message_stop"
    assert result.message.id == entries[-1].message_id
    assert result.message.usage.output_tokens == entries[-1].output_tokens == 60
    records = accounting.records()
    assert [r.attempt_number for r in records] == [1, 2, 3]
    assert {r.logical_request_id for r in records} == {result.logical_request_id}
    assert all(r.sdk_retry == 0 for r in records), "the SDK's own retries are off: every attempt is counted"
    assert [r.outcome.failed for r in records] == [True, True, False]
    billed_failures = [r for r in records[:2] if r.usage.billed_tokens]
    assert all(r.waste_reason is WasteReason.RETRIED for r in billed_failures)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_retries_stop_at_max_attempts_and_raise_the_last_failure_unchanged(mode):
    with FakeAnthropicServer(ResponseSpec.small(60)) as server:
        server.enqueue(*[Fault.cut_after_deltas(3)] * 3, None)
        with raises_the_cut() as raised:
            run(mode, server, **agent_turn(2_000), max_attempts=3, **FAST)
        assert "incomplete chunked read" in str(raised.value)
        assert len(server.ledger) == 3


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_streams_that_always_end_before_message_stop_raise_incomplete_stream_error(mode):
    with FakeAnthropicServer(ResponseSpec.small(60)) as server:
        server.enqueue(*[Fault.end_early(after_deltas=4)] * 2)
        with pytest.raises(IncompleteStreamError):
            run(mode, server, **agent_turn(2_000), max_attempts=2, **FAST)
        assert len(server.ledger) == 2


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault.http_error(400), anthropic.BadRequestError),
        (Fault.http_error(401), anthropic.AuthenticationError),
        (Fault.error_event(after_deltas=3, error_type="invalid_request_error"), anthropic.APIStatusError),
        (Fault.malformed_json(after_events=6), json.JSONDecodeError),
    ],
)
def test_failures_a_retry_cannot_fix_propagate_unchanged_after_one_attempt(mode, fault, error):
    with FakeAnthropicServer(ResponseSpec.small(60)) as server:
        server.enqueue(fault, None)
        with pytest.raises(error) as raised:
            run(mode, server, **agent_turn(2_000), **FAST)
        assert len(server.ledger) == 1
    assert not isinstance(raised.value, IncompleteStreamError)


def test_the_applications_own_exception_propagates_unchanged_and_is_not_retried():
    class Stop(Exception):
        pass

    calls = []

    class Refusing(anthropic.Anthropic):
        def with_options(self, **kwargs: Any) -> Any:
            calls.append(kwargs)
            raise Stop("the application's own")

    with FakeAnthropicServer(ResponseSpec.small(10)) as server:
        client = Refusing(base_url=server.base_url, api_key="sk-ant-test-key")
        with pytest.raises(Stop, match="the application's own"):
            costwatch.stream_with_retries(client, **agent_turn(500))
        assert calls == [{"max_retries": 0}] and len(server.ledger) == 0


def test_the_wait_honours_retry_after_from_the_api_and_otherwise_backs_off_exponentially_with_jitter():
    with FakeAnthropicServer(ResponseSpec.small(10)) as server:
        client = sync_client(server, max_retries=0)
        server.enqueue(
            Fault.overloaded(retry_after_s=7, retry_after_ms=None), Fault.rate_limited(retry_after_ms=250)
        )
        errors = []
        for _ in range(2):
            with pytest.raises(anthropic.APIStatusError) as raised:
                client.messages.create(**agent_turn(500))
            errors.append(raised.value)
    assert [retry_after_s(e) for e in errors] == [7.0, 0.25]
    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=6.0, jitter=0.25)
    assert policy.backoff_s(1, errors[0], random.Random(0)) == 7.0
    cut = HTTP_MODULE.RemoteProtocolError("peer closed connection")
    rng = random.Random(1)
    waits = [policy.backoff_s(retry, cut, rng) for retry in (1, 2, 3, 4, 5)]
    for wait, ceiling in zip(waits, (1.0, 2.0, 4.0, 6.0, 6.0), strict=True):
        assert 0.75 * ceiling <= wait <= ceiling
    assert len(set(waits)) == 5, "jitter spreads the waits"
    assert all(is_retryable(e) for e in errors) and is_retryable(cut)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_no_retry_waits_past_the_total_time_limit(mode):
    with FakeAnthropicServer(ResponseSpec.small(10)) as server:
        server.enqueue(Fault.overloaded(retry_after_s=60, retry_after_ms=None), None)
        with pytest.raises(anthropic.APIStatusError) as raised:
            run(mode, server, **agent_turn(500), max_total_s=5.0)
        assert raised.value.status_code == 529 and len(server.ledger) == 1


def test_policy_and_request_mistakes_are_named():
    with pytest.raises(ValueError, match="max_attempts must be at least 1"):
        RetryPolicy(max_attempts=0)
    with FakeAnthropicServer(ResponseSpec.small(10)) as server:
        with pytest.raises(TypeError, match="leave out stream="):
            costwatch.stream_with_retries(sync_client(server), stream=False, **agent_turn(500))
        with pytest.raises(TypeError, match="not both"):
            costwatch.stream_with_retries(
                sync_client(server), policy=RetryPolicy(), max_attempts=2, **agent_turn(500)
            )


# -- cache_prefix_on_retry -------------------------------------------------------------------------
def cost_of(entries: tuple[LedgerEntry, ...], *, output: bool = True) -> float:
    price = load_prices().lookup(MODEL)
    assert price is not None
    return sum(
        price.cost(
            Usage(
                input_tokens=e.input_tokens,
                cache_read_tokens=e.cache_read_tokens,
                cache_write_5m_tokens=e.cache_write_5m_tokens,
                cache_write_1h_tokens=e.cache_write_1h_tokens,
                output_tokens=e.output_tokens if output else 0,
            )
        ).total_usd
        for e in entries
    )


def retried_run(
    mode: str, *, cache_prefix_on_retry: bool
) -> tuple[tuple[LedgerEntry, ...], list[dict[str, Any]]]:
    seen = BodiesSeen(ResponseSpec.small(200))
    with FakeAnthropicServer(spec_for=seen) as server:
        server.enqueue(Fault.cut_after_deltas(40), Fault.cut_after_deltas(80), Fault.error_event(20), None)
        result = run(mode, server, cache_prefix_on_retry=cache_prefix_on_retry, **agent_turn(), **FAST)
        assert result.attempts == 4
        return server.ledger.entries, seen.bodies


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_cache_prefix_on_retry_makes_later_retries_read_the_prefix_and_the_ledger_shows_the_saving(mode):
    plain, _ = retried_run(mode, cache_prefix_on_retry=False)
    cached, bodies = retried_run(mode, cache_prefix_on_retry=True)
    # The first attempt goes out as the application wrote it; every retry has one breakpoint.
    assert [count_breakpoints(body) for body in bodies] == [0, 1, 1, 1]
    marked = bodies[1]["messages"][1]["content"][-1]
    assert (
        marked["cache_control"] == {"type": "ephemeral"} and "cache_control" not in bodies[1]["messages"][2]
    )
    assert [e.cache_write_5m_tokens > 0 for e in cached] == [False, True, False, False]
    assert [e.cache_read_tokens > 0 for e in cached] == [False, False, True, True]
    prefix = cached[1].cache_write_5m_tokens
    assert prefix > 0.9 * plain[0].input_tokens  # the stable prefix is nearly the whole prompt here
    # The same prompt either way (the fake counts the breakpoint's own few bytes of JSON as input).
    for with_cache, without in zip(cached, plain, strict=True):
        assert with_cache.input_tokens + with_cache.cache_read_tokens + with_cache.cache_write_tokens == (
            pytest.approx(without.input_tokens, abs=12)
        )
    # Output differs a little: a cut after n deltas carries as many tokens as the body's seed drew.
    saved = cost_of(plain, output=False) - cost_of(cached, output=False)
    price = load_prices().lookup(MODEL)
    assert price is not None
    per_token = price.input_usd_per_mtok / 1e6
    markup = sum(
        c.input_tokens + c.cache_read_tokens + c.cache_write_tokens - p.input_tokens
        for c, p in zip(cached, plain, strict=True)
    )
    # Two reads at 0.1x instead of 1x, less the one 5-minute write's premium of 0.25x (and the markup).
    multiplier = 2 * (1 - price.cache_read_multiplier) - (price.cache_write_5m_multiplier - 1)
    expected = (prefix * multiplier - markup) * per_token
    assert saved == pytest.approx(expected, rel=1e-9)
    # Of four full prompts, the cached run paid 1 + 1.25 + 0.1 + 0.1: about 39% less.
    assert cost_of(plain) - cost_of(cached) > 0.35 * cost_of(plain, output=False)


def test_a_request_that_has_its_own_breakpoints_is_retried_unchanged_and_never_passes_the_limit():
    request = agent_turn()
    request["system"] = [
        {"type": "text", "text": f"part {n} " * 400, "cache_control": {"type": "ephemeral"}} for n in range(4)
    ]
    seen = BodiesSeen(ResponseSpec.small(50))
    with FakeAnthropicServer(spec_for=seen) as server:
        server.enqueue(Fault.cut_after_deltas(5), None)
        result = costwatch.stream_with_retries(
            sync_client(server), cache_prefix_on_retry=True, **request, **FAST
        )
        entries = server.ledger.entries
    assert result.attempts == 2 and [count_breakpoints(body) for body in seen.bodies] == [4, 4]
    assert seen.bodies[0] == seen.bodies[1]
    assert all(e.http_status == 200 for e in entries)


def test_the_fake_refuses_a_fifth_breakpoint_as_the_api_does():
    request = agent_turn(500)
    request["system"] = [
        {"type": "text", "text": f"part {n}", "cache_control": {"type": "ephemeral"}} for n in range(5)
    ]
    with FakeAnthropicServer(ResponseSpec.small(10)) as server, pytest.raises(anthropic.BadRequestError):
        sync_client(server, max_retries=0).messages.create(**request)


def test_the_breakpoint_goes_on_the_last_block_that_can_carry_one_and_the_request_is_not_changed():
    thinking = {"type": "thinking", "thinking": "...", "signature": "s"}
    request = {
        "model": MODEL,
        "system": "sys",
        "messages": [
            {"role": "user", "content": "question"},
            {"role": "assistant", "content": [{"type": "text", "text": "answer"}, thinking]},
            {"role": "user", "content": "next"},
        ],
    }
    marked = with_cache_breakpoint(request, ttl="1h")
    assert marked is not None and count_breakpoints(request) == 0
    assert marked["messages"][1]["content"] == [
        {"type": "text", "text": "answer", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        thinking,
    ]
    only_turn = {"model": MODEL, "system": "sys", "messages": [{"role": "user", "content": "q"}]}
    marked = with_cache_breakpoint(only_turn)
    assert marked is not None
    assert marked["system"] == [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}]
    assert with_cache_breakpoint({"model": MODEL, "messages": [{"role": "user", "content": "q"}]}) is None
    assert with_cache_breakpoint({**only_turn, "cache_control": {"type": "ephemeral"}}) is None


def test_response_content_blocks_of_the_sdk_can_carry_the_breakpoint():
    with FakeAnthropicServer(ResponseSpec.small(20)) as server:
        reply = sync_client(server).messages.create(**agent_turn(500))
    request = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": reply.content},
            {"role": "user", "content": "more"},
        ],
    }
    marked = with_cache_breakpoint(request)
    assert marked is not None
    block = marked["messages"][1]["content"][-1]
    assert block["type"] == "text" and block["cache_control"] == {"type": "ephemeral"}
