"""The fake API's tokenizer reads any text it generated back into exactly the tokens it billed."""

from __future__ import annotations

import random

import pytest

from costwatch.testing.tokenizer import count_request_tokens, count_tokens, tokens_of
from costwatch.testing.vocabulary import (
    VOCABULARY,
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
# The stream meter counts a client tool's input and a code-execution call's input as one content type.
TOOL_INPUTS = lambda rng, n: (  # noqa: E731
    json_object_fragments(rng, n) if rng.random() < 0.5 else command_json_fragments(rng, n, "code")
)


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_generated_text_reads_back_as_the_fragments_it_was_made_of(kind):
    generate = GENERATORS[kind]
    for seed in range(600):
        rng = random.Random(seed)
        fragments = generate(rng, rng.randint(1, 300))
        assert set(fragments) <= VOCABULARY
        assert tokens_of("".join(fragments)) == fragments, seed
        # What a cut stream delivered: whole deltas, so a prefix at a fragment boundary.
        cut = rng.randint(0, len(fragments))
        assert count_tokens("".join(fragments[:cut])) == cut


@pytest.mark.parametrize("kind", [*(kind for kind in GENERATORS if kind != "code"), "tool inputs mixed"])
def test_blocks_of_one_content_type_joined_count_as_their_sum(kind):
    # costwatch counts all the text of one content type at once, blocks joined without a separator.
    # (Bare code is never a block of its own: it is sent inside a code-execution call's JSON.)
    generate = GENERATORS.get(kind, TOOL_INPUTS)
    for seed in range(300):
        rng = random.Random(seed)
        blocks = [generate(rng, rng.randint(1, 120)) for _ in range(3)]
        assert count_tokens("".join("".join(b) for b in blocks)) == sum(map(len, blocks)), seed


def test_a_character_outside_the_vocabulary_is_one_token():
    assert count_tokens("\u00e9\u6f22") == 2 and count_tokens("") == 0


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
