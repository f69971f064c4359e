"""The stable prefix of a Messages API request: what a retry resends unchanged, and could read from cache.

The prompt is read by the API in the order tools, system, messages. Everything but the last message
(the new user turn, typically a question or a tool result) is what an agent loop sends again on
every retry and every later turn: the *stable prefix*. Two things are done with it here, both pure:

- :func:`measure` gives its size and the whole prompt's, in bytes of compact JSON, from the body's
  structure. Only sizes leave this module: never a string of the prompt.
- :func:`with_cache_breakpoint` puts one ``cache_control`` breakpoint on its last block, so that a
  retried request reads the prefix from the prompt cache instead of paying for it again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

__all__ = ["MAX_CACHE_BREAKPOINTS", "PromptSize", "count_breakpoints", "measure", "with_cache_breakpoint"]

MAX_CACHE_BREAKPOINTS = 4
"""The API refuses a request with more blocks marked ``cache_control`` than this."""

# Blocks the API refuses a cache_control on.
_UNCACHEABLE_BLOCKS = frozenset({"thinking", "redacted_thinking"})


class PromptSize(NamedTuple):
    """The sizes of a request's prompt and of its stable prefix, in bytes of compact JSON."""

    prompt_bytes: int
    stable_prefix_bytes: int


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode())


def measure(body: Mapping[str, Any]) -> PromptSize | None:
    """The prompt's size and its stable prefix's, from a parsed request body; None if it has no messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    stable = 0
    for key in ("tools", "system"):
        if body.get(key):
            stable += _size(body[key])
    earlier = sum(_size(message) for message in messages[:-1])
    return PromptSize(stable + earlier + _size(messages[-1]), stable + earlier)


def _blocks_with_control(request: Mapping[str, Any]) -> Iterator[Any]:
    for key in ("tools", "system"):
        value = request.get(key)
        if isinstance(value, list):
            yield from value
    messages = request.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, list):
                yield from content


def _control_of(block: Any) -> Any:
    if isinstance(block, Mapping):
        return block.get("cache_control")
    return getattr(block, "cache_control", None)


def count_breakpoints(request: Mapping[str, Any]) -> int:
    """How many ``cache_control`` breakpoints a request (SDK keyword arguments) already has.

    A top-level ``cache_control`` (automatic caching) counts as one.
    """
    count = sum(1 for block in _blocks_with_control(request) if _control_of(block) is not None)
    return count + (1 if request.get("cache_control") is not None else 0)


def _as_dict(block: Any) -> dict[str, Any] | None:
    """A content block as a plain dict (SDK response models included), or None if it cannot be one."""
    if isinstance(block, Mapping):
        return dict(block)
    to_dict = getattr(block, "to_dict", None) or getattr(block, "model_dump", None)
    if callable(to_dict):
        converted = to_dict()
        return dict(converted) if isinstance(converted, Mapping) else None
    return None


def _marked(block: Any, control: Mapping[str, str]) -> dict[str, Any] | None:
    as_dict = _as_dict(block)
    if as_dict is None or as_dict.get("type") in _UNCACHEABLE_BLOCKS:
        return None
    if as_dict.get("type") == "text" and not as_dict.get("text"):
        return None  # the API refuses cache_control on an empty text block
    as_dict["cache_control"] = dict(control)
    return as_dict


def with_cache_breakpoint(request: Mapping[str, Any], *, ttl: str | None = None) -> dict[str, Any] | None:
    """A copy of ``request`` with a ``cache_control`` breakpoint at the end of its stable prefix.

    ``None`` when the request already has a breakpoint (the application manages its own caching,
    and another could pass the API's limit of four), when there is no stable prefix, or when no
    block of it can carry one. The request itself is never changed.
    """
    if count_breakpoints(request) > 0:
        return None
    control = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    out = dict(request)
    messages = request.get("messages")
    if isinstance(messages, list) and len(messages) > 1:
        for index in range(len(messages) - 2, -1, -1):
            message = messages[index]
            if not isinstance(message, Mapping):
                continue
            content = message.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list):
                continue
            for position in range(len(blocks) - 1, -1, -1):
                marked = _marked(blocks[position], control)
                if marked is not None:
                    new_blocks = [*blocks[:position], marked, *blocks[position + 1 :]]
                    new_messages = list(messages)
                    new_messages[index] = {**message, "content": new_blocks}
                    out["messages"] = new_messages
                    return out
    system = request.get("system")
    if system:
        blocks = [{"type": "text", "text": system}] if isinstance(system, str) else system
        if isinstance(blocks, list):
            for position in range(len(blocks) - 1, -1, -1):
                marked = _marked(blocks[position], control)
                if marked is not None:
                    out["system"] = [*blocks[:position], marked, *blocks[position + 1 :]]
                    return out
    tools = request.get("tools")
    if isinstance(tools, list) and tools:
        marked = _marked(tools[-1], control)
        if marked is not None:
            out["tools"] = [*tools[:-1], marked]
            return out
    return None
