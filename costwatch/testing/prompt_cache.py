"""The fake server's prompt cache: ``cache_control`` breakpoints billed as the Messages API bills them.

The API caches the prompt prefix up to each ``cache_control`` breakpoint, in the order tools,
system, messages. A request reads the longest breakpoint prefix that is cached and unexpired (which
refreshes its lifetime), writes the prefixes of the breakpoints after it (at the 5-minute or 1-hour
rate of each breakpoint's ``ttl``), and pays plain input for the rest. A prefix shorter than the
minimum cacheable length is neither written nor read; more than four breakpoints are refused with
a 400. Tokens follow the fake's rule of one token per 4 bytes, counted on each element's compact
JSON without its ``cache_control``. What this leaves out of the real API: the 20-block look-back
for a cached prefix that ends between breakpoints, and per-model minimum lengths (one minimum for
every model here).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_BREAKPOINTS",
    "CacheUsage",
    "PromptCache",
    "TooManyBreakpoints",
    "breakpoint_prefixes",
]

MAX_BREAKPOINTS = 4
"""The API refuses a request with more ``cache_control`` blocks than this."""

TTL_S: Mapping[str, float] = {"5m": 300.0, "1h": 3600.0}
_BYTES_PER_TOKEN = 4


class TooManyBreakpoints(ValueError):
    """The request has more than :data:`MAX_BREAKPOINTS` ``cache_control`` blocks (the API's 400)."""


@dataclass(frozen=True, slots=True)
class CacheUsage:
    """How one request's prompt splits into plain input, cache reads and cache writes."""

    input_tokens: int
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0


@dataclass(frozen=True, slots=True)
class _Breakpoint:
    tokens: int
    ttl: str
    key: str


def _elements(body: Mapping[str, Any]) -> Iterator[tuple[Any, Any]]:
    """Every element of the prompt prefix in the API's order, with its ``cache_control`` (or None)."""
    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            yield tool, tool.get("cache_control") if isinstance(tool, dict) else None
    system = body.get("system")
    if isinstance(system, str):
        yield system, None
    elif isinstance(system, list):
        for block in system:
            yield block, block.get("cache_control") if isinstance(block, dict) else None
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            yield message.get("role"), None
            content = message.get("content")
            if isinstance(content, list):
                for block in content:
                    yield block, block.get("cache_control") if isinstance(block, dict) else None
            else:
                yield content, None


def _without_cache_control(element: Any) -> Any:
    if isinstance(element, dict) and "cache_control" in element:
        return {k: v for k, v in element.items() if k != "cache_control"}
    return element


def breakpoint_prefixes(body: Mapping[str, Any]) -> list[tuple[int, str, str]]:
    """Each breakpoint of ``body`` as (prefix tokens, ttl, cache key), in prompt order.

    A top-level ``cache_control`` (automatic caching) puts one more breakpoint on the last element.
    Raises :class:`TooManyBreakpoints` past the API's limit.
    """
    digest = hashlib.sha256(str(body.get("model", "")).encode())
    size = 0
    found: list[tuple[int, str, str]] = []
    last: tuple[int, str] | None = None
    for element, control in _elements(body):
        text = json.dumps(_without_cache_control(element), separators=(",", ":"), ensure_ascii=False)
        encoded = text.encode()
        size += len(encoded)
        digest.update(encoded)
        digest.update(b"\x00")
        last = (size, digest.hexdigest())
        if isinstance(control, dict):
            found.append((math.ceil(size / _BYTES_PER_TOKEN), str(control.get("ttl") or "5m"), last[1]))
    automatic = body.get("cache_control")
    if isinstance(automatic, dict) and last is not None:
        found.append((math.ceil(last[0] / _BYTES_PER_TOKEN), str(automatic.get("ttl") or "5m"), last[1]))
    if len(found) > MAX_BREAKPOINTS:
        raise TooManyBreakpoints(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(found)}."
        )
    return found


class PromptCache:
    """The cached prefixes of one fake server, by key, with their expiry times. Thread-safe."""

    def __init__(self, *, min_tokens: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_tokens = min_tokens
        """Prefixes shorter than this are never cached (the API's minimum cacheable prompt length)."""
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: dict[str, tuple[float, str]] = {}

    def bill(self, body: Mapping[str, Any], input_tokens: int) -> CacheUsage:
        """Split a request's ``input_tokens`` into input, reads and writes, and update the cache.

        Called when the API starts to answer: a response that is cut afterwards has still written
        (and paid for) its cache entries, so a retry can read them.
        """
        breakpoints = [
            _Breakpoint(min(tokens, input_tokens), ttl if ttl in TTL_S else "5m", key)
            for tokens, ttl, key in breakpoint_prefixes(body)
        ]
        breakpoints = [b for b in breakpoints if b.tokens >= self.min_tokens]
        if not breakpoints:
            return CacheUsage(input_tokens)
        now = self._clock()
        with self._lock:
            read = 0
            hit_at = -1
            for position in range(len(breakpoints) - 1, -1, -1):
                entry = self._expiry.get(breakpoints[position].key)
                if entry is not None and entry[0] > now:
                    hit_at, read = position, breakpoints[position].tokens
                    self._expiry[breakpoints[position].key] = (now + TTL_S[entry[1]], entry[1])
                    break
            writes = {"5m": 0, "1h": 0}
            covered = read
            for point in breakpoints[hit_at + 1 :]:
                if point.tokens > covered:
                    writes[point.ttl] += point.tokens - covered
                    covered = point.tokens
                self._expiry[point.key] = (now + TTL_S[point.ttl], point.ttl)
        return CacheUsage(
            input_tokens=input_tokens - covered,
            cache_read_tokens=read,
            cache_write_5m_tokens=writes["5m"],
            cache_write_1h_tokens=writes["1h"],
        )

    def clear(self) -> None:
        """Forget every cached prefix."""
        with self._lock:
            self._expiry.clear()
