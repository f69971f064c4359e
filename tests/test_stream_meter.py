"""The body meter reads usage and content sizes from raw SSE and JSON bytes, and never raises."""

from __future__ import annotations

import gzip
import json

import pytest

from costwatch.estimation import count_scripts
from costwatch.stream_meter import CHAR_KEYS, BodyMeter


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


MESSAGE_START = sse(
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [],
            "usage": {
                "input_tokens": 1200,
                "cache_creation_input_tokens": 300,
                "cache_read_input_tokens": 5000,
                "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
                "output_tokens": 1,
            },
        },
    },
)


def block_start(index: int, block: dict) -> bytes:
    return sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def delta(index: int, kind: str, field: str, text: str) -> bytes:
    return sse(
        "content_block_delta",
        {"type": "content_block_delta", "index": index, "delta": {"type": kind, field: text}},
    )


def full_stream() -> list[bytes]:
    return [
        MESSAGE_START,
        block_start(0, {"type": "thinking", "thinking": "", "signature": ""}),
        delta(0, "thinking_delta", "thinking", "Let me think."),
        delta(0, "signature_delta", "signature", "c2lnbmF0dXJl"),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("ping", {"type": "ping"}),
        block_start(1, {"type": "text", "text": ""}),
        delta(1, "text_delta", "text", "Hello, "),
        delta(1, "text_delta", "text", "world\n"),
        block_start(2, {"type": "tool_use", "id": "toolu_1", "name": "run", "input": {}}),
        delta(2, "input_json_delta", "partial_json", '{"cmd": "ls'),
        delta(2, "input_json_delta", "partial_json", ' -la"}'),
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": {"output_tokens": 42, "server_tool_use": {"web_search_requests": 2}},
            },
        ),
        sse("message_stop", {"type": "message_stop"}),
    ]


def test_completed_stream_reports_exact_usage_and_counts_chars_by_content_type():
    meter = BodyMeter(stream=True)
    for chunk in full_stream():
        meter.feed(chunk)
    assert meter.complete and meter.output_reported
    assert meter.message_id == "msg_1" and meter.model == "claude-sonnet-4-5-20250929"
    usage = meter.usage
    assert (usage.input_tokens, usage.cache_read_tokens) == (1200, 5000)
    assert (usage.cache_write_5m_tokens, usage.cache_write_1h_tokens) == (100, 200)
    assert usage.output_tokens == 42
    assert usage.server_tool_use == {"web_search_requests": 2}
    assert meter.stop_reason == "tool_use"
    assert meter.chars == {
        "thinking": len("Let me think."),
        "text": len("Hello, world\n"),
        "tool_input": len('{"cmd": "ls -la"}'),
        "cjk": 0,
        "symbol": 0,
        "space": 6,
    }
    assert meter.events == 14
    assert meter.bytes_received == sum(len(c) for c in full_stream())


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_chunk_boundaries_anywhere_give_the_same_result(size):
    whole = b"".join(full_stream())
    meter = BodyMeter(stream=True)
    for i in range(0, len(whole), size):
        meter.feed(whole[i : i + size])
    assert meter.complete and meter.usage.output_tokens == 42
    assert meter.chars["text"] == len("Hello, world\n")


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 64])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_chunk_boundaries_anywhere_give_every_event_exactly_once(size, newline):
    whole = b"".join(full_stream()).replace(b"\n", newline)
    meter = BodyMeter(stream=True)
    for i in range(0, len(whole), size):
        meter.feed(whole[i : i + size])
    assert meter.complete and meter.events == 14 and meter.usage.output_tokens == 42
    assert {key: meter.chars[key] for key in ("thinking", "text", "tool_input", "cjk", "symbol")} == {
        "thinking": len("Let me think."),
        "text": len("Hello, world\n"),
        "tool_input": len('{"cmd": "ls -la"}'),
        "cjk": 0,
        "symbol": 0,
    }


def test_one_event_of_megabytes_in_many_chunks_is_measured_whole():
    text = "x" * (3 << 20)
    chunks = full_stream()
    chunks.insert(5, delta(1, "text_delta", "text", text))
    whole = b"".join(chunks)
    meter = BodyMeter(stream=True)
    for i in range(0, len(whole), 65536):
        meter.feed(whole[i : i + 65536])
    assert meter.complete and meter.events == 15
    assert meter.chars["text"] == len("Hello, world\n") + len(text)


def test_crlf_line_endings_are_understood():
    meter = BodyMeter(stream=True)
    for chunk in full_stream():
        meter.feed(chunk.replace(b"\n", b"\r\n"))
    assert meter.complete and meter.chars["tool_input"] == len('{"cmd": "ls -la"}')


def test_a_cut_stream_has_no_reported_output_and_counts_only_whole_events():
    chunks = full_stream()[:9]
    cut = chunks[-1][:-5]  # the last event arrives only in part
    meter = BodyMeter(stream=True)
    for chunk in [*chunks[:-1], cut]:
        meter.feed(chunk)
    assert not meter.complete and not meter.output_reported
    assert meter.usage.input_tokens == 1200
    assert meter.chars["text"] == len("Hello, ")


def test_sse_error_event_sets_the_api_error_type():
    meter = BodyMeter(stream=True)
    meter.feed(MESSAGE_START)
    meter.feed(
        sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    )
    assert meter.api_error_type == "overloaded_error" and not meter.complete


def test_malformed_and_unknown_events_are_counted_not_raised():
    meter = BodyMeter(stream=True)
    meter.feed(MESSAGE_START)
    meter.feed(b"event: content_block_delta\ndata: {not json\n\n")
    meter.feed(b"event: mystery\ndata: [1, 2]\n\n")
    meter.feed(sse("brand_new_event", {"type": "brand_new_event"}))
    meter.feed(b": keep-alive comment\n\n")
    assert meter.malformed_events == 2
    assert meter.events == 4


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": -5, "output_tokens": "many"},
        {"input_tokens": None, "output_tokens": True},
        {"cache_creation": "nonsense", "server_tool_use": [1]},
    ],
)
def test_negative_or_nonsensical_usage_values_are_ignored(usage):
    meter = BodyMeter(stream=True)
    meter.feed(MESSAGE_START)
    meter.feed(sse("message_delta", {"type": "message_delta", "delta": {}, "usage": usage}))
    assert meter.usage.input_tokens == 1200
    assert meter.usage.output_tokens == 1


def test_huge_counts_are_kept_exactly():
    meter = BodyMeter(stream=True)
    meter.feed(MESSAGE_START)
    meter.feed(
        sse("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 10**15}})
    )
    assert meter.usage.output_tokens == 10**15


def test_cache_write_total_without_split_is_priced_as_five_minute_writes():
    meter = BodyMeter(stream=False)
    meter.take_json(
        json.dumps(
            {
                "type": "message",
                "id": "m",
                "model": "x",
                "content": [],
                "usage": {"input_tokens": 1, "cache_creation_input_tokens": 70, "output_tokens": 3},
            }
        ).encode()
    )
    assert (meter.usage.cache_write_5m_tokens, meter.usage.cache_write_1h_tokens) == (70, 0)


def test_json_message_counts_whole_blocks_and_usage():
    body = {
        "id": "msg_2",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [
            {"type": "text", "text": "abc"},
            {"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}},
        ],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }
    meter = BodyMeter(stream=False)
    meter.feed(json.dumps(body).encode())
    meter.finish_json()
    assert meter.complete and meter.output_reported
    assert meter.chars["text"] == 3 and meter.chars["tool_input"] == len('{"a":1}')
    assert meter.stop_reason == "end_turn"


def test_json_error_body_sets_the_api_error_type():
    meter = BodyMeter(stream=False)
    meter.feed(b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}')
    meter.finish_json()
    assert meter.api_error_type == "rate_limit_error" and not meter.complete


def test_gzip_encoded_streams_are_decoded_before_parsing():
    compressed = gzip.compress(b"".join(full_stream()))
    meter = BodyMeter(stream=True, content_encoding="gzip")
    for i in range(0, len(compressed), 50):
        meter.feed(compressed[i : i + 50])
    assert meter.complete and meter.usage.output_tokens == 42
    assert meter.bytes_received == len(compressed)


def test_a_later_cache_write_total_without_split_keeps_the_known_split():
    meter = BodyMeter(stream=True)
    meter.feed(MESSAGE_START)
    meter.feed(
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {},
                "usage": {"cache_creation_input_tokens": 300, "output_tokens": 9},
            },
        )
    )
    assert (meter.usage.cache_write_5m_tokens, meter.usage.cache_write_1h_tokens) == (100, 200)


@pytest.mark.parametrize("ensure_ascii", [False, True], ids=["utf8", "ascii_escapes"])
def test_delta_lengths_and_scripts_are_exact_for_any_text_in_the_apis_compact_form(ensure_ascii):
    import random

    rng = random.Random(11)
    alphabet = ["a", " ", "\n", "\t", '"', "\\", "/", "é", "中", "😀", "\\n", '\\"', "}", "{", "\x01"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    meter = BodyMeter(stream=True)
    for kind, field in (
        ("text_delta", "text"),
        ("thinking_delta", "thinking"),
        ("input_json_delta", "partial_json"),
    ):
        for text in texts:
            data = json.dumps(
                {"type": "content_block_delta", "index": 3, "delta": {"type": kind, field: text}},
                separators=(",", ":"),
                ensure_ascii=ensure_ascii,
            )
            meter.feed(b"event: content_block_delta\ndata: " + data.encode() + b"\n\n")
    scripts = [count_scripts(t) for t in texts]
    alphabetic = sum(len(t) - cjk - symbol for t, (cjk, symbol, _) in zip(texts, scripts, strict=True))
    assert {key: meter.chars[key] for key in ("text", "thinking", "tool_input", "cjk", "symbol")} == {
        "text": alphabetic,
        "thinking": alphabetic,
        "tool_input": alphabetic,
        "cjk": 3 * sum(cjk for cjk, _, _ in scripts),
        "symbol": 3 * sum(symbol for _, symbol, _ in scripts),
    }
    assert meter.malformed_events == 0


def test_the_requested_model_is_the_top_level_one_whatever_the_messages_and_tools_say():
    from costwatch.accounting import _requested_model

    body = {
        "max_tokens": 5,
        "messages": [{"role": "assistant", "content": [{"type": "tool_use", "input": {"model": "other"}}]}],
        "model": "claude-haiku-4-5",
        "system": 'say "model": "x"',
        "tools": [{"name": "t", "input_schema": {"properties": {"model": {"type": "string"}}}}],
    }
    for separators in ((",", ":"), (", ", ": ")):
        assert _requested_model(json.dumps(body, separators=separators).encode()) == "claude-haiku-4-5"
    assert _requested_model(b"{}") == "" and _requested_model(b"\xff not json") == ""


def test_a_json_bodys_blocks_are_counted_when_asked_and_let_go_with_the_parse():
    body = {
        "type": "message",
        "id": "m",
        "model": "x",
        "content": [{"type": "text", "text": "abc de"}],
        "usage": {"input_tokens": 1, "output_tokens": 2},
    }
    meter = BodyMeter(stream=False)
    meter.take_json(json.dumps(body).encode())
    assert meter.chars["text"] == 6 and meter.chars["space"] == 1
    assert meter.chars["text"] == 6  # counted once
    handed = BodyMeter(stream=False)
    handed.take_json(json.dumps(body).encode())
    assert handed.take_parsed() == body and handed.take_parsed() is None
    assert handed.parsed is None and handed.chars["text"] == 0  # nothing of the parse is kept


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_a_json_body_in_another_unicode_encoding_is_read_as_json_loads_reads_it(encoding):
    body = {"type": "message", "id": "m", "model": "x", "content": [], "usage": {"output_tokens": 4}}
    meter = BodyMeter(stream=False)
    meter.take_json(json.dumps(body).encode(encoding))
    assert meter.complete and meter.message_id == "m" and meter.usage.output_tokens == 4


def test_counts_that_are_bools_negative_or_not_whole_numbers_keep_their_value():
    meter = BodyMeter(stream=False)
    usage = {"input_tokens": True, "output_tokens": -1, "cache_read_input_tokens": 2.0}
    meter.take_json(json.dumps({"type": "message", "content": [], "usage": usage}).encode())
    assert (meter.usage.input_tokens, meter.usage.output_tokens, meter.usage.cache_read_tokens) == (0, 0, 0)


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"message","id":"m"}',
        ' {"type":"message","id":"m"}\n',
        '\t{"type": "message", "id": "m"} \r\n',
    ],
)
def test_a_json_body_with_or_without_whitespace_around_it_is_read_as_json_loads_reads_it(text):
    meter = BodyMeter(stream=False)
    meter.take_json(text.encode())
    assert meter.complete and meter.message_id == "m" and meter.take_parsed() == json.loads(text)


@pytest.mark.parametrize("text", ['{"type":"message"} {"type":"message"}', '{"type":"message"', "", " "])
def test_a_json_body_json_loads_refuses_is_malformed_and_not_complete(text):
    with pytest.raises(ValueError):
        json.loads(text)
    meter = BodyMeter(stream=False)
    meter.take_json(text.encode())
    assert meter.malformed_events == 1 and not meter.complete and meter.take_parsed() is None


def test_an_events_json_is_read_as_json_loads_reads_it_whitespace_around_it_or_not():
    meter = BodyMeter(stream=True)
    meter.feed(MESSAGE_START)
    data = b'{"type": "message_delta", "delta": {}, "usage": {"output_tokens": 7}}'
    meter.feed(b"event: message_delta\ndata:  " + data + b" \n\n")
    meter.feed(b'event: message_stop\ndata: {"type":"message_stop"}\t\n\n')
    assert meter.usage.output_tokens == 7 and meter.complete and meter.malformed_events == 0
    trailing = BodyMeter(stream=True)
    trailing.feed(MESSAGE_START)
    trailing.feed(b'event: message_stop\ndata: {"type":"message_stop"} {}\n\n')  # json.loads: "Extra data"
    assert (
        trailing.malformed_events == 1 and trailing.unreadable == "JSONDecodeError" and not trailing.complete
    )


def test_each_meter_counts_characters_of_its_own_from_zero():
    counted = BodyMeter(stream=True)
    for chunk in full_stream():
        counted.feed(chunk)
    assert counted.chars["text"] > 0 and counted.chars["thinking"] > 0
    fresh = BodyMeter(stream=True)
    assert fresh.chars == dict.fromkeys(CHAR_KEYS, 0)
    fresh.feed(MESSAGE_START)
    fresh.feed(delta(0, "text_delta", "text", "abc"))
    assert fresh.chars["text"] == 3 and BodyMeter(stream=False).chars == dict.fromkeys(CHAR_KEYS, 0)
