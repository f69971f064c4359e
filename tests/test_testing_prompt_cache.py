"""The fake API's prompt cache bills breakpoints, lifetimes and minimum lengths as the API does."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ManualClock

from costwatch.testing.prompt_cache import CacheUsage, PromptCache, TooManyBreakpoints, breakpoint_prefixes


def body(*, ttl: str | None = None, system: str = "s" * 8000, turn: str = "new question") -> dict[str, Any]:
    control = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return {
        "model": "claude-sonnet-4-5",
        "system": [{"type": "text", "text": system, "cache_control": control}],
        "messages": [{"role": "user", "content": turn}],
    }


def test_the_first_request_writes_the_prefix_and_a_resend_within_the_lifetime_reads_it():
    clock = ManualClock(1000.0)
    cache = PromptCache(clock=clock)
    ((prefix, ttl, _key),) = breakpoint_prefixes(body())
    assert ttl == "5m" and prefix == (8000 + 26 + 3) // 4  # one token per 4 bytes of the block's compact JSON
    assert cache.bill(body(), 2100) == CacheUsage(93, cache_write_5m_tokens=prefix)
    clock.now += 299
    assert cache.bill(body(turn="another question"), 2100) == CacheUsage(93, cache_read_tokens=prefix)
    clock.now += 299  # the read refreshed the lifetime
    assert cache.bill(body(), 2100).cache_read_tokens == prefix
    clock.now += 301
    assert cache.bill(body(), 2100) == CacheUsage(93, cache_write_5m_tokens=prefix)


def test_a_one_hour_breakpoint_is_written_at_the_one_hour_rate_and_lives_an_hour():
    clock = ManualClock(1000.0)
    cache = PromptCache(clock=clock)
    assert cache.bill(body(ttl="1h"), 3000).cache_write_1h_tokens == 2007
    clock.now += 3599
    assert cache.bill(body(ttl="1h"), 3000).cache_read_tokens == 2007


def test_a_prefix_under_the_minimum_length_is_neither_written_nor_read_and_the_model_keys_the_cache():
    cache = PromptCache(clock=ManualClock(1000.0))
    short = body(system="s" * 400)
    assert cache.bill(short, 500) == CacheUsage(500)
    assert cache.bill(short, 500) == CacheUsage(500)
    cache.bill(body(), 2100)
    other_model = {**body(), "model": "claude-opus-4-6"}
    assert cache.bill(other_model, 2100).cache_write_5m_tokens == 2007


def test_more_than_four_breakpoints_are_refused():
    many = body()
    many["system"] = [
        {"type": "text", "text": str(n), "cache_control": {"type": "ephemeral"}} for n in range(5)
    ]
    with pytest.raises(TooManyBreakpoints, match="maximum of 4"):
        breakpoint_prefixes(many)
