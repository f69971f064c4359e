"""The fake API's tokenizer: one function of (text, tokenizer) that bills and counts, exact on any cut."""

from __future__ import annotations

import random

import pytest

from costwatch.testing import BlockKind, BlockSpec, ResponseSpec
from costwatch.testing.plan import plan_response
from costwatch.testing.tokenizer import Tokenizer, base_pieces, count_request_tokens, count_tokens
from costwatch.testing.vocabulary import (
    VOCABULARY,
    cjk_fragments,
    code_fragments,
    command_json_fragments,
    json_object_fragments,
    prose_fragments,
)

GENERATORS = {
    "prose (text, thinking)": lambda rng, n: prose_fragments(rng, n),
    "code": lambda rng, n: code_fragments(rng, n),
    "JSON (tool input)": lambda rng, n: json_object_fragments(rng, n),
    "escaped code (code-execution input)": lambda rng, n: command_json_fragments(
        rng, n, rng.choice(["command", "code"])
    ),
}
SCALES = (0.6, 1.0, 1.6)
SCRIPTS = ("latin", "cjk", "emoji_cjk")


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_english_code_and_json_read_back_as_the_fragments_they_were_made_of(kind):
    # At the default scale, one token a fragment: what the vocabularies' ratios are documented in.
    generate = GENERATORS[kind]
    for seed in range(400):
        rng = random.Random(seed)
        fragments = generate(rng, rng.randint(1, 300))
        assert set(fragments) <= VOCABULARY
        assert base_pieces("".join(fragments)) == fragments, seed
        assert count_tokens("".join(fragments)) == len(fragments), seed


def _blocks(script: str, scale: float, seed: int) -> ResponseSpec:
    return ResponseSpec(
        blocks=(
            BlockSpec(BlockKind.THINKING, 150 + seed % 7),
            BlockSpec(BlockKind.TEXT, 90 + seed % 11),
            BlockSpec(BlockKind.TOOL_USE, 40 + seed % 5),
            BlockSpec(BlockKind.CODE_EXECUTION, 60 + seed % 3),
            BlockSpec(BlockKind.TEXT, 70 + seed % 13),
            BlockSpec(BlockKind.TOOL_USE, 30 + seed % 9),
        ),
        script=script,
        chars_per_token_scale=scale,
        seed=seed,
    )


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_text_a_cut_stream_delivered_counts_exactly_what_its_deltas_billed(script, scale):
    # What costwatch counts after a cut: each content type's text so far, blocks joined without a
    # separator, the last block cut after any delta. It must count what the deltas sent billed.
    for seed in range(12):
        spec = _blocks(script, scale, seed)
        tokenizer = spec.tokenizer
        events = plan_response(spec, body=b"{}", model_requested="m").events
        deltas = [event for event in events if event.tokens or event.chars]
        assert sum(event.tokens for event in deltas) == spec.output_tokens  # every block exactly
        texts: dict[str, str] = {}
        billed: dict[str, int] = {}
        for event in deltas:
            kind = "tool" if "input" in event.content_type.value else event.content_type.value
            texts[kind] = texts.get(kind, "") + _delta_text(event.payload)
            billed[kind] = billed.get(kind, 0) + event.tokens
            assert tokenizer.count(texts[kind]) == billed[kind], (seed, kind)


def _delta_text(payload: bytes) -> str:
    import json

    delta = json.loads(payload.split(b"data: ", 1)[1])["delta"]
    return str(delta.get("text") or delta.get("thinking") or delta.get("partial_json") or "")


@pytest.mark.parametrize("scale", SCALES)
def test_one_ascii_character_is_one_token_at_every_scale(scale):
    # costwatch takes a message's framing off with a one-character message ("."): it must count 1.
    # (A token is never smaller than a byte; a CJK character of three bytes may be two at 0.6x.)
    tokenizer = Tokenizer(scale)
    assert [tokenizer.count(c) for c in ".a \n{}"] == [1] * 6
    assert tokenizer.count("") == 0


@pytest.mark.parametrize("scale", [0.6, 1.6])
def test_a_scale_changes_what_a_text_counts(scale):
    text = "".join(cjk_fragments(random.Random(5), 2000)) + "".join(prose_fragments(random.Random(5), 2000))
    assert Tokenizer(scale).count(text) != count_tokens(text)
    assert Tokenizer(scale).count(text) == Tokenizer(scale).count(text)  # and the same every time


def test_a_character_outside_the_vocabulary_is_one_token_and_a_rarer_one_two():
    assert count_tokens("\u00e9\u6f22") == 2 and count_tokens("") == 0
    assert count_tokens("\u946b") == 2  # a rarer character, spelled in two byte-level tokens
    assert count_tokens("\u6211\u4eec") == 1  # a common two-character word


def test_a_request_counts_its_framing_and_every_text():
    one = {"model": "m", "messages": [{"role": "user", "content": " the"}]}
    assert count_request_tokens(one) == count_request_tokens({**one, "system": "The"}) - 1
    blocks = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": " the"}]}]}
    assert count_request_tokens(blocks) == count_request_tokens(one)
    with pytest.raises(ValueError, match="prefill"):
        count_request_tokens(
            {"model": "m", "messages": [*one["messages"], {"role": "assistant", "content": "x"}]}
        )
    with pytest.raises(ValueError, match="model"):
        count_request_tokens({"messages": one["messages"]})
