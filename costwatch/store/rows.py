"""Pure conversions between attempt records, attempt rows and rollup contributions (no I/O).

A rollup row is a sum of contributions, one per attempt. Re-attributing an attempt (a higher
revision) is applied as the contribution of the new revision minus that of the old one, so rollups
stay equal to the sums over the raw rows without ever rescanning them.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from ..records import AttemptRecord, Cost, Outcome, OutputSource, Usage, WasteReason
from .schema import ATTEMPTS, ROLLUP_DIMENSIONS, ROLLUP_MEASURES

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
    """The rollup row an attempt counts towards, its values in ``ROLLUP_DIMENSIONS`` order."""
    waste_reason = record.waste_reason
    return _in_dimension_order(
        {
            "hour": hour_of(record.started_at),
            "model": record.model_name,
            "outcome": record.outcome.value,
            "error_type": record.error_label,
            "waste_reason": waste_reason.value if (record.wasted and waste_reason is not None) else "",
            "workflow": record.workflow,
            "platform": record.platform,
        }
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
    billed_tokens = input_tokens + output_tokens + cache_read + cache_write
    return _in_measure_order(
        {
            "attempts": 1,
            "dropped_attempts": 1 if record.outcome is Outcome.DROPPED else 0,
            "logical_requests_started": 1 if record.attempt_number == 1 else 0,
            "billed_input_tokens": input_tokens,
            "billed_output_tokens": output_tokens,
            "billed_cache_read_tokens": cache_read,
            "billed_cache_write_tokens": cache_write,
            "wasted_input_tokens": input_tokens if wasted else 0,
            "wasted_output_tokens": output_tokens if wasted else 0,
            "wasted_cache_read_tokens": cache_read if wasted else 0,
            "wasted_cache_write_tokens": cache_write if wasted else 0,
            "billed_cost_usd": billed_cost,
            "wasted_cost_usd": billed_cost if wasted else 0.0,
            "estimated_output_tokens": usage.estimated_output_tokens if usage.output_estimated else 0,
            "duration_s": record.duration_s,
            "unpriced_attempts": 0 if cost is not None else 1,
            "unpriced_tokens": 0 if cost is not None else billed_tokens,
            "wasted_input_cost_usd": wasted_cost.input_usd,
            "wasted_cache_read_cost_usd": wasted_cost.cache_read_usd,
            "wasted_cache_write_cost_usd": wasted_cost.cache_write_usd,
            "wasted_output_cost_usd": wasted_cost.output_usd,
            "wasted_server_tool_cost_usd": wasted_cost.server_tool_usd,
            "reported_output_tokens": output_tokens if source is OutputSource.REPORTED else 0,
            "counted_output_tokens": output_tokens if source is OutputSource.COUNTED else 0,
            "reconciled_output_tokens": output_tokens if source is OutputSource.RECONCILED else 0,
            "reported_output_cost_usd": output_usd if source is OutputSource.REPORTED else 0.0,
            "estimated_output_cost_usd": output_usd if source is OutputSource.ESTIMATED else 0.0,
            "counted_output_cost_usd": output_usd if source is OutputSource.COUNTED else 0.0,
            "reconciled_output_cost_usd": output_usd if source is OutputSource.RECONCILED else 0.0,
        }
    )


# The tables order the values: the two functions above name each one, so a new column is added
# in one place (here by name; a name missing here fails at the first write, and in the tests).
_in_dimension_order = operator.itemgetter(*ROLLUP_DIMENSIONS)
_in_measure_order = operator.itemgetter(*ROLLUP_MEASURES)


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


ATTEMPT_COLUMNS = tuple(column.name for column in ATTEMPTS.columns)
"""The columns of ``costwatch_attempts`` (read from the table), in the order :func:`attempt_values`
gives their values."""


def _enum_value(member: enum.Enum | None) -> Any:
    return None if member is None else member.value


_STORED_AS: dict[str, Callable[[Any], Any]] = {
    "outcome": _enum_value,
    "waste_reason": _enum_value,
    "output_source": _enum_value,
    "beta_features": list,
    "server_tool_use": dict,
    "tags": dict,
}
"""How a record's value is stored where it is not stored as it is (enums by value, JSON as plain
containers); keyed by column."""

_RECORD_FIELDS = frozenset(field.name for field in dataclasses.fields(AttemptRecord))
_USAGE_FIELDS = frozenset(field.name for field in dataclasses.fields(Usage))
_COST_FIELDS = frozenset(field.name for field in dataclasses.fields(Cost))


def _source_of(column: str, priced: bool) -> tuple[str, Callable[[Any], Any] | None]:
    """Where a column's value is on a record: the record's field of its name, else its usage's, else
    (``X_cost_usd``) its cost's ``X_usd`` (``cost`` itself, ``None``, for a record without a price);
    and how it is stored (``None``: as it is)."""
    if column in _RECORD_FIELDS:
        return column, _STORED_AS.get(column)
    if column in _USAGE_FIELDS:
        return f"usage.{column}", _STORED_AS.get(column)
    part = column.removesuffix("_cost_usd") + "_usd"
    if column.endswith("_cost_usd") and part in _COST_FIELDS:
        return (f"cost.{part}" if priced else "cost"), None  # NULL: no known price
    raise LookupError(f"costwatch_attempts.{column} names no field of AttemptRecord, Usage or Cost")


def _reader(priced: bool) -> Callable[[AttemptRecord], tuple[Any, ...]]:
    return operator.attrgetter(*(_source_of(column, priced)[0] for column in ATTEMPT_COLUMNS))


_read_priced, _read_unpriced = _reader(priced=True), _reader(priced=False)
_CONVERSIONS = tuple(
    (index, stored)
    for index, stored in enumerate(_source_of(column, True)[1] for column in ATTEMPT_COLUMNS)
    if stored is not None
)


def attempt_values(record: AttemptRecord) -> tuple[Any, ...]:
    """The ``costwatch_attempts`` row of a record, one value per ``ATTEMPT_COLUMNS`` entry."""
    values = list(_read_unpriced(record) if record.cost is None else _read_priced(record))
    for index, stored in _CONVERSIONS:
        values[index] = stored(values[index])
    return tuple(values)


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
