"""The fake server's pure parts: token fragments, response plans, cut points and billing, fault values."""

from __future__ import annotations

import json
import random

import pytest

from costwatch.estimation import count_scripts
from costwatch.testing import (
    BlockKind,
    BlockSpec,
    DropProfile,
    Fault,
    FaultKind,
    ReceivedRequest,
    ResponseSpec,
    input_tokens_for_body,
)
from costwatch.testing.plan import (
    TERMINAL_CHUNK,
    StreamCut,
    plan_response,
    position_after_deltas,
    sent_prefix,
    stream_cut_for,
)
from costwatch.testing.tokenizer import Tokenizer
from costwatch.testing.vocabulary import (
    cjk_fragments,
    code_fragments,
    command_json_fragments,
    json_object_fragments,
    prose_fragments,
)

BODY = b'{"model":"claude-opus-4-6","messages":[]}'


def _ratio(fragments: list[str]) -> float:
    return sum(map(len, fragments)) / len(fragments)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vocabularies_have_the_documented_characters_per_token(seed: int) -> None:
    rng = random.Random(seed)
    assert 4.0 <= _ratio(prose_fragments(rng, 4000)) <= 4.5
    assert 3.0 <= _ratio(code_fragments(rng, 4000)) <= 3.5
    assert 2.8 <= _ratio(json_object_fragments(rng, 4000)) <= 3.2


@pytest.mark.parametrize("count", range(0, 40))
def test_fragment_generators_give_exactly_the_tokens_asked_for_and_valid_json(count: int) -> None:
    rng = random.Random(count)
    assert len(prose_fragments(rng, count)) == count
    assert len(code_fragments(rng, count)) == count
    tool_input = json_object_fragments(rng, count)
    command = command_json_fragments(rng, count, "command")
    assert len(tool_input) == len(command) == count
    if count:
        assert isinstance(json.loads("".join(tool_input)), dict)
        assert isinstance(json.loads("".join(command)), dict)


def test_cjk_prose_is_about_one_character_a_token_and_emoji_cost_two_or_three() -> None:
    tokenizer = Tokenizer()
    cjk = "".join(cjk_fragments(random.Random(0), 4000))
    assert 0.95 <= len(cjk) / tokenizer.count(cjk) <= 1.2
    assert count_scripts(cjk)[0] == len(cjk.replace("\n", ""))  # CJK characters only
    mixed = tokenizer.pieces("".join(cjk_fragments(random.Random(0), 4000, emoji_share=0.2)))
    emoji_tokens = sum(tokens for text, tokens in mixed if count_scripts(text)[1])
    assert {tokenizer.count(emoji) for emoji in ("\U0001f680", "\u2728", "\u2764\ufe0f")} == {2, 3}
    assert 0.25 <= emoji_tokens / sum(tokens for _, tokens in mixed) <= 0.4


WRITERS = {
    "prose": prose_fragments,
    "code": code_fragments,
    "JSON": json_object_fragments,
    "CJK": cjk_fragments,
}


@pytest.mark.parametrize("scale", [0.6, 0.8, 1.25, 1.6])
@pytest.mark.parametrize("kind", list(WRITERS))
def test_a_rescaled_tokenizer_holds_about_scale_times_the_characters_a_token(kind: str, scale: float) -> None:
    # About: a piece rounds up or down by a hash, and no token is smaller than a byte (code's many
    # one-character pieces keep 0.6x at about 0.68x).
    text = "".join(WRITERS[kind](random.Random(3), 6000))
    natural, scaled = Tokenizer().count(text), Tokenizer(scale).count(text)
    assert natural / scaled == pytest.approx(scale, rel=0.15)


@pytest.mark.parametrize("script", ["latin", "cjk", "emoji_cjk"])
@pytest.mark.parametrize("scale", [0.6, 1.0, 1.6])
def test_a_spec_s_script_and_scale_change_the_text_never_the_token_counts(script: str, scale: float) -> None:
    blocks = (BlockSpec(BlockKind.TEXT, 800), BlockSpec(BlockKind.TOOL_USE, 200))
    spec = ResponseSpec(blocks=blocks, script=script, chars_per_token_scale=scale)
    plan = plan_response(spec, body=BODY, model_requested="claude-opus-4-6")
    assert plan.tokens_by_type() == {"text": 800, "tool_input": 200}
    base = plan_response(ResponseSpec(blocks=blocks, script=script), body=BODY, model_requested="m")
    chars, base_chars = plan.chars_by_type(), base.chars_by_type()
    assert chars["text"] / base_chars["text"] == pytest.approx(scale, rel=0.12)
    assert isinstance(plan.message["content"][1]["input"], dict)


def test_a_spec_refuses_an_unknown_script_or_a_scale_out_of_range() -> None:
    with pytest.raises(ValueError, match="script"):
        ResponseSpec(script="klingon")
    with pytest.raises(ValueError, match="chars_per_token_scale"):
        ResponseSpec(chars_per_token_scale=0)


def test_fragments_are_deterministic_for_a_seed() -> None:
    assert prose_fragments(random.Random(5), 50) == prose_fragments(random.Random(5), 50)
    assert prose_fragments(random.Random(5), 50) != prose_fragments(random.Random(6), 50)


def test_plan_output_tokens_are_the_fragments_of_its_deltas() -> None:
    plan = plan_response(ResponseSpec(), body=BODY, model_requested="claude-opus-4-6")
    deltas = [event for event in plan.events if event.is_delta]

    assert sum(event.tokens for event in deltas) == plan.output_tokens == 3800
    assert plan.tokens_by_type() == {
        "thinking": 1500,
        "text": 1500,
        "server_tool_input": 500,
        "tool_input": 300,
    }
    signature = [event for event in deltas if b"signature_delta" in event.payload]
    assert len(signature) == 1 and signature[0].tokens == 0
    assert all(1 <= event.tokens <= 3 for event in deltas if event.content_type is not None)
    assert len(plan.events) >= 1800


def test_plan_stream_and_json_body_carry_the_same_content_and_usage() -> None:
    spec = ResponseSpec(cache_read_tokens=100, cache_write_5m_tokens=20, cache_write_1h_tokens=3)
    plan = plan_response(spec, body=BODY, model_requested="claude-opus-4-6")
    datas = [json.loads(event.payload.decode().split("data: ", 1)[1]) for event in plan.events]
    start, final = datas[0]["message"], datas[-2]

    assert [d["type"] for d in datas[:2]] == ["message_start", "ping"] and datas[-1]["type"] == "message_stop"
    assert start["usage"]["output_tokens"] == 1
    assert start["usage"]["cache_creation"] == {
        "ephemeral_5m_input_tokens": 20,
        "ephemeral_1h_input_tokens": 3,
    }
    assert final["usage"]["output_tokens"] == plan.message["usage"]["output_tokens"] == 3800
    assert (
        final["usage"]["cache_creation_input_tokens"] == 23
        and final["usage"]["cache_read_input_tokens"] == 100
    )
    assert final["delta"]["stop_reason"] == plan.message["stop_reason"] == "tool_use"
    text = "".join(d["delta"]["text"] for d in datas if d.get("delta", {}).get("type") == "text_delta")
    blocks = plan.message["content"]
    assert text == blocks[1]["text"] + blocks[4]["text"]
    assert (
        blocks[3]["type"] == "bash_code_execution_tool_result" and blocks[3]["tool_use_id"] == blocks[2]["id"]
    )


def test_plan_is_deterministic_per_body_and_seed_but_ids_change_per_arrival() -> None:
    spec = ResponseSpec.small(30)
    first = plan_response(spec, body=BODY, model_requested="m")
    retry = plan_response(spec, body=BODY, model_requested="m", arrival=2)
    other = plan_response(ResponseSpec.small(30, seed=1), body=BODY, model_requested="m")

    assert first.message["content"] == retry.message["content"] and first.message_id != retry.message_id
    assert first.message["content"] != other.message["content"]


def test_input_tokens_default_to_a_quarter_of_the_body_bytes_rounded_up() -> None:
    assert [input_tokens_for_body(n) for n in (0, 1, 4, 5, 4000)] == [1, 1, 1, 2, 1000]
    plan = plan_response(ResponseSpec.small(3), body=b"x" * 401, model_requested="m")
    assert plan.input_tokens == 101


def test_an_event_is_billed_only_once_its_whole_sse_text_is_on_the_wire() -> None:
    events = plan_response(ResponseSpec.small(10), body=BODY, model_requested="m").events
    through_first_delta = position_after_deltas(events, 1)
    head = sum(len(event.framed) for event in events[: through_first_delta - 1])
    delta = events[through_first_delta - 1]
    size_line = len(delta.framed) - len(delta.payload) - 2

    almost = sent_prefix(events, StreamCut(through_first_delta - 1, size_line + len(delta.payload) - 1))
    cut = stream_cut_for(Fault.cut_after_bytes(head + size_line + len(delta.payload)), events)
    assert cut is not None
    whole = sent_prefix(events, cut)

    assert almost.deltas == 0 and almost.output_tokens == 0
    assert whole.deltas == 1 and whole.output_tokens == delta.tokens
    assert whole.body_bytes == head + size_line + len(delta.payload)


def test_cut_points_of_the_count_based_faults() -> None:
    events = plan_response(
        ResponseSpec.small(10, tokens_per_delta=(2, 2)), body=BODY, model_requested="m"
    ).events
    # message_start, ping, content_block_start, 5 deltas, content_block_stop, message_delta, message_stop
    assert len(events) == 11
    assert stream_cut_for(Fault.cut_after_deltas(0), events) == StreamCut(3)
    assert stream_cut_for(Fault.cut_after_deltas(2), events) == StreamCut(5)
    assert stream_cut_for(Fault.cut_after_deltas(5), events) == StreamCut(8)
    assert stream_cut_for(Fault.cut_after_deltas(6), events) is None
    assert stream_cut_for(Fault.cut_before_message_stop(), events) == StreamCut(10)
    assert stream_cut_for(Fault.cut_in_chunk_size(4), events) == StreamCut(4, 1)
    assert stream_cut_for(Fault.cut_after_events(11), events) is None
    total = sum(len(event.framed) for event in events)
    assert stream_cut_for(Fault.cut_after_bytes(total + 2), events) == StreamCut(11, 2)
    assert stream_cut_for(Fault.cut_after_bytes(total + len(TERMINAL_CHUNK)), events) is None
    assert sent_prefix(events, StreamCut(10)).output_tokens == 10


@pytest.mark.parametrize(
    "fault",
    [
        Fault.cut_after_events(3),
        Fault.cut_after_deltas(40),
        Fault.cut_after_bytes(1234),
        Fault.cut_mid_event(7),
        Fault.cut_in_chunk_size(7),
        Fault.cut_after_seconds(0.5),
        Fault.cut_before_message_stop(),
        Fault.error_event(5, error_type="api_error"),
        Fault.overloaded(retry_after_s=2, retry_after_ms=None),
        Fault.rate_limited(),
        Fault.internal_server_error(retry_after_ms=250),
        Fault.reset(),
        Fault.stall_before_headers(),
        Fault.stall_mid_body(4, seconds=1.5),
        Fault.malformed_json(6),
        Fault.unknown_event(2),
    ],
    ids=lambda fault: fault.kind.value,
)
def test_every_fault_round_trips_through_its_header_text(fault: Fault) -> None:
    assert Fault.from_header(fault.header_value()) == fault


def test_fault_header_text_is_short_and_rejects_unknown_arguments() -> None:
    assert Fault.cut_after_deltas(5).header_value() == "cut_after_deltas:count=5"
    assert Fault.from_header("http_error:status=429").error_type == "rate_limit_error"
    with pytest.raises(ValueError):
        Fault.from_header("cut_after_deltas:n=5")
    with pytest.raises(ValueError):
        Fault.from_header("explode")
    assert FaultKind.CUT_MID_EVENT.cuts and not FaultKind.ERROR_EVENT.cuts


def test_drop_profile_is_a_pure_function_of_seed_body_and_arrival() -> None:
    requests = [
        ReceivedRequest("POST", "/v1/messages", "", body_digest=f"d{i}", arrival=1) for i in range(400)
    ]
    half = DropProfile(0.5, seed=9)
    picks = [half.choose(request, 50) for request in requests]

    assert picks == [half.choose(request, 50) for request in requests]
    assert 150 <= sum(pick is not None for pick in picks) <= 250
    assert all(1 <= pick <= 50 for pick in picks if pick is not None)
    assert all(DropProfile(0.0).choose(request, 50) is None for request in requests)
    assert all(DropProfile(1.0).choose(request, 50) is not None for request in requests)
    with pytest.raises(ValueError):
        DropProfile(1.5)


def test_stop_reason_and_small_spec_shape() -> None:
    assert ResponseSpec.small(5).derived_stop_reason == "end_turn"
    assert ResponseSpec().derived_stop_reason == "tool_use"
    assert ResponseSpec(
        blocks=(BlockSpec(BlockKind.TEXT, 5),), stop_reason="max_tokens"
    ).derived_stop_reason == ("max_tokens")
    with pytest.raises(ValueError):
        ResponseSpec(tokens_per_delta=(0, 2))
