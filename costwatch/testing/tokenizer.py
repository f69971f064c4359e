"""The fake API's tokenizer: the one function that says how many tokens a text is, for billing and counting.

The fake bills a response's output as :meth:`Tokenizer.pieces` cuts its text, and answers
``POST /v1/messages/count_tokens`` with :meth:`Tokenizer.count` of the same kind of text, with the
same tokenizer (the server's :class:`~costwatch.testing.spec.ResponseSpec` names it). Billing and
counting are therefore one function of (text, tokenizer), not two code paths kept in step, and a test
can demand that the counted output of a cut stream equals its billed output, 0 tokens off, in every
script and at every characters-per-token scale.

A text is read in two steps, both pure:

1. **Base pieces**: greedy longest match over :data:`~costwatch.testing.vocabulary.VOCABULARY` (a
   character no entry starts with is a piece of its own, as a byte-level tokenizer falls back to
   bytes). A piece is one base token, except a character of
   :data:`~costwatch.testing.vocabulary.TWO_TOKEN_CHARACTERS` (rarer CJK characters and emoji), which
   a byte-level tokenizer spells in two.
2. **Scale**: at ``chars_per_token_scale`` ``s`` a piece of ``c`` base tokens counts ``c / s``
   tokens, rounded down or up by a hash of the piece and the piece before it, so a text holds ``s``
   times as many characters a token on average: above 1 a piece often counts 0 (it is merged into
   the token before it), below 1 often one more (a word cut in two). A piece counts at most one token
   per UTF-8 byte (no token is smaller than a byte).

What a cut stream needs for its count to be exact, and how it holds:

* A piece's count depends only on the piece and the one before it, so the count of a text is the sum
  of its pieces' counts, and the text of any whole number of pieces (what whole delta events deliver)
  counts exactly what those pieces billed (greedy longest match reads a prefix cut at a piece
  boundary into the same pieces).
* costwatch counts the blocks of one content type joined without a separator, so a block's first
  piece must count the same after another block as alone: the generators start every block with an
  *opening* piece (:func:`is_opening`: a sentence start, a CJK word, anything starting with ``{``),
  which counts as if it began the text, and at least one token.
* costwatch subtracts the framing of a message measured with a one-character message: a text of one
  character (or any piece at the start of a text) counts at least 1, at every scale.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .vocabulary import OPENING_PIECES, TWO_TOKEN_CHARACTERS, VOCABULARY

__all__ = [
    "MESSAGE_FRAMING_TOKENS",
    "REQUEST_FRAMING_TOKENS",
    "Piece",
    "Tokenizer",
    "base_pieces",
    "count_request_tokens",
    "count_tokens",
    "is_opening",
]

REQUEST_FRAMING_TOKENS = 4
"""What the fake's ``count_tokens`` adds to every request, as the real API adds its own framing."""
MESSAGE_FRAMING_TOKENS = 3
"""What the fake's ``count_tokens`` adds per message (the role and turn markers)."""


def _trie_pattern(entries: frozenset[str]) -> str:
    """A regular expression matching the longest of ``entries`` at a position (a trie of them, each
    node trying its longer continuations before ending there), so the match runs in ``re``'s C code."""
    trie: dict[str, Any] = {}
    for entry in entries:
        node = trie
        for character in entry:
            node = node.setdefault(character, {})
        node[""] = {}

    def pattern(node: dict[str, Any]) -> str:
        branches = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return pattern(trie)


_BASE_PIECE = re.compile(_trie_pattern(VOCABULARY) + "|.", re.DOTALL)


def base_pieces(text: str) -> list[str]:
    """``text`` split by greedy longest match over the vocabulary (step 1; its own piece a character
    that starts no entry)."""
    return _BASE_PIECE.findall(text)


def is_opening(piece: str) -> bool:
    """Whether ``piece`` counts as if it began a text wherever it stands (see the module docstring)."""
    return piece in OPENING_PIECES or piece.startswith("{")


@functools.lru_cache(maxsize=1 << 16)
def _unit_hash(key: str) -> float:
    """A fixed number in [0, 1) for ``key``, the same in every process (no ``hash()`` seed)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


Piece = tuple[str, int]
"""A piece of a text and the tokens it counts (0 when merged into the token before it); a plain
tuple, as a plan cuts thousands of them."""


@dataclass(frozen=True, slots=True)
class Tokenizer:
    """A fake tokenizer: the vocabulary at ``chars_per_token_scale`` times its characters per token."""

    chars_per_token_scale: float = 1.0

    def pieces(self, text: str) -> list[Piece]:
        """``text`` as pieces, each with the tokens it counts; their sum is :meth:`count`."""
        scale = self.chars_per_token_scale
        if scale == 1.0:  # the default, for every response of most tests: no piece rounds
            return [(piece, 2 if piece in TWO_TOKEN_CHARACTERS else 1) for piece in base_pieces(text)]
        out: list[Piece] = []
        previous: str | None = None
        for piece in base_pieces(text):
            base = 2 if piece in TWO_TOKEN_CHARACTERS else 1
            starts = previous is None or is_opening(piece)
            exact = base / scale
            tokens = math.floor(exact)
            fraction = exact - tokens
            if fraction > 0:
                key = piece if starts else f"{previous}\x00{piece}"
                tokens += _unit_hash(key) < fraction
            if tokens > 1:
                tokens = min(tokens, len(piece.encode()))
            if starts:
                tokens = max(tokens, 1)
            out.append((piece, tokens))
            previous = piece
        return out

    def count(self, text: str) -> int:
        """How many tokens ``text`` is."""
        return sum(tokens for _, tokens in self.pieces(text))

    def count_request(self, body: Any) -> int:
        """The ``input_tokens`` the fake's ``POST /v1/messages/count_tokens`` answers for a request body.

        The framing (:data:`REQUEST_FRAMING_TOKENS`, :data:`MESSAGE_FRAMING_TOKENS` per message) plus the
        tokens of every text: message contents, the system prompt, and the JSON of any other block and
        of the tools. Raises ``ValueError`` with the API's kind of message for a body the API refuses,
        among them a last message from the assistant: a prefill, which Claude 4.6 and later reject.
        """
        if not isinstance(body, Mapping) or not isinstance(body.get("model"), str) or not body["model"]:
            raise ValueError("model: Field required")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages: at least one message is required")
        total = REQUEST_FRAMING_TOKENS
        for message in messages:
            if not isinstance(message, Mapping) or message.get("role") not in ("user", "assistant"):
                raise ValueError("messages: each message needs a role of user or assistant")
            total += MESSAGE_FRAMING_TOKENS + self._content_tokens(message.get("content"))
        if messages[-1]["role"] == "assistant":
            raise ValueError(
                "This model does not support assistant message prefill. "
                "The conversation must end with a user message."
            )
        if body.get("system"):
            total += self._content_tokens(body["system"])
        for tool in body.get("tools") or ():
            total += self.count(json.dumps(tool, separators=(",", ":")))
        return total

    def _content_tokens(self, content: Any) -> int:
        if isinstance(content, str):
            if not content:
                raise ValueError("messages: text content blocks must be non-empty")
            return self.count(content)
        if not isinstance(content, list) or not content:
            raise ValueError("messages: content must be a string or a non-empty list of blocks")
        total = 0
        for block in content:
            text = block.get("text") if isinstance(block, Mapping) and block.get("type") == "text" else None
            if isinstance(text, str):
                total += self._content_tokens(text)
            else:
                total += self.count(json.dumps(block, separators=(",", ":")))
        return total


DEFAULT_TOKENIZER = Tokenizer()


def count_tokens(text: str) -> int:
    """How many tokens ``text`` is with the default tokenizer."""
    return DEFAULT_TOKENIZER.count(text)


def count_request_tokens(body: Any) -> int:
    """:meth:`Tokenizer.count_request` with the default tokenizer."""
    return DEFAULT_TOKENIZER.count_request(body)
