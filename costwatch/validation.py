"""Attempt records every sink can hold: no control characters in names, no absurd token counts.

A record reaches the store from the SDK hooks, from an application's own code or from a spool line
written by an older version. What a database cannot store (a NUL in a text on PostgreSQL, a count
beyond a 64-bit integer) would fail a whole batch, so the pipeline passes each record through
:func:`storable` before any sink sees it. Records that need no change come back as they are.
"""

from __future__ import annotations

import dataclasses
import re
from types import MappingProxyType

from .records import AttemptRecord, Cost, Usage

__all__ = ["MAX_TOKENS_PER_ATTEMPT", "REPLACEMENT", "clean_text", "storable"]

MAX_TOKENS_PER_ATTEMPT = 1_000_000_000
"""The largest count of one token kind an attempt is credited with; beyond it the count is clamped.

A thousand times the largest context window: no real attempt comes near it, and a billion such
attempts still sum within a 64-bit rollup column."""

REPLACEMENT = "\ufffd"
"""What a control character or an unpaired surrogate in a name or tag becomes."""

# C0 and C1 controls (NUL among them), and surrogates, which UTF-8 cannot encode.
_UNSTORABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

_MAX_BIGINT = 2**63 - 1
"""The largest value a 64-bit integer column (SQLite INTEGER, PostgreSQL BIGINT) holds."""

_TEXT_FIELDS = (
    "attempt_id",
    "logical_request_id",
    "model_requested",
    "model",
    "request_id",
    "message_id",
    "error_type",
    "api_error_type",
    "stop_reason",
    "fingerprint",
    "inference_geo",
    "platform",
    "endpoint",
)
_TOKEN_FIELDS = (
    "input_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "cache_read_tokens",
    "output_tokens",
    "estimated_output_tokens",
)


def clean_text(text: str) -> str:
    """``text`` with each control character and unpaired surrogate replaced by U+FFFD."""
    return _UNSTORABLE.sub(REPLACEMENT, text) if _UNSTORABLE.search(text) else text


def storable(record: AttemptRecord) -> AttemptRecord:
    """``record`` with unstorable text replaced and token counts clamped (flagged in ``usage``).

    The cost of a clamped kind shrinks in proportion, so totals stay finite and the flag says why.
    """
    changes: dict[str, object] = {}
    if _needs_cleaning(record):
        for name in _TEXT_FIELDS:
            value = getattr(record, name)
            if value and _UNSTORABLE.search(value):
                changes[name] = _UNSTORABLE.sub(REPLACEMENT, value)
        changes["tags"] = MappingProxyType(
            {clean_text(str(key)): clean_text(str(value)) for key, value in record.tags.items()}
        )
        changes["beta_features"] = tuple(clean_text(feature) for feature in record.beta_features)
    usage = record.usage
    most = max(
        usage.input_tokens,
        usage.cache_write_5m_tokens,
        usage.cache_write_1h_tokens,
        usage.cache_read_tokens,
        usage.output_tokens,
        usage.estimated_output_tokens,
    )
    if most > MAX_TOKENS_PER_ATTEMPT:
        clamped = dataclasses.replace(
            usage,
            tokens_clamped=True,
            **{name: min(getattr(usage, name), MAX_TOKENS_PER_ATTEMPT) for name in _TOKEN_FIELDS},
        )
        changes["usage"] = clamped
        if record.cost is not None:
            changes["cost"] = _scaled_cost(record.cost, usage, clamped)
    if record.events_received > _MAX_BIGINT:
        changes["events_received"] = _MAX_BIGINT
    if record.bytes_received > _MAX_BIGINT:
        changes["bytes_received"] = _MAX_BIGINT
    return dataclasses.replace(record, **changes) if changes else record  # type: ignore[arg-type]


def _needs_cleaning(record: AttemptRecord) -> bool:
    # One search over every text at once (spelled out: the writer thread runs it for every record).
    r = record
    texts = (
        f"{r.attempt_id}{r.logical_request_id}{r.model_requested}{r.model or ''}{r.request_id or ''}"
        f"{r.message_id or ''}{r.error_type or ''}{r.api_error_type or ''}{r.stop_reason or ''}"
        f"{r.fingerprint or ''}{r.inference_geo or ''}{r.platform or ''}{r.endpoint or ''}"
        f"{''.join(r.beta_features)}"
    )
    if _unstorable_in(texts):
        return True
    if not r.tags:  # the usual untagged record: joining nothing cost more than the texts' check
        return False
    try:
        tags = "".join(map("".join, r.tags.items()))
    except TypeError:  # a tag that is not a string (a record built by hand): clean it as text
        return True
    return _unstorable_in(tags)


def _unstorable_in(text: str) -> bool:
    # Every character the pattern finds is unprintable (a control or a surrogate), and
    # str.isprintable() answers for the usual all-printable text at a tenth of the search's cost.
    return not text.isprintable() and _UNSTORABLE.search(text) is not None


def _scaled_cost(cost: Cost, before: Usage, after: Usage) -> Cost:
    def share(new: int, old: int) -> float:
        return new / old if old else 1.0

    return Cost(
        input_usd=cost.input_usd * share(after.input_tokens, before.input_tokens),
        cache_write_usd=cost.cache_write_usd * share(after.cache_write_tokens, before.cache_write_tokens),
        cache_read_usd=cost.cache_read_usd * share(after.cache_read_tokens, before.cache_read_tokens),
        output_usd=cost.output_usd * share(after.output_tokens, before.output_tokens),
    )
