"""Pure conversions between attempt records, attempt rows and rollup contributions (no I/O).

A rollup row is a sum of contributions, one per attempt. Re-attributing an attempt (a higher
revision) is applied as the contribution of the new revision minus that of the old one, so rollups
stay equal to the sums over the raw rows without ever rescanning them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from ..records import AttemptRecord, Cost, Outcome, Usage, WasteReason
from .schema import ROLLUP_DIMENSIONS, ROLLUP_MEASURES

__all__ = [
    "RollupKey",
    "attempt_row",
    "hour_of",
    "record_from_row",
    "rollup_contribution",
    "rollup_deltas",
    "rollup_key",
    "rollup_row",
]


RollupKey = tuple[datetime, str, str, str, str, str]
"""``(hour, model, outcome, error_type, waste_reason, workflow)``, as in ``ROLLUP_DIMENSIONS``."""


def hour_of(moment: datetime) -> datetime:
    """The UTC hour ``moment`` falls in (naive input is taken as UTC)."""
    utc = moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)
    return utc.replace(minute=0, second=0, microsecond=0)


def rollup_key(record: AttemptRecord) -> RollupKey:
    """The rollup row an attempt counts towards."""
    return (
        hour_of(record.started_at),
        record.model_name,
        record.outcome.value,
        record.error_label,
        record.waste_reason.value if (record.wasted and record.waste_reason is not None) else "",
        record.workflow,
    )


def rollup_contribution(record: AttemptRecord) -> tuple[RollupKey, dict[str, float]]:
    """What one attempt adds to its rollup row: the key and a value for every rollup measure."""
    usage = record.usage
    billed = usage.by_type()
    wasted = record.wasted
    values: dict[str, float] = {
        "attempts": 1,
        "dropped_attempts": 1 if record.outcome is Outcome.DROPPED else 0,
        "logical_requests_started": 1 if record.attempt_number == 1 else 0,
        "billed_cost_usd": record.cost.total_usd if record.cost is not None else 0.0,
        "wasted_cost_usd": record.wasted_cost_usd,
        "estimated_output_tokens": usage.estimated_output_tokens if usage.output_estimated else 0,
        "duration_s": record.duration_s,
    }
    for token_type, tokens in billed.items():
        values[f"billed_{token_type.value}_tokens"] = tokens
        values[f"wasted_{token_type.value}_tokens"] = tokens if wasted else 0
    assert set(values) == set(ROLLUP_MEASURES)
    return rollup_key(record), values


def rollup_deltas(
    added: Iterable[AttemptRecord], removed: Iterable[AttemptRecord] = ()
) -> dict[RollupKey, dict[str, float]]:
    """Net change to the rollups when ``added`` land and ``removed`` (replaced revisions) leave.

    Keys whose every measure nets to zero are left out, so a no-op reclassification writes nothing.
    """
    deltas: dict[RollupKey, dict[str, float]] = {}
    for sign, records in ((1, added), (-1, removed)):
        for record in records:
            key, values = rollup_contribution(record)
            row = deltas.setdefault(key, dict.fromkeys(ROLLUP_MEASURES, 0))
            for name, value in values.items():
                row[name] += sign * value
    return {key: row for key, row in deltas.items() if any(row.values())}


def rollup_row(key: RollupKey, values: Mapping[str, float]) -> dict[str, Any]:
    """A rollup key and its measures as one row for ``insert()``."""
    return {**dict(zip(ROLLUP_DIMENSIONS, key, strict=True)), **values}


def attempt_row(record: AttemptRecord) -> dict[str, Any]:
    """The ``costwatch_attempts`` row of a record."""
    usage, cost = record.usage, record.cost
    return {
        "attempt_id": record.attempt_id,
        "logical_request_id": record.logical_request_id,
        "attempt_number": record.attempt_number,
        "started_at": record.started_at,
        "outcome": record.outcome.value,
        "model_requested": record.model_requested,
        "model": record.model,
        "stream": record.stream,
        "beta_features": list(record.beta_features),
        "request_id": record.request_id,
        "message_id": record.message_id,
        "sdk_retry": record.sdk_retry,
        "http_status": record.http_status,
        "error_type": record.error_type,
        "api_error_type": record.api_error_type,
        "time_to_first_token_s": record.time_to_first_token_s,
        "duration_s": record.duration_s,
        "input_tokens": usage.input_tokens,
        "cache_write_5m_tokens": usage.cache_write_5m_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "output_tokens": usage.output_tokens,
        "output_estimated": usage.output_estimated,
        "estimated_output_tokens": usage.estimated_output_tokens,
        "server_tool_use": dict(record.server_tool_use),
        "stop_reason": record.stop_reason,
        "events_received": record.events_received,
        "bytes_received": record.bytes_received,
        "input_cost_usd": cost.input_usd if cost is not None else None,
        "cache_write_cost_usd": cost.cache_write_usd if cost is not None else None,
        "cache_read_cost_usd": cost.cache_read_usd if cost is not None else None,
        "output_cost_usd": cost.output_usd if cost is not None else None,
        "wasted": record.wasted,
        "waste_reason": record.waste_reason.value if record.waste_reason is not None else None,
        "tags": dict(record.tags),
        "fingerprint": record.fingerprint,
        "revision": record.revision,
    }


def _cost_from_columns(row: Mapping[Any, Any]) -> Cost | None:
    parts = (
        row["input_cost_usd"],
        row["cache_write_cost_usd"],
        row["cache_read_cost_usd"],
        row["output_cost_usd"],
    )
    if any(part is None for part in parts):
        return None
    return Cost(input_usd=parts[0], cache_write_usd=parts[1], cache_read_usd=parts[2], output_usd=parts[3])


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
    )
