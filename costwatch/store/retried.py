"""The retried logical requests, kept per request by the writer and read for the report's avoidable waste.

**All time** (the report without a range): ``costwatch_retried_requests`` (migration 0016) holds one
row per retried request (one with an attempt numbered 2 or more): the sums the report groups by and
each attempt's prompt as pricing one by one reads it (:class:`~costwatch.avoidable.RetriedRequest`),
so the report reads that table alone, never the attempts. The writer keeps it in the batch's
transaction (:func:`update_retried_requests`): a request's first attempt is stored before anything
says it will be retried, so the row is made from the stored attempts when its first retry is
written; from then on each change of one of its attempts moves it by the difference (counts and
dollars added, each attempt's prompt entry replaced by its latest revision, the pricing keys those
of the attempt last by number, start and id: increments that commute). Writers of the same request
take turns under the batch's advisory locks (SQLite: its write lock), so the row is made once, and
from every attempt stored before it. A prune leaves the rows, as it leaves the all-time rollups: the
all-time avoidable waste keeps the pruned requests, as the all-time waste it is a part of does.

**A range** (``--since``/``--until``): what :mod:`costwatch.avoidable` computes per request, read
from the attempts with as little as possible crossing into Python: the database groups the attempts
by logical request and leaves out those never retried after billing a prompt (nothing was paid
twice); the requests with no prefix to price one by one
(already using the prompt cache, or none of whose attempts was measured) come back summed by model,
workflow, platform and endpoint; only the requests left, whose prefix is priced against the gaps
between their attempts, come back attempt by attempt, and only the columns that computation reads.

A request is in a range when one of its retries (an attempt numbered 2 or more) started in it, and
then all its attempts are read, but only those that started within :data:`REQUEST_SPAN` of the
range, so that on PostgreSQL the read touches the partitions of the range and the days beside it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

import sqlalchemy as sa

from ..avoidable import PromptAttempt, RetriedAlike, RetriedPrompt, RetriedRequest
from ..records import WORKFLOW_LABEL_LENGTH, AttemptRecord
from .schema import ATTEMPTS, RETRIED_ALIKE, RETRIED_REQUESTS, insert_of

__all__ = [
    "REQUEST_SPAN",
    "StoredSummary",
    "prepare_retried_statements",
    "retried_prompts",
    "stored_summaries_parameters",
    "stored_summaries_query",
    "update_retried_requests",
]

REQUEST_SPAN = timedelta(days=1)
"""How far before or after a report's range an attempt of one of its retried requests is still read
(an SDK's retries of one request are seconds to minutes apart)."""


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def _attempt_columns() -> list[sa.ColumnElement[Any]]:
    """What the avoidable waste reads of an attempt row, computed as :class:`PromptAttempt` computes
    it from a record (and labelled by its fields), with the flags the grouping sums."""
    c = ATTEMPTS.c
    cache = c.cache_read_tokens + c.cache_write_5m_tokens + c.cache_write_1h_tokens
    prompt = c.input_tokens + cache
    costs = (c.input_cost_usd, c.cache_write_cost_usd, c.cache_read_cost_usd, c.output_cost_usd)
    # AttemptRecord.wasted_cost_usd, summed in the same order (Cost.total_usd): the same float.
    wasted_usd = sa.case(
        (
            sa.and_(c.wasted, *(part.is_not(None) for part in costs)),
            costs[0] + costs[1] + costs[2] + costs[3] + sa.func.coalesce(c.server_tool_cost_usd, 0.0),
        ),
        else_=0.0,
    )
    return [
        c.logical_request_id,
        c.attempt_number,
        c.started_at,
        # AttemptRecord.model_name and .workflow
        sa.func.coalesce(sa.func.nullif(c.model, ""), c.model_requested).label("model"),
        c.tags,
        c.platform,
        c.endpoint,
        c.inference_geo,
        prompt.label("prompt_tokens"),
        cache.label("cache_tokens"),
        wasted_usd.label("wasted_usd"),
        c.prompt_bytes,
        c.stable_prefix_bytes,
        sa.case((prompt > 0, 1), else_=0).label("billed"),
        sa.case((sa.and_(prompt > 0, cache > 0), 1), else_=0).label("cached"),
        sa.case(
            (
                sa.and_(c.prompt_bytes.is_not(None), c.prompt_bytes != 0, c.stable_prefix_bytes.is_not(None)),
                1,
            ),
            else_=0,
        ).label("measured"),
    ]


def _workflow(tags: Any) -> Any:
    """``AttemptRecord.workflow`` of a JSON ``tags`` column."""
    return sa.func.coalesce(sa.func.substr(tags["workflow"].as_string(), 1, WORKFLOW_LABEL_LENGTH), "")


def _per_attempt(start: datetime | None, end: datetime | None) -> Any:
    c = ATTEMPTS.c
    retried = sa.select(c.logical_request_id).where(c.attempt_number > 1)
    near = []
    if start is not None:
        retried = retried.where(c.started_at >= start)
        near.append(c.started_at >= start - REQUEST_SPAN)
    if end is not None:
        retried = retried.where(c.started_at < end)
        near.append(c.started_at < end + REQUEST_SPAN)
    return (
        sa.select(
            *_attempt_columns(),
            sa.func.row_number()
            .over(partition_by=c.logical_request_id, order_by=(c.attempt_number.desc(), c.started_at.desc()))
            .label("from_last"),
        )
        .where(c.logical_request_id.in_(retried), *near)
        .cte("retried_attempt")
    )


def retried_prompts(
    connection: sa.Connection, start: datetime | None = None, end: datetime | None = None
) -> tuple[list[RetriedAlike], dict[str, RetriedRequest]]:
    """The retried requests of ``[start, end)`` that billed a prompt twice or more: those with nothing
    to price one by one, summed, and the others, by logical request. All time: from the requests'
    summaries; a range: from the attempts."""
    if start is None and end is None:
        return _all_time(connection)
    alike, requests = _in_range(connection, start, end)
    return alike, {
        key: request for key, attempts in requests.items() if (request := RetriedRequest.of(attempts))
    }


def _all_time(connection: sa.Connection) -> tuple[list[RetriedAlike], dict[str, RetriedRequest]]:
    t, g = RETRIED_REQUESTS.c, RETRIED_ALIKE.c
    # One statement, so one snapshot: the requests priced one by one (through their partial index),
    # then the others as the writer summed them.
    detail = sa.select(
        t.logical_request_id,
        t.model,
        t.workflow,
        t.platform,
        t.endpoint,
        t.inference_geo,
        t.attempts,
        t.wasted_cost_usd,
        t.prompts,
        sa.cast(sa.null(), sa.Integer).label("cached"),
        sa.cast(sa.null(), sa.BigInteger).label("requests"),
    ).where(*_PRICED_ONE_BY_ONE)
    summed = sa.select(
        sa.cast(sa.null(), sa.String),
        g.model,
        g.workflow,
        g.platform,
        g.endpoint,
        sa.cast(sa.null(), sa.String),
        g.attempts,
        g.wasted_cost_usd,
        sa.cast(sa.null(), t.prompts.type),
        sa.case((g.already_cached, 1), else_=0),
        g.requests,
    ).where(g.requests != 0)  # groups whose requests all moved elsewhere
    alike: list[RetriedAlike] = []
    requests: dict[str, RetriedRequest] = {}
    for row in connection.execute(sa.union_all(detail, summed)):
        request_id, model, workflow, platform, endpoint, geo, attempts, wasted, prompts, is_cached, count = (
            row
        )
        if count is None:
            requests[request_id] = RetriedRequest(
                request_id,
                model,
                workflow,
                platform,
                endpoint,
                geo,
                int(attempts),
                float(wasted),
                False,
                _prompts_of(prompts),
            )
        else:
            alike.append(
                RetriedAlike(
                    bool(is_cached),
                    model,
                    workflow,
                    platform,
                    endpoint or None,
                    int(count),
                    int(attempts),
                    float(wasted or 0.0),
                )
            )
    return alike, requests


def _prompts_of(stored: Any) -> tuple[RetriedPrompt, ...]:
    """A summary's ``prompts`` (a JSON object, read back as a dict or its text) as pricing reads them."""
    entries = json.loads(stored) if isinstance(stored, str) else stored
    prompts = [
        RetriedPrompt(number, _EPOCH + started_us * _MICROSECOND, tokens, prompt_bytes, prefix_bytes)
        for number, started_us, tokens, prompt_bytes, prefix_bytes in entries.values()
    ]
    return tuple(sorted(prompts, key=lambda p: (p.attempt_number, p.started_at)))


def _in_range(
    connection: sa.Connection, start: datetime | None, end: datetime | None
) -> tuple[list[RetriedAlike], dict[str, list[PromptAttempt]]]:
    attempt = _per_attempt(start, end)
    a = attempt.c
    # AttemptRecord.workflow; read from the JSON only where needed (the last attempts, and those
    # priced one by one): parsing it is most of the cost of a row.
    workflow = _workflow(a.tags)

    def last(column: Any) -> Any:
        return sa.func.max(sa.case((a.from_last == 1, column)))

    request = (
        sa.select(
            a.logical_request_id,
            sa.func.count().label("attempts"),
            sa.func.sum(a.wasted_usd).label("wasted_usd"),
            sa.func.max(a.cached).label("cached"),
            sa.func.max(a.measured).label("measured"),
            last(a.model).label("model"),
            last(workflow).label("workflow"),
            last(a.platform).label("platform"),
            last(a.endpoint).label("endpoint"),
        )
        .group_by(a.logical_request_id)
        .having(sa.func.sum(a.billed) >= 2)
        .cte("retried_request")
    )
    r = request.c
    # One statement: the per-request grouping, computed once, feeds both parts (as two statements the
    # database would read and group the attempts twice).
    detail = sa.select(
        *(workflow.label(name) if name == "workflow" else a[name] for name in PromptAttempt._fields),
        *(sa.cast(sa.null(), sa.Integer).label(name) for name in ("cached", "requests", "attempts")),
    ).where(a.logical_request_id.in_(sa.select(r.logical_request_id).where(r.cached == 0, r.measured == 1)))
    keys = (r.model, r.workflow, r.platform, r.endpoint)
    summed = (
        sa.select(
            sa.null(),
            sa.cast(sa.null(), sa.Integer),
            sa.cast(sa.null(), a.started_at.type),
            *keys,
            sa.null(),
            sa.cast(sa.null(), sa.BigInteger),
            sa.cast(sa.null(), sa.BigInteger),
            sa.func.sum(r.wasted_usd),
            sa.cast(sa.null(), sa.BigInteger),
            sa.cast(sa.null(), sa.BigInteger),
            r.cached,
            sa.func.count(),
            sa.func.sum(r.attempts),
        )
        .where(sa.or_(r.cached == 1, r.measured == 0))
        .group_by(r.cached, *keys)
    )
    if connection.dialect.name == "postgresql":
        # Autovacuum never analyzes a partitioned table itself, so the planner guesses that the
        # retried requests are a handful and would probe every day's index once per request
        # (seconds at a million attempts): one hash join instead. The sort by request in memory
        # rather than in files. And no JIT: compiling the plan's expressions for every day's
        # partition took longer than running it (5.6 of 5.9 s at a million attempts).
        connection.exec_driver_sql("SET LOCAL enable_nestloop = off")
        connection.exec_driver_sql("SET LOCAL work_mem = '64MB'")
        connection.exec_driver_sql("SET LOCAL jit = off")
    alike: list[RetriedAlike] = []
    requests: dict[str, list[PromptAttempt]] = {}
    for row in connection.execute(sa.union_all(detail, summed)):
        if row[-2] is None:
            requests.setdefault(row[0], []).append(PromptAttempt._make(row[:-3]))
        else:
            cached, alike_requests, attempts = row[-3:]
            model, workflow, platform, endpoint = row[3:7]
            wasted = float(row[10] or 0.0)
            alike.append(
                RetriedAlike(
                    bool(cached), model, workflow, platform, endpoint, alike_requests, int(attempts), wasted
                )
            )
    return alike, requests


# -- kept by the writer ----------------------------------------------------------------------------
_SUMS = ("attempts", "billed_attempts", "cached_attempts", "measured_attempts", "wasted_cost_usd")
_LAST_KEY = ("last_attempt_number", "last_started_at", "last_attempt_id")
_LAST = (*_LAST_KEY, "model", "workflow", "platform", "endpoint", "inference_geo")


def _prompt_entry(attempt: PromptAttempt) -> list[int | None]:
    """An attempt's entry in a summary's ``prompts``."""
    started_us = (attempt.started_at - _EPOCH) // _MICROSECOND
    return [
        attempt.attempt_number,
        started_us,
        attempt.prompt_tokens,
        attempt.prompt_bytes,
        attempt.stable_prefix_bytes,
    ]


def _sums(record: AttemptRecord) -> tuple[PromptAttempt, tuple[int, int, int, int, float]]:
    attempt = PromptAttempt.of(record)
    billed = attempt.prompt_tokens > 0
    measured = bool(attempt.prompt_bytes) and attempt.stable_prefix_bytes is not None
    return attempt, (
        1,
        int(billed),
        int(billed and attempt.cache_tokens > 0),
        int(measured),
        attempt.wasted_usd,
    )


def _deltas(added: Sequence[AttemptRecord], removed: Sequence[AttemptRecord]) -> list[dict[str, Any]]:
    """The rows that move stored summaries by these attempts' changes (``removed``: the revisions they
    replace), one per request in key order (the lock order)."""
    rows: dict[str, dict[str, Any]] = {}
    for sign, records in ((1, added), (-1, removed)):
        for record in records:
            attempt, sums = _sums(record)
            row = rows.get(attempt.logical_request_id)
            if row is None:
                row = rows[attempt.logical_request_id] = {
                    "logical_request_id": attempt.logical_request_id,
                    **dict.fromkeys(_SUMS, 0),
                    "prompts": {},
                }
            for name, value in zip(_SUMS, sums, strict=True):
                row[name] += sign * value
            if sign < 0:
                continue  # a replaced revision's entry and keys are the new one's to replace
            row["prompts"][record.attempt_id] = _prompt_entry(attempt)
            key = (attempt.attempt_number, attempt.started_at, record.attempt_id)
            if "last_attempt_id" not in row or key > tuple(row[name] for name in _LAST_KEY):
                row.update(
                    zip(
                        _LAST,
                        (
                            *key,
                            attempt.model,
                            attempt.workflow,
                            attempt.platform,
                            attempt.endpoint,
                            attempt.inference_geo,
                        ),
                        strict=True,
                    )
                )
    return [rows[key] for key in sorted(rows) if "last_attempt_id" in rows[key]]


def _move_summaries(dialect: str) -> Any:
    """The upsert that adds delta rows to stored summaries: sums added, prompt entries merged (an
    attempt's new entry replaces its old), the pricing keys of whichever attempt is last."""
    insert = insert_of(dialect)(RETRIED_REQUESTS)
    t, new = RETRIED_REQUESTS.c, insert.excluded
    later = sa.tuple_(*(new[name] for name in _LAST_KEY)) >= sa.tuple_(*(t[name] for name in _LAST_KEY))
    merged = (
        t.prompts.op("||")(new.prompts)
        if dialect == "postgresql"
        else sa.func.json_patch(t.prompts, new.prompts)
    )
    return insert.on_conflict_do_update(
        index_elements=[t.logical_request_id],
        set_={
            **{name: t[name] + new[name] for name in _SUMS},
            **{name: sa.case((later, new[name]), else_=t[name]) for name in _LAST},
            "prompts": merged,
        },
    )


def _summaries_from_attempts(dialect: str, where: Sequence[sa.ColumnElement[bool]]) -> sa.Select[Any]:
    """The summaries of the requests of the attempts ``where`` selects, made from those attempts."""
    columns = _attempt_columns()
    per_attempt = (
        sa.select(
            ATTEMPTS.c.attempt_id,
            *columns,
            sa.func.row_number()
            .over(
                partition_by=ATTEMPTS.c.logical_request_id,
                order_by=(
                    ATTEMPTS.c.attempt_number.desc(),
                    ATTEMPTS.c.started_at.desc(),
                    ATTEMPTS.c.attempt_id.desc(),
                ),
            )
            .label("from_last"),
        )
        .where(*where)
        .subquery("retried_attempt")
    )
    a = per_attempt.c

    def last(column: Any) -> Any:
        return sa.func.max(sa.case((a.from_last == 1, column)))

    started_us: sa.ColumnElement[int]
    if dialect == "postgresql":
        started_us = sa.cast(sa.extract("epoch", a.started_at) * 1_000_000, sa.BigInteger)
        entries = sa.func.jsonb_object_agg(
            a.attempt_id,
            sa.func.jsonb_build_array(
                a.attempt_number, started_us, a.prompt_tokens, a.prompt_bytes, a.stable_prefix_bytes
            ),
        )
    else:
        # Stored as naive UTC text, always with microseconds (UtcDateTime). The whole seconds read
        # without the fraction: SQLite's time functions round it to milliseconds first.
        seconds = sa.cast(sa.func.strftime("%s", sa.func.substr(a.started_at, 1, 19)), sa.BigInteger)
        started_us = seconds * 1_000_000 + sa.cast(sa.func.substr(a.started_at, 21, 6), sa.BigInteger)
        entries = sa.func.json_group_object(
            a.attempt_id,
            sa.func.json_array(
                a.attempt_number, started_us, a.prompt_tokens, a.prompt_bytes, a.stable_prefix_bytes
            ),
        )
    return sa.select(
        a.logical_request_id,
        sa.func.count(),
        sa.func.sum(a.billed),
        sa.func.sum(a.cached),
        sa.func.sum(a.measured),
        sa.func.sum(a.wasted_usd),
        last(a.attempt_number),
        last(a.started_at),
        last(a.attempt_id),
        last(a.model),
        last(_workflow(a.tags)),
        last(a.platform),
        last(a.endpoint),
        last(a.inference_geo),
        entries,
    ).group_by(a.logical_request_id)


def _among(dialect: str, column: Any, name: str) -> sa.ColumnElement[bool]:
    """``column`` is one of the values of the parameter ``name``, bound as one JSON array of them (as
    the writer's lookups bind keys: a list would be formatted element by element)."""
    listed = sa.bindparam(name, type_=sa.String())
    if dialect == "postgresql":
        elements = sa.select(sa.func.json_array_elements_text(sa.cast(listed, sa.JSON)))
        return column == sa.any_(sa.func.array(elements.scalar_subquery()))
    return column.in_(sa.select(sa.func.json_each(listed).table_valued("value").c.value))


class StoredSummary(NamedTuple):
    """A retried request's stored summary as a batch reads it: where the report counts the request
    among the sums of requests alike, and what it adds there (:func:`stored_summaries_query`)."""

    logical_request_id: str
    billed_attempts: int
    cached_attempts: int
    measured_attempts: int
    model: str
    workflow: str
    platform: str
    endpoint: str | None
    attempts: int
    wasted_cost_usd: float


@dataclass(frozen=True)
class _Statements:
    """A batch's statements on one backend, built once: a batch binds only its values (building and
    keying them each time cost more in the writer than running them)."""

    places: Any
    """The stored summaries of the requests ``ids``: their place among the sums and their sums."""
    move: Any
    """Delta rows added to stored summaries."""
    make: Any
    """Summaries made from the attempts of the requests ``ids`` started in ``[first, last]``."""
    add_alike: Any
    """Rows added to the sums of requests alike."""


def _build(dialect: str) -> _Statements:
    t, c = RETRIED_REQUESTS.c, ATTEMPTS.c
    places = sa.select(*(t[name] for name in StoredSummary._fields))
    span = (
        c.started_at >= sa.bindparam("first", type_=c.started_at.type),
        c.started_at <= sa.bindparam("last", type_=c.started_at.type),
    )
    made = _summaries_from_attempts(dialect, [_among(dialect, c.logical_request_id, "ids"), *span])
    return _Statements(
        places=places.where(_among(dialect, t.logical_request_id, "ids")),
        move=_move_summaries(dialect),
        make=sa.insert(RETRIED_REQUESTS).from_select(_MADE_COLUMNS, made),
        add_alike=_add_alike(dialect),
    )


_statements: dict[str, _Statements] = {}


def _statements_for(dialect: str) -> _Statements:
    found = _statements.get(dialect)
    if found is None:
        found = _statements[dialect] = _build(dialect)
    return found


def prepare_retried_statements(connection: sa.Connection) -> None:
    """Build the statements of :func:`update_retried_requests` and have SQLAlchemy compile its lookup,
    looking up no request: once per process (see :func:`costwatch.store.write.prepare_statements`)."""
    _places(connection, _statements_for(connection.dialect.name), [])


def stored_summaries_query(dialect: str) -> sa.Select[Any]:
    """The stored summaries of the logical requests its parameters (:func:`stored_summaries_parameters`)
    name, as :func:`update_retried_requests`'s ``stored`` wants them (one row each, keyed by request)."""
    query: sa.Select[Any] = _statements_for(dialect).places
    return query


def stored_summaries_parameters(request_ids: Iterable[str]) -> dict[str, str]:
    """The parameters of :func:`stored_summaries_query` for ``request_ids``: one JSON array of them."""
    return {"ids": json.dumps(list(request_ids))}


def update_retried_requests(
    connection: sa.Connection,
    added: Sequence[AttemptRecord],
    removed: Sequence[AttemptRecord],
    *,
    stored: Mapping[str, StoredSummary] | None = None,
) -> None:
    """Keep the retried requests' summaries in step with a batch that stored ``added`` (new attempts
    and new revisions) in place of ``removed`` (the revisions those replaced), in its transaction.

    A stored summary moves by the difference. A request retried for the first time (an attempt
    numbered 2 or more among ``added``, no summary yet) gets one made from its stored attempts,
    this batch's included, that started at most :data:`REQUEST_SPAN` before its earliest attempt
    here: its earlier attempts are its first ones, which an SDK sends seconds to minutes before.
    Reclassifications (``abandoned`` turned ``retried``) are not passed: they change neither an
    attempt's waste in dollars nor its prompt. ``stored``: the stored summaries of (at least) the
    requests of ``added``, read earlier in this transaction, under the batch's locks (the writer
    reads them on PostgreSQL by :func:`stored_summaries_query` while it builds its rows, on SQLite
    beside the abandoned attempts after its insert); else they are read now.
    """
    if not added:
        return
    statements = _statements_for(connection.dialect.name)
    if stored is None:
        before = _places(connection, statements, sorted({record.logical_request_id for record in added}))
    else:
        before = {
            record.logical_request_id: stored[record.logical_request_id]
            for record in added
            if record.logical_request_id in stored
        }
    moved = _deltas(
        [record for record in added if record.logical_request_id in before],
        [record for record in removed if record.logical_request_id in before],
    )
    if moved:
        connection.execute(statements.move, moved)
    first_retried = {
        record.logical_request_id
        for record in added
        if record.logical_request_id not in before and record.attempt_number > 1
    }
    if first_retried:
        starts = [record.started_at for record in added if record.logical_request_id in first_retried]
        connection.execute(
            statements.make,
            {
                "ids": json.dumps(sorted(first_retried)),
                "first": min(starts) - REQUEST_SPAN,
                "last": max(starts),
            },
        )
    changed = sorted({row["logical_request_id"] for row in moved} | first_retried)
    if changed:
        _move_alike(connection, statements, before, _places(connection, statements, changed))


_PRICED_ONE_BY_ONE = (
    RETRIED_REQUESTS.c.billed_attempts >= 2,
    RETRIED_REQUESTS.c.cached_attempts == 0,
    RETRIED_REQUESTS.c.measured_attempts > 0,
)
"""The summaries the report prices one by one (the condition of their partial index)."""


def _places(
    connection: sa.Connection, statements: _Statements, request_ids: Sequence[str]
) -> dict[str, StoredSummary]:
    """The stored summaries of these requests: what decides where the report counts each, and its sums."""
    rows = connection.execute(statements.places, stored_summaries_parameters(request_ids))
    return {row.logical_request_id: StoredSummary._make(row) for row in rows}


def _alike_key(summary: StoredSummary) -> tuple[bool, str, str, str, str] | None:
    """Where a summary counts in ``costwatch_retried_alike`` (``None``: nowhere; not retried after
    billing a prompt, or priced one by one)."""
    if summary.billed_attempts < 2 or (summary.cached_attempts == 0 and summary.measured_attempts > 0):
        return None
    cached = summary.cached_attempts > 0
    return (cached, summary.model, summary.workflow, summary.platform, summary.endpoint or "")


def _move_alike(
    connection: sa.Connection,
    statements: _Statements,
    before: Mapping[str, StoredSummary],
    after: Mapping[str, StoredSummary],
) -> None:
    """Move the sums of requests alike by the changed summaries: each out of its old place, into its new."""
    sums: dict[tuple[bool, str, str, str, str], list[Any]] = {}
    for places, sign in ((before, -1), (after, 1)):
        for request_id in after:
            summary = places.get(request_id)
            key = None if summary is None else _alike_key(summary)
            if summary is None or key is None:
                continue
            row = sums.setdefault(key, [0, 0, 0.0])
            row[0] += sign
            row[1] += sign * summary.attempts
            row[2] += sign * summary.wasted_cost_usd
    rows = [
        dict(zip(_ALIKE_COLUMNS, (*key, *measures), strict=True))
        for key, measures in sorted(sums.items())
        if measures != [0, 0, 0.0]
    ]
    if rows:
        connection.execute(statements.add_alike, rows)


_ALIKE_COLUMNS = tuple(column.name for column in RETRIED_ALIKE.columns)


def _add_alike(dialect: str) -> Any:
    insert = insert_of(dialect)(RETRIED_ALIKE)
    return insert.on_conflict_do_update(
        index_elements=[column.name for column in RETRIED_ALIKE.primary_key.columns],
        set_={
            name: RETRIED_ALIKE.c[name] + insert.excluded[name]
            for name in ("requests", "attempts", "wasted_cost_usd")
        },
    )


_MADE_COLUMNS = ("logical_request_id", *_SUMS, *_LAST, "prompts")
"""The summary's columns in the order :func:`_summaries_from_attempts` selects them."""
