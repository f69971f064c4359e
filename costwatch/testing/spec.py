"""The shape of a fake response: which blocks, how many output tokens, what usage, how fast.

A :class:`ResponseSpec` is plain configuration. The server turns it into the exact sequence of SSE
events (or the JSON body) with :func:`costwatch.testing.plan.plan_response`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_BLOCKS",
    "SCRIPTS",
    "BlockKind",
    "BlockSpec",
    "ContentType",
    "ResponseSpec",
    "input_tokens_for_body",
]


class BlockKind(str, enum.Enum):
    """The content blocks the fake server can answer with."""

    TEXT = "text"
    THINKING = "thinking"
    TOOL_USE = "tool_use"
    BASH_CODE_EXECUTION = "bash_code_execution"
    """A ``server_tool_use`` call of ``bash_code_execution`` and its ``bash_code_execution_tool_result``."""
    CODE_EXECUTION = "code_execution"
    """A ``server_tool_use`` block named ``code_execution`` and its ``code_execution_tool_result``."""


class ContentType(str, enum.Enum):
    """What a delta carries; the ledger counts characters and tokens sent per content type."""

    TEXT = "text"
    """``text_delta`` of a text block (prose vocabulary)."""
    THINKING = "thinking"
    """``thinking_delta`` of a thinking block (prose vocabulary)."""
    TOOL_INPUT = "tool_input"
    """``input_json_delta`` of a client ``tool_use`` block (JSON vocabulary)."""
    SERVER_TOOL_INPUT = "server_tool_input"
    """``input_json_delta`` of a ``server_tool_use`` block (code vocabulary, JSON-escaped)."""


@dataclass(frozen=True, slots=True)
class BlockSpec:
    """One block of the answer and the output tokens it carries.

    A code-execution block expands to two content blocks on the wire: the ``server_tool_use`` call
    (whose input carries ``output_tokens``) and its result block, which carries no output tokens.
    """

    kind: BlockKind
    output_tokens: int
    name: str = "read_file"
    """The tool name of a ``tool_use`` block (ignored for other kinds)."""

    def __post_init__(self) -> None:
        if self.output_tokens < 0:
            raise ValueError("output_tokens must be >= 0")


DEFAULT_BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec(BlockKind.THINKING, 1500),
    BlockSpec(BlockKind.TEXT, 600),
    BlockSpec(BlockKind.BASH_CODE_EXECUTION, 500),
    BlockSpec(BlockKind.TEXT, 900),
    BlockSpec(BlockKind.TOOL_USE, 300),
)
"""A realistic agentic turn: 3,800 output tokens in about 1,900 delta events (with the defaults)."""

_DEFAULT_SERVER_TOOL_USE: Mapping[str, int] = MappingProxyType(
    {"web_search_requests": 0, "web_fetch_requests": 0}
)


SCRIPTS = ("latin", "cjk", "emoji_cjk")
"""The scripts a :class:`ResponseSpec` can write text and thinking in."""


def input_tokens_for_body(body_size: int) -> int:
    """The default ``input_tokens`` of a request: one token per 4 bytes of request body, rounded up."""
    return max(1, math.ceil(body_size / 4))


@dataclass(frozen=True, slots=True)
class ResponseSpec:
    """How the fake server answers one request (content, usage, pacing).

    ``None`` for ``model`` answers with the model the request asked for; ``None`` for
    ``input_tokens`` derives it from the request body (see :func:`input_tokens_for_body`).
    """

    blocks: tuple[BlockSpec, ...] = DEFAULT_BLOCKS
    model: str | None = None
    input_tokens: int | None = None
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    stop_reason: str | None = None
    """``None`` derives it: ``tool_use`` when the last block is a client tool call, else ``end_turn``."""
    server_tool_use: Mapping[str, int] = field(default_factory=lambda: _DEFAULT_SERVER_TOOL_USE)
    """``usage.server_tool_use``; the SDK's model needs ``web_search_requests`` and ``web_fetch_requests``."""
    inference_geo: str | None = None
    """``usage.inference_geo`` (where inference ran: ``global``, ``us``); ``None`` leaves it out."""
    tokens_per_delta: tuple[int, int] = (1, 3)
    """Each delta event carries a uniformly drawn number of tokens in this inclusive range."""
    ping_every: int = 0
    """Send a ``ping`` after every this many delta events as well (0: only the usual pings)."""
    first_byte_delay_s: float = 0.0
    """Wait this long after reading the request before writing the status line."""
    event_interval_s: float = 0.0
    """Wait this long before each SSE event after ``message_start``."""
    seed: int = 0
    """With the request body, fixes every fragment, id and drawn number of the response."""
    prompt_caching: bool = True
    """Bill the request's ``cache_control`` breakpoints through the server's prompt cache (see
    :mod:`costwatch.testing.prompt_cache`); ignored when the cache counts above are set explicitly."""
    script: str = "latin"
    """What text and thinking blocks are written in: ``latin`` (English prose), ``cjk`` (Chinese with
    some kana) or ``emoji_cjk`` (the same with an emoji in place of one character in five, about a
    third of the tokens)."""
    chars_per_token_scale: float = 1.0
    """The fake tokenizer's characters per token, as a multiple of its own (every vocabulary): 0.6
    spells the same kind of text in about 1/0.6 as many tokens, 1.6 in about 1/1.6 as many (see
    :class:`~costwatch.testing.tokenizer.Tokenizer`; the server's ``count_tokens`` counts with it too)."""

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the fake bills this answer's output with (and counts ``count_tokens`` with)."""
        return Tokenizer(self.chars_per_token_scale)

    @property
    def models_prompt_caching(self) -> bool:
        """Whether the server's prompt cache decides this answer's cache reads and writes."""
        explicit = self.cache_read_tokens or self.cache_write_5m_tokens or self.cache_write_1h_tokens
        return self.prompt_caching and not explicit

    def __post_init__(self) -> None:
        low, high = self.tokens_per_delta
        if low < 1 or high < low:
            raise ValueError("tokens_per_delta must be (low, high) with 1 <= low <= high")
        if self.script not in SCRIPTS:
            raise ValueError(f"script must be one of {', '.join(SCRIPTS)}")
        if not 0.1 <= self.chars_per_token_scale <= 10:
            raise ValueError("chars_per_token_scale must be from 0.1 to 10")

    @classmethod
    def small(cls, tokens: int = 12, **kwargs: object) -> ResponseSpec:
        """A one-text-block answer of ``tokens`` output tokens, for fast tests."""
        return cls(blocks=(BlockSpec(BlockKind.TEXT, tokens),), **kwargs)  # type: ignore[arg-type]

    @property
    def output_tokens(self) -> int:
        """Output tokens of the whole answer."""
        return sum(block.output_tokens for block in self.blocks)

    @property
    def derived_stop_reason(self) -> str:
        """The stop reason the answer carries."""
        if self.stop_reason is not None:
            return self.stop_reason
        if self.blocks and self.blocks[-1].kind is BlockKind.TOOL_USE:
            return "tool_use"
        return "end_turn"
