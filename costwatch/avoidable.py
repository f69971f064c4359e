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
from datetime import datetime
from typing import NamedTuple

from .pricing import PriceTable
from .records import AttemptRecord, Usage

__all__ = [
    "LIFETIMES_S",
    "MIN_CACHEABLE_TOKENS",
    "PromptAttempt",
    "RequestAvoidable",
    "RetriedAlike",
    "RetriedPrompt",
    "RetriedRequest",
    "Unknown",
    "avoidable_for_prompts",
    "avoidable_for_request",
    "avoidable_of_alike",
    "avoidable_of_request",
    "avoidable_of_retried",
]

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


class PromptAttempt(NamedTuple):
    """What the avoidable waste reads of one attempt: its prompt's tokens and sizes, and its price's keys.

    The store reads these columns alone (``SqlStore.retried_prompts``); live records give
    :meth:`of`.
    """

    logical_request_id: str
    attempt_number: int
    started_at: datetime
    model: str
    """The model that answered, else the one asked for (``AttemptRecord.model_name``)."""
    workflow: str
    platform: str
    endpoint: str | None
    inference_geo: str | None
    prompt_tokens: int
    """Input, cache reads and cache writes: the whole prompt as the API counted it."""
    cache_tokens: int
    """Cache reads and writes."""
    wasted_usd: float
    prompt_bytes: int | None
    stable_prefix_bytes: int | None

    @classmethod
    def of(cls, record: AttemptRecord) -> PromptAttempt:
        """The parts of ``record`` the avoidable waste reads."""
        usage = record.usage
        cache = usage.cache_read_tokens + usage.cache_write_tokens
        return cls(
            record.logical_request_id,
            record.attempt_number,
            record.started_at,
            record.model_name,
            record.workflow,
            record.platform,
            record.endpoint,
            record.inference_geo,
            usage.input_tokens + cache,
            cache,
            record.wasted_cost_usd,
            record.prompt_bytes,
            record.stable_prefix_bytes,
        )


@dataclass(frozen=True, slots=True)
class RequestAvoidable:
    """The avoidable waste of one retried logical request (or of ``requests`` alike ones, summed)."""

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
    requests: int = 1
    """How many logical requests this stands for: more than one for requests the store summed because
    there was nothing to price one by one (:func:`avoidable_of_alike`; ``logical_request_id`` is
    then ``""``, the other figures are their sums)."""


class RetriedAlike(NamedTuple):
    """Retried logical requests summed in the store because none has a prefix to price: those that
    already use the prompt cache, or none of whose attempts was measured. Keyed by the last
    attempt's model, workflow, platform and endpoint (what decides whether the model is priced)."""

    already_cached: bool
    model: str
    workflow: str
    platform: str
    endpoint: str | None
    requests: int
    attempts: int
    wasted_usd: float


def _priced(prices: PriceTable, attempt: RetriedRequest | RetriedAlike, usage: Usage) -> float | None:
    # The one pricing function (as `costwatch reprice` uses it): a platform's own rates and endpoint.
    cost = prices.cost(
        attempt.model,
        usage,
        platform=attempt.platform,
        endpoint=attempt.endpoint,
        inference_geo=attempt.inference_geo if isinstance(attempt, RetriedRequest) else None,
    )
    return None if cost is None else cost.total_usd


def avoidable_for_request(attempts: Iterable[AttemptRecord], prices: PriceTable) -> RequestAvoidable | None:
    """The avoidable waste of the logical request these attempts (its latest revisions) make up.

    ``None`` when the request was never retried after billing a prompt: nothing was paid twice.
    """
    return avoidable_for_prompts([PromptAttempt.of(record) for record in attempts], prices)


class RetriedPrompt(NamedTuple):
    """One attempt of a retried request as its pricing one by one reads it: when it started, its
    prompt as the API counted it, and the prompt's and the stable prefix's sizes (if measured)."""

    attempt_number: int
    started_at: datetime
    prompt_tokens: int
    prompt_bytes: int | None
    stable_prefix_bytes: int | None


@dataclass(frozen=True, slots=True)
class RetriedRequest:
    """What the avoidable waste reads of one logical request: every attempt's prompt, the pricing keys
    of the last attempt, and its sums. Made from the attempts (:meth:`of`) or kept by the store."""

    logical_request_id: str
    model: str
    """The last attempt's (``AttemptRecord.model_name``), as are ``workflow`` to ``inference_geo``."""
    workflow: str
    platform: str
    endpoint: str | None
    inference_geo: str | None
    attempts: int
    wasted_usd: float
    cached: bool
    """An attempt that billed a prompt read or wrote the prompt cache."""
    prompts: tuple[RetriedPrompt, ...]
    """Every attempt, ordered by attempt number, then start."""

    @classmethod
    def of(cls, attempts: Iterable[PromptAttempt]) -> RetriedRequest | None:
        """The request these attempts make up (``None`` for no attempts)."""
        ordered = sorted(attempts, key=lambda a: (a.attempt_number, a.started_at))
        if not ordered:
            return None
        last = ordered[-1]
        return cls(
            last.logical_request_id,
            last.model,
            last.workflow,
            last.platform,
            last.endpoint,
            last.inference_geo,
            len(ordered),
            sum(a.wasted_usd for a in ordered),
            any(a.cache_tokens for a in ordered if a.prompt_tokens > 0),
            tuple(
                RetriedPrompt(
                    a.attempt_number, a.started_at, a.prompt_tokens, a.prompt_bytes, a.stable_prefix_bytes
                )
                for a in ordered
            ),
        )


def avoidable_for_prompts(attempts: Iterable[PromptAttempt], prices: PriceTable) -> RequestAvoidable | None:
    """:func:`avoidable_for_request` from the prompt figures of a request's attempts."""
    request = RetriedRequest.of(attempts)
    return None if request is None else avoidable_of_request(request, prices)


def avoidable_of_request(request: RetriedRequest, prices: PriceTable) -> RequestAvoidable | None:
    """:func:`avoidable_for_request` from what the avoidable waste reads of the request."""
    billed = [a for a in request.prompts if a.prompt_tokens > 0]
    wasted = request.wasted_usd
    base = RequestAvoidable(
        request.logical_request_id, request.model, request.workflow, request.attempts, wasted, None
    )
    if len(billed) < 2:
        return None
    if request.cached:
        return replace(base, avoidable_usd=0.0, already_cached=True)
    if _priced(prices, request, Usage()) is None:
        return replace(base, avoidable_usd=None, unknown=Unknown.UNPRICED)
    measured = [a for a in request.prompts if a.prompt_bytes and a.stable_prefix_bytes is not None]
    if not measured:
        return replace(base, avoidable_usd=None, unknown=Unknown.NOT_MEASURED)
    share = min(measured[-1].stable_prefix_bytes or 0, measured[-1].prompt_bytes or 0) / (
        measured[-1].prompt_bytes or 1
    )
    prefix = min(round(share * a.prompt_tokens) for a in billed)
    if prefix < MIN_CACHEABLE_TOKENS:
        return replace(base, avoidable_usd=0.0, prefix_tokens=prefix)
    actual = sum(_priced(prices, request, Usage(input_tokens=a.prompt_tokens)) or 0.0 for a in billed)
    best, best_lifetime = actual, None
    for lifetime in LIFETIMES_S:
        cost = _cost_with_cache(billed, request, prefix, lifetime, prices)
        if cost < best:
            best, best_lifetime = cost, lifetime
    # Caching can save on the last attempt too, but no more than the retries paid again.
    saved = min(actual - best, wasted) if best_lifetime is not None else 0.0
    return replace(base, avoidable_usd=max(saved, 0.0), prefix_tokens=prefix, lifetime=best_lifetime)


def avoidable_of_alike(alike: RetriedAlike, prices: PriceTable) -> RequestAvoidable:
    """The entry of requests summed alike: nothing avoidable when they already use the cache, else
    unknown (unpriced, or not measured), as :func:`avoidable_for_prompts` finds each of them."""
    base = RequestAvoidable(
        "", alike.model, alike.workflow, alike.attempts, alike.wasted_usd, None, requests=alike.requests
    )
    if alike.already_cached:
        return replace(base, avoidable_usd=0.0, already_cached=True)
    if _priced(prices, alike, Usage()) is None:
        return replace(base, unknown=Unknown.UNPRICED)
    return replace(base, unknown=Unknown.NOT_MEASURED)


def avoidable_of_retried(
    alike: Iterable[RetriedAlike], requests: Iterable[RetriedRequest], prices: PriceTable
) -> list[RequestAvoidable]:
    """Every entry of the report's avoidable waste from what ``SqlStore.retried_prompts`` read."""
    found = [avoidable_of_alike(group, prices) for group in alike]
    for request in requests:
        avoidable = avoidable_of_request(request, prices)
        if avoidable is not None:
            found.append(avoidable)
    return found


def _cost_with_cache(
    billed: Sequence[RetriedPrompt], last: RetriedRequest, prefix: int, lifetime: str, prices: PriceTable
) -> float:
    """What the billed attempts' prompts would have cost with ``prefix`` tokens cached for ``lifetime``."""
    ttl = LIFETIMES_S[lifetime]
    cached_until = None
    total = 0.0
    for attempt in billed:
        at = attempt.started_at.timestamp()
        rest = attempt.prompt_tokens - prefix
        if cached_until is not None and at <= cached_until:
            usage = Usage(input_tokens=rest, cache_read_tokens=prefix)
        elif lifetime == "5m":
            usage = Usage(input_tokens=rest, cache_write_5m_tokens=prefix)
        else:
            usage = Usage(input_tokens=rest, cache_write_1h_tokens=prefix)
        cached_until = at + ttl  # a write starts the lifetime, a read refreshes it
        total += _priced(prices, last, usage) or 0.0
    return total
