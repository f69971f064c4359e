"""Pure conversions between attempt records, attempt rows and rollup contributions (no I/O).

A rollup row is a sum of contributions, one per attempt. Re-attributing an attempt (a higher
revision) is applied as the contribution of the new revision minus that of the old one, so rollups
stay equal to the sums over the raw rows without ever rescanning them.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from ..records import AttemptRecord, Cost, Outcome, OutputSource, Usage, WasteReason
from .schema import ATTEMPTS, ROLLUP_DIMENSIONS, ROLLUP_MEASURES

__all__ = [
    "ATTEMPT_COLUMNS",
    "AttemptReader",
    "RollupKey",
    "attempt_reader",
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
    return _utc_hour(moment.year, moment.month, moment.day, moment.hour)


@functools.lru_cache(maxsize=256)
def _utc_hour(year: int, month: int, day: int, hour: int) -> datetime:
    # One object an hour: rollup keys are hashed by the writer for every attempt, and an aware
    # datetime computes its hash (its UTC offset applied) once per object.
    return datetime(year, month, day, hour, tzinfo=timezone.utc)


def rollup_key(record: AttemptRecord) -> RollupKey:
    """The rollup row an attempt counts towards, its values in ``ROLLUP_DIMENSIONS`` order.

    A field read here (or in :func:`_kind`) must also be among :func:`_key_and_kind`'s, which makes
    both once per set of them in a batch.
    """
    waste_reason = record.waste_reason
    return _in_dimension_order(
        {
            "hour": hour_of(record.started_at),
            "model": record.model_name,
            "outcome": _enum_value(record.outcome),
            "error_type": record.error_label,
            "waste_reason": _enum_value(waste_reason) if (record.wasted and waste_reason is not None) else "",
            "workflow": record.workflow,
            "platform": record.platform,
        }
    )


_Kind = tuple[bool, bool, bool, bool, bool, str]
"""What, beside its rollup key, decides which measures an attempt's amounts count towards:
``(dropped, first, wasted, priced, estimated, source)`` (``first``: the logical request's first
attempt; ``estimated``: its output tokens were; ``source``: its ``OutputSource``'s value).

Plain tuples of plain values, as :data:`_Amounts`: the garbage collector untracks such a tuple at
its first look, so a batch's thousands of them never reach the oldest generation, where each would
bring a full collection of the process's heap nearer (a named tuple, or an enum member inside, is
tracked for as long as it lives)."""

_Amounts = tuple[int, int, int, int, int, int, float, float, float, float, float, float, float]
"""The numbers an attempt adds to its rollup row, whatever its kind (or attempts' sums):
``(attempts, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
estimated_output_tokens, duration_s, cost_usd, input_usd, cache_read_usd, cache_write_usd,
output_usd, server_tool_usd)``."""


def _kind(record: AttemptRecord) -> _Kind:
    return (
        record.outcome is Outcome.DROPPED,
        record.attempt_number == 1,
        record.wasted,
        record.cost is not None,
        record.usage.output_estimated,
        _enum_value(record.output_source),
    )


def _amounts(record: AttemptRecord) -> _Amounts:
    usage = record.usage
    cost = record.cost
    if cost is None:
        cost = _NO_COST
    return (
        1,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_write_tokens,
        usage.estimated_output_tokens,
        record.duration_s,
        cost.total_usd,
        cost.input_usd,
        cost.cache_read_usd,
        cost.cache_write_usd,
        cost.output_usd,
        cost.server_tool_usd,
    )


def rollup_measures(record: AttemptRecord) -> tuple[float, ...]:
    """What one attempt adds to its rollup row: one value per ``ROLLUP_MEASURES`` entry, in order."""
    return _measures(_kind(record), _amounts(record))


def _measures(kind: _Kind, amounts: _Amounts) -> tuple[float, ...]:
    """What attempts of one ``kind`` add to their rollup row, from their summed ``amounts``.

    Each measure is one of the amounts or zero (or, for integers, a sum of them): the measures of
    attempts' summed amounts are the sums of their measures, added in the same order.
    """
    dropped, first, wasted, priced, estimated, source = kind
    (
        count,
        input_tokens,
        output_tokens,
        cache_read,
        cache_write,
        estimated_output_tokens,
        duration_s,
        cost_usd,
        input_usd,
        cache_read_usd,
        cache_write_usd,
        output_usd,
        server_tool_usd,
    ) = amounts
    wasted_costs = wasted and priced
    return _in_measure_order(
        {
            "attempts": count,
            "dropped_attempts": count if dropped else 0,
            "logical_requests_started": count if first else 0,
            "billed_input_tokens": input_tokens,
            "billed_output_tokens": output_tokens,
            "billed_cache_read_tokens": cache_read,
            "billed_cache_write_tokens": cache_write,
            "wasted_input_tokens": input_tokens if wasted else 0,
            "wasted_output_tokens": output_tokens if wasted else 0,
            "wasted_cache_read_tokens": cache_read if wasted else 0,
            "wasted_cache_write_tokens": cache_write if wasted else 0,
            "billed_cost_usd": cost_usd,
            "wasted_cost_usd": cost_usd if wasted else 0.0,
            "estimated_output_tokens": estimated_output_tokens if estimated else 0,
            "duration_s": duration_s,
            "unpriced_attempts": 0 if priced else count,
            "unpriced_tokens": 0 if priced else input_tokens + output_tokens + cache_read + cache_write,
            "wasted_input_cost_usd": input_usd if wasted_costs else 0.0,
            "wasted_cache_read_cost_usd": cache_read_usd if wasted_costs else 0.0,
            "wasted_cache_write_cost_usd": cache_write_usd if wasted_costs else 0.0,
            "wasted_output_cost_usd": output_usd if wasted_costs else 0.0,
            "wasted_server_tool_cost_usd": server_tool_usd if wasted_costs else 0.0,
            "reported_output_tokens": output_tokens if source == _REPORTED else 0,
            "counted_output_tokens": output_tokens if source == _COUNTED else 0,
            "reconciled_output_tokens": output_tokens if source == _RECONCILED else 0,
            "reported_output_cost_usd": output_usd if source == _REPORTED else 0.0,
            "estimated_output_cost_usd": output_usd if source == _ESTIMATED else 0.0,
            "counted_output_cost_usd": output_usd if source == _COUNTED else 0.0,
            "reconciled_output_cost_usd": output_usd if source == _RECONCILED else 0.0,
        }
    )


_REPORTED, _ESTIMATED, _COUNTED, _RECONCILED = (
    OutputSource.REPORTED.value,
    OutputSource.ESTIMATED.value,
    OutputSource.COUNTED.value,
    OutputSource.RECONCILED.value,
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

    The attempts of a key that are all of one kind (as a batch of similar calls is) are summed
    first and their measures made once; the others' measures are made one attempt at a time. The
    sums are the same either way, to the bit: each float measure is added up in the attempts' order.
    """
    made: dict[tuple[Any, ...], tuple[RollupKey, _Kind]] = {}
    added_by_key: dict[RollupKey, list[tuple[_Kind, _Amounts]]] = {}
    for record in added:
        key, kind = _key_and_kind(record, made)
        added_by_key.setdefault(key, []).append((kind, _amounts(record)))
    removed_by_key: dict[RollupKey, list[tuple[_Kind, _Amounts]]] = {}
    for record in removed:
        key, kind = _key_and_kind(record, made)
        removed_by_key.setdefault(key, []).append((kind, _amounts(record)))
    rows = []
    for key in sorted(added_by_key.keys() | removed_by_key.keys()):
        values = _summed_measures(added_by_key.get(key, ()), removed_by_key.get(key, ()))
        if any(values):
            rows.append((*key, *values))
    return rows


def _key_and_kind(
    record: AttemptRecord, made: dict[tuple[Any, ...], tuple[RollupKey, _Kind]]
) -> tuple[RollupKey, _Kind]:
    """An attempt's rollup key and kind, made once per distinct set of the fields they are made of
    (remembered in ``made``): a batch of similar calls shares a few, and making them took more of the
    writer's Python than anything else in a record's rollup contribution."""
    moment, usage = record.started_at, record.usage
    zone = moment.tzinfo
    # A UTC or naive moment's fields name its UTC hour; another offset's need converting first.
    hour = (
        (moment.year, moment.month, moment.day, moment.hour)
        if zone is None or zone is timezone.utc
        else hour_of(moment)
    )
    fields = (
        hour,
        record.model,
        record.model_requested,
        record.outcome,
        record.error_type,
        record.api_error_type,
        record.wasted,
        record.waste_reason,
        record.workflow,
        record.platform,
        record.attempt_number == 1,
        record.cost is None,
        usage.output_estimated,
        usage.output_source,
    )
    found = made.get(fields)
    if found is None:
        found = made[fields] = (rollup_key(record), _kind(record))
    return found


def _summed_measures(
    added: Sequence[tuple[_Kind, _Amounts]], removed: Sequence[tuple[_Kind, _Amounts]]
) -> tuple[float, ...]:
    """The measures of one key's attempts: ``added`` land, then ``removed`` leave."""
    kind = added[0][0] if added else None
    if kind is not None and not removed and all(other == kind for other, _ in added):
        return _measures(kind, _sum(amounts for _, amounts in added))
    sums = _sum(_measures(kind, amounts) for kind, amounts in added) if added else _NO_MEASURES
    for kind, amounts in removed:
        sums = tuple(map(operator.sub, sums, _measures(kind, amounts)))
    return sums


def _sum(rows: Iterable[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Rows added up column by column, in order (the first row as it is: ``0 + -0.0`` is ``0.0``).

    Column by column (``reduce``, not ``sum``: from Python 3.12 ``sum`` rounds floats otherwise): a
    new tuple a row made the writer's sums of a batch cost twice as much.
    """
    return tuple(functools.reduce(operator.add, column) for column in zip(*rows, strict=True))


_NO_MEASURES = (0,) * len(ROLLUP_MEASURES)


ATTEMPT_COLUMNS = tuple(column.name for column in ATTEMPTS.columns)
"""The columns of ``costwatch_attempts`` (read from the table), in the order :func:`attempt_values`
gives their values."""


_ENUM_VALUES: dict[enum.Enum | None, Any] = {
    None: None,
    **{member: member.value for kind in (Outcome, WasteReason, OutputSource) for member in kind},
}
"""The stored value of each member (``None`` stays ``None``), read by key: on Python 3.11 an enum's
``.value`` is a property written in Python, several times the cost of the lookup, and a row has three."""
_enum_value = _ENUM_VALUES.__getitem__


def _plain_dict(mapping: Mapping[str, Any]) -> dict[str, Any]:
    # From its items: dict() of a record's read-only mapping proxy asks it for its keys, then for
    # each key's value, at about twice the cost.
    return dict(mapping.items()) if mapping else {}


_STORED_AS: dict[str, Callable[[Any], Any]] = {
    "outcome": _enum_value,
    "waste_reason": _enum_value,
    "output_source": _enum_value,
    "beta_features": list,
    "server_tool_use": _plain_dict,
    "tags": _plain_dict,
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


AttemptReader = Callable[[AttemptRecord], tuple[Any, ...]]
"""A function giving a record's ``costwatch_attempts`` row, one value per ``ATTEMPT_COLUMNS`` entry."""


def attempt_reader(then: Sequence[Callable[[Any], Any] | None] | None = None) -> AttemptReader:
    """The values of a record's columns, in ``ATTEMPT_COLUMNS`` order, each as stored (enums by value,
    JSON as plain containers) or, where ``then`` has a conversion for its column, as that converts
    the record's value (which a conversion of a JSON column takes as the plain container it stands
    for), as one generated function: make it once.

    Generated from the columns' sources (as dataclasses generate an ``__init__``) rather than an
    ``operator.attrgetter`` of them and a pass of conversions over its values: the interpreter's own
    attribute reads, specialised for slots, and calls made where the value is read cost the writer a
    fraction of the generic lookups and of the values copied and indexed once more
    (benchmarks/README.md, create-cost, seventh and eighth sessions).
    """
    namespace: dict[str, Any] = {}

    def value(index: int, column: str, priced: bool) -> str:
        source, stored = _source_of(column, priced)
        text = f"record.{source}"
        step = stored if then is None or then[index] is None else then[index]
        if step is None:
            return text
        name = f"convert_{index}"
        namespace[name] = step
        return f"{name}({text})"

    def values(priced: bool) -> str:
        return ", ".join(value(index, column, priced) for index, column in enumerate(ATTEMPT_COLUMNS))

    # Our own column and field names, and conversions passed by name.
    exec(
        "def read(record):\n"
        "    if record.cost is None:\n"
        f"        return ({values(priced=False)},)\n"
        f"    return ({values(priced=True)},)\n",
        namespace,
    )
    read: AttemptReader = namespace["read"]
    return read


attempt_values = attempt_reader()
"""The ``costwatch_attempts`` row of a record, one value per ``ATTEMPT_COLUMNS`` entry."""


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
