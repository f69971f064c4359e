"""Avoidable waste: what a retried request's re-billed prompt would have cost with prompt caching.

Every retry pays its whole prompt again. Had the request's stable prefix (tools, system, earlier
turns; see :mod:`costwatch.prompt_prefix`) carried a ``cache_control`` breakpoint, the first attempt
would have written it to the cache (at the model's 5-minute or 1-hour write multiplier) and each
retry within the cache's lifetime would have read it (at the read multiplier, a tenth of the input
price or less) instead. This module prices both, from what the records hold, for one logical
request at a time: the avoidable dollars are what the attempts' prompts cost minus what they would
have cost with the better of the two lifetimes, against the real gaps between the attempts (a read
refreshes the lifetime; a gap longer than it pays a fresh write).

Pure: no I/O. What is known and what is not:

* the prefix's share of the prompt is measured from the retry's request body, in bytes, and applied
  to the API's exact prompt token counts: the prefix's tokens are an estimate, the counts are not;
* a request none of whose retries was measured (stored before costwatch measured, or a body that
  was not JSON) has no figure: it is counted as *unknown*, with its wasted dollars;
* a request that already reads or writes the cache is left out (its caching is the application's);
* a prefix shorter than :data:`MIN_CACHEABLE_TOKENS` cannot be cached, so it avoids nothing;
* an unpriced model has no figure either (*unknown*).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from .pricing import ModelPrice, PriceTable
from .records import AttemptRecord, Usage

__all__ = ["LIFETIMES_S", "MIN_CACHEABLE_TOKENS", "RequestAvoidable", "Unknown", "avoidable_for_request"]

MIN_CACHEABLE_TOKENS = 1024
"""The shortest prompt prefix the API caches. The API's minimum is 1,024 tokens or more depending on
the model (some need 2,048 or 4,096); the price table does not hold it, so the smallest is assumed,
which can only overstate what caching would have saved for the models with a higher minimum."""

LIFETIMES_S = {"5m": 300.0, "1h": 3600.0}
"""The prompt cache's two lifetimes."""


class Unknown:
    """Why a retried request's avoidable waste is not known (``RequestAvoidable.unknown``)."""

    NOT_MEASURED = "prefix_not_measured"
    UNPRICED = "unpriced"


@dataclass(frozen=True, slots=True)
class RequestAvoidable:
    """The avoidable waste of one retried logical request."""

    logical_request_id: str
    model: str
    workflow: str
    attempts: int
    wasted_usd: float
    """The request's wasted dollars (its failed attempts' cost)."""
    avoidable_usd: float | None
    """Dollars prompt caching of the stable prefix would have saved; ``None`` when unknown."""
    prefix_tokens: int = 0
    """The estimated tokens of the stable prefix (from the measured share of the exact prompt)."""
    lifetime: str | None = None
    """The cache lifetime that saves most, ``5m`` or ``1h`` (``None``: caching saves nothing)."""
    unknown: str | None = None
    """Why ``avoidable_usd`` is ``None`` (an :class:`Unknown` value)."""
    already_cached: bool = False
    """The application already reads or writes the prompt cache on this request: nothing counted."""


def _prompt_tokens(usage: Usage) -> int:
    return usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens


def avoidable_for_request(attempts: Iterable[AttemptRecord], prices: PriceTable) -> RequestAvoidable | None:
    """The avoidable waste of the logical request these attempts (its latest revisions) make up.

    ``None`` when the request was never retried after billing a prompt: nothing was paid twice.
    """
    ordered = sorted(attempts, key=lambda r: (r.attempt_number, r.started_at))
    if not ordered:
        return None
    billed = [r for r in ordered if _prompt_tokens(r.usage) > 0]
    last = ordered[-1]
    wasted = sum(r.wasted_cost_usd for r in ordered)
    model = last.model_name
    base = RequestAvoidable(last.logical_request_id, model, last.workflow, len(ordered), wasted, None)
    if len(billed) < 2:
        return None
    if any(r.usage.cache_read_tokens or r.usage.cache_write_tokens for r in billed):
        return replace(base, avoidable_usd=0.0, already_cached=True)
    price = prices.lookup(model)
    if price is None:
        return replace(base, avoidable_usd=None, unknown=Unknown.UNPRICED)
    measured = [r for r in ordered if r.prompt_bytes and r.stable_prefix_bytes is not None]
    if not measured:
        return replace(base, avoidable_usd=None, unknown=Unknown.NOT_MEASURED)
    share = min(measured[-1].stable_prefix_bytes or 0, measured[-1].prompt_bytes or 0) / (
        measured[-1].prompt_bytes or 1
    )
    prefix = min(round(share * _prompt_tokens(r.usage)) for r in billed)
    if prefix < MIN_CACHEABLE_TOKENS:
        return replace(base, avoidable_usd=0.0, prefix_tokens=prefix)
    actual = sum(price.cost(Usage(input_tokens=_prompt_tokens(r.usage))).total_usd for r in billed)
    best, best_lifetime = actual, None
    for lifetime in LIFETIMES_S:
        cost = _cost_with_cache(billed, prefix, lifetime, price)
        if cost < best:
            best, best_lifetime = cost, lifetime
    # Caching can save on the last attempt too, but no more than the retries paid again.
    saved = min(actual - best, wasted) if best_lifetime is not None else 0.0
    return replace(base, avoidable_usd=max(saved, 0.0), prefix_tokens=prefix, lifetime=best_lifetime)


def _cost_with_cache(billed: Sequence[AttemptRecord], prefix: int, lifetime: str, price: ModelPrice) -> float:
    """What the billed attempts' prompts would have cost with ``prefix`` tokens cached for ``lifetime``."""
    ttl = LIFETIMES_S[lifetime]
    cached_until = None
    total = 0.0
    for record in billed:
        at = record.started_at.timestamp()
        rest = _prompt_tokens(record.usage) - prefix
        if cached_until is not None and at <= cached_until:
            usage = Usage(input_tokens=rest, cache_read_tokens=prefix)
        elif lifetime == "5m":
            usage = Usage(input_tokens=rest, cache_write_5m_tokens=prefix)
        else:
            usage = Usage(input_tokens=rest, cache_write_1h_tokens=prefix)
        cached_until = at + ttl  # a write starts the lifetime, a read refreshes it
        total += price.cost(usage).total_usd
    return total
