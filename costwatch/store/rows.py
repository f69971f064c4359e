"""Pure conversions between attempt records, attempt rows and rollup contributions (no I/O).

A rollup row is a sum of contributions, one per attempt. Re-attributing an attempt (a higher
revision) is applied as the contribution of the new revision minus that of the old one, so rollups
stay equal to the sums over the raw rows without ever rescanning them.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from ..records import AttemptRecord, Cost, Outcome, OutputSource, Usage, WasteReason
from .schema import ROLLUP_MEASURES

__all__ = [
    "ATTEMPT_COLUMNS",
    "RollupKey",
    "attempt_row",
    "attempt_values",
    "hour_of",
    "record_from_row",
    "rollup_delta_rows",
    "rollup_key",
    "rollup_measures",
]


RollupKey = tuple[datetime, str, str, str, str, str, str]
"""``(hour, model, outcome, error_type, waste_reason, workflow, platform)``, as in ``ROLLUP_DIMENSIONS``."""


def hour_of(moment: datetime) -> datetime:
    """The UTC hour ``moment`` falls in (naive input is taken as UTC)."""
    zone = moment.tzinfo
    if zone is not timezone.utc and zone is not None:
        moment = moment.astimezone(timezone.utc)
    # Positional arguments: replace(minute=0, ...) parses keywords at three times the cost.
    return datetime(moment.year, moment.month, moment.day, moment.hour, 0, 0, 0, timezone.utc)


def rollup_key(record: AttemptRecord) -> RollupKey:
    """The rollup row an attempt counts towards."""
    waste_reason = record.waste_reason
    return (
        hour_of(record.started_at),
        record.model_name,
        record.outcome.value,
        record.error_label,
        waste_reason.value if (record.wasted and waste_reason is not None) else "",
        record.workflow,
        record.platform,
    )


def rollup_measures(record: AttemptRecord) -> tuple[float, ...]:
    """What one attempt adds to its rollup row: one value per ``ROLLUP_MEASURES`` entry, in order."""
    usage = record.usage
    input_tokens = usage.input_tokens
    output_tokens = usage.output_tokens
    cache_read = usage.cache_read_tokens
    cache_write = usage.cache_write_tokens
    cost = record.cost
    billed_cost = cost.total_usd if cost is not None else 0.0
    wasted = record.wasted
    wasted_cost = cost if (wasted and cost is not None) else _NO_COST
    source = record.output_source
    output_usd = cost.output_usd if cost is not None else 0.0
    return (
        1,
        1 if record.outcome is Outcome.DROPPED else 0,
        1 if record.attempt_number == 1 else 0,
        input_tokens,
        output_tokens,
        cache_read,
        cache_write,
        input_tokens if wasted else 0,
        output_tokens if wasted else 0,
        cache_read if wasted else 0,
        cache_write if wasted else 0,
        billed_cost,
        billed_cost if wasted else 0.0,
        usage.estimated_output_tokens if usage.output_estimated else 0,
        record.duration_s,
        0 if cost is not None else 1,
        0 if cost is not None else input_tokens + output_tokens + cache_read + cache_write,
        wasted_cost.input_usd,
        wasted_cost.cache_read_usd,
        wasted_cost.cache_write_usd,
        wasted_cost.output_usd,
        wasted_cost.server_tool_usd,
        output_tokens if source is OutputSource.REPORTED else 0,
        output_tokens if source is OutputSource.COUNTED else 0,
        output_tokens if source is OutputSource.RECONCILED else 0,
        output_usd if source is OutputSource.REPORTED else 0.0,
        output_usd if source is OutputSource.ESTIMATED else 0.0,
        output_usd if source is OutputSource.COUNTED else 0.0,
        output_usd if source is OutputSource.RECONCILED else 0.0,
    )


_NO_COST = Cost()


def rollup_delta_rows(
    added: Iterable[AttemptRecord], removed: Iterable[AttemptRecord] = ()
) -> list[tuple[Any, ...]]:
    """Net change to the rollups as rows of ``ROLLUP_DIMENSIONS + ROLLUP_MEASURES``, in key order.

    ``added`` land and ``removed`` (replaced revisions) leave. Keys whose every measure nets to zero
    are left out, so a no-op reclassification writes nothing. Key order is the lock order.
    """
    sums: dict[RollupKey, tuple[float, ...]] = {}
    for record in added:
        key = rollup_key(record)
        known = sums.get(key)
        values = rollup_measures(record)
        sums[key] = values if known is None else tuple(map(operator.add, known, values))
    for record in removed:
        key = rollup_key(record)
        sums[key] = tuple(map(operator.sub, sums.get(key, _NO_MEASURES), rollup_measures(record)))
    return [(*key, *values) for key, values in sorted(sums.items()) if any(values)]


_NO_MEASURES = (0,) * len(ROLLUP_MEASURES)


ATTEMPT_COLUMNS = (
    "attempt_id",
    "logical_request_id",
    "attempt_number",
    "started_at",
    "outcome",
    "model_requested",
    "model",
    "stream",
    "beta_features",
    "request_id",
    "message_id",
    "sdk_retry",
    "http_status",
    "error_type",
    "api_error_type",
    "time_to_first_token_s",
    "duration_s",
    "input_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "cache_read_tokens",
    "output_tokens",
    "output_estimated",
    "estimated_output_tokens",
    "server_tool_use",
    "stop_reason",
    "events_received",
    "bytes_received",
    "input_cost_usd",
    "cache_write_cost_usd",
    "cache_read_cost_usd",
    "output_cost_usd",
    "wasted",
    "waste_reason",
    "tags",
    "fingerprint",
    "revision",
    "prompt_bytes",
    "stable_prefix_bytes",
    "server_tool_cost_usd",
    "inference_geo",
    "platform",
    "tokens_clamped",
    "output_source",
    "endpoint",
)
"""The columns of ``costwatch_attempts``, in the order :func:`attempt_values` gives their values."""


def attempt_values(record: AttemptRecord) -> tuple[Any, ...]:
    """The ``costwatch_attempts`` row of a record, one value per ``ATTEMPT_COLUMNS`` entry."""
    usage, cost = record.usage, record.cost
    waste_reason = record.waste_reason
    return (
        record.attempt_id,
        record.logical_request_id,
        record.attempt_number,
        record.started_at,
        record.outcome.value,
        record.model_requested,
        record.model,
        record.stream,
        list(record.beta_features),
        record.request_id,
        record.message_id,
        record.sdk_retry,
        record.http_status,
        record.error_type,
        record.api_error_type,
        record.time_to_first_token_s,
        record.duration_s,
        usage.input_tokens,
        usage.cache_write_5m_tokens,
        usage.cache_write_1h_tokens,
        usage.cache_read_tokens,
        usage.output_tokens,
        usage.output_estimated,
        usage.estimated_output_tokens,
        dict(record.server_tool_use),
        record.stop_reason,
        record.events_received,
        record.bytes_received,
        cost.input_usd if cost is not None else None,
        cost.cache_write_usd if cost is not None else None,
        cost.cache_read_usd if cost is not None else None,
        cost.output_usd if cost is not None else None,
        record.wasted,
        waste_reason.value if waste_reason is not None else None,
        dict(record.tags),
        record.fingerprint,
        record.revision,
        record.prompt_bytes,
        record.stable_prefix_bytes,
        cost.server_tool_usd if cost is not None else None,
        record.inference_geo,
        record.platform,
        usage.tokens_clamped,
        record.output_source.value,
        record.endpoint,
    )


def attempt_row(record: AttemptRecord) -> dict[str, Any]:
    """The ``costwatch_attempts`` row of a record, keyed by column."""
    return dict(zip(ATTEMPT_COLUMNS, attempt_values(record), strict=True))


def _cost_from_columns(row: Mapping[Any, Any]) -> Cost | None:
    parts = (
        row["input_cost_usd"],
        row["cache_write_cost_usd"],
        row["cache_read_cost_usd"],
        row["output_cost_usd"],
    )
    if any(part is None for part in parts):
        return None
    # NULL on rows stored before server-tool fees were priced (migration 0006): no fee.
    fees = row.get("server_tool_cost_usd") or 0.0
    return Cost(
        input_usd=parts[0],
        cache_write_usd=parts[1],
        cache_read_usd=parts[2],
        output_usd=parts[3],
        server_tool_usd=fees,
    )


def record_from_row(row: Mapping[Any, Any]) -> AttemptRecord:
    """The inverse of :func:`attempt_row`."""
    waste_reason = row["waste_reason"]
    return AttemptRecord(
        attempt_id=row["attempt_id"],
        logical_request_id=row["logical_request_id"],
        attempt_number=row["attempt_number"],
        started_at=row["started_at"],
        outcome=Outcome(row["outcome"]),
        model_requested=row["model_requested"],
        model=row["model"],
        stream=bool(row["stream"]),
        beta_features=tuple(row["beta_features"] or ()),
        request_id=row["request_id"],
        message_id=row["message_id"],
        sdk_retry=row["sdk_retry"],
        http_status=row["http_status"],
        error_type=row["error_type"],
        api_error_type=row["api_error_type"],
        time_to_first_token_s=row["time_to_first_token_s"],
        duration_s=row["duration_s"],
        usage=Usage(
            input_tokens=row["input_tokens"],
            cache_write_5m_tokens=row["cache_write_5m_tokens"],
            cache_write_1h_tokens=row["cache_write_1h_tokens"],
            cache_read_tokens=row["cache_read_tokens"],
            output_tokens=row["output_tokens"],
            output_estimated=bool(row["output_estimated"]),
            estimated_output_tokens=row["estimated_output_tokens"],
            tokens_clamped=bool(row["tokens_clamped"]),
            output_source=OutputSource(row["output_source"]),
        ),
        server_tool_use=MappingProxyType(dict(row["server_tool_use"] or {})),
        stop_reason=row["stop_reason"],
        events_received=row["events_received"],
        bytes_received=row["bytes_received"],
        cost=_cost_from_columns(row),
        wasted=bool(row["wasted"]),
        waste_reason=WasteReason(waste_reason) if waste_reason is not None else None,
        tags=MappingProxyType(dict(row["tags"] or {})),
        fingerprint=row["fingerprint"],
        revision=row["revision"],
        prompt_bytes=row.get("prompt_bytes"),
        stable_prefix_bytes=row.get("stable_prefix_bytes"),
        inference_geo=row.get("inference_geo"),
        platform=row["platform"],
        endpoint=row.get("endpoint"),
    )
