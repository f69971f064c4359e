"""The fake API's tokenizer: counts the tokens of any text the way the fake bills its output.

The fake generates output as fragments of :data:`~costwatch.testing.vocabulary.VOCABULARY`, one
token each, and bills the fragments it sent. :func:`count_tokens` reads a text back into fragments by
greedy longest match (a character no fragment starts with is one token, as a byte-level tokenizer
falls back to bytes), so the text of any whole number of sent fragments counts exactly as billed:
what the fake's ``POST /v1/messages/count_tokens`` needs for tests to demand exact counts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .vocabulary import VOCABULARY

__all__ = [
    "MESSAGE_FRAMING_TOKENS",
    "REQUEST_FRAMING_TOKENS",
    "count_request_tokens",
    "count_tokens",
    "tokens_of",
]

REQUEST_FRAMING_TOKENS = 4
"""What the fake's ``count_tokens`` adds to every request, as the real API adds its own framing."""
MESSAGE_FRAMING_TOKENS = 3
"""What the fake's ``count_tokens`` adds per message (the role and turn markers)."""

_LONGEST = max(map(len, VOCABULARY))


def tokens_of(text: str) -> list[str]:
    """``text`` split into tokens: at each position the longest fragment that matches there."""
    tokens: list[str] = []
    at, end = 0, len(text)
    while at < end:
        for length in range(min(_LONGEST, end - at), 0, -1):
            piece = text[at : at + length]
            if piece in VOCABULARY or length == 1:
                tokens.append(piece)
                at += length
                break
    return tokens


def count_tokens(text: str) -> int:
    """How many tokens ``text`` is."""
    return len(tokens_of(text))


def count_request_tokens(body: Any) -> int:
    """The ``input_tokens`` the fake's ``POST /v1/messages/count_tokens`` answers for a request body.

    The framing (:data:`REQUEST_FRAMING_TOKENS`, :data:`MESSAGE_FRAMING_TOKENS` per message) plus the
    tokens of every text: message contents, the system prompt, and the JSON of any other block and of
    the tools. Raises ``ValueError`` with the API's kind of message for a body the API refuses,
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
        total += MESSAGE_FRAMING_TOKENS + _content_tokens(message.get("content"))
    if messages[-1]["role"] == "assistant":
        raise ValueError(
            "This model does not support assistant message prefill. "
            "The conversation must end with a user message."
        )
    if body.get("system"):
        total += _content_tokens(body["system"])
    for tool in body.get("tools") or ():
        total += count_tokens(json.dumps(tool, separators=(",", ":")))
    return total


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        if not content:
            raise ValueError("messages: text content blocks must be non-empty")
        return count_tokens(content)
    if not isinstance(content, list) or not content:
        raise ValueError("messages: content must be a string or a non-empty list of blocks")
    total = 0
    for block in content:
        if isinstance(block, Mapping) and block.get("type") == "text" and isinstance(block.get("text"), str):
            total += _content_tokens(block["text"])
        else:
            total += count_tokens(json.dumps(block, separators=(",", ":")))
    return total
