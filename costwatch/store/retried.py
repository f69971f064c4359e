"""The retried logical requests of a time range, read for the report's avoidable waste.

What :mod:`costwatch.avoidable` computes per request, read with as little as possible crossing into
Python: the database groups the attempts by logical request and leaves out those never retried
after billing a prompt (nothing was paid twice); the requests with no prefix to price one by one
(already using the prompt cache, or none of whose attempts was measured) come back summed by model,
workflow, platform and endpoint; only the requests left, whose prefix is priced against the gaps
between their attempts, come back attempt by attempt, and only the columns that computation reads.

A request is in a range when one of its retries (an attempt numbered 2 or more) started in it, and
then all its attempts are read, but only those that started within :data:`REQUEST_SPAN` of the
range, so that on PostgreSQL the read touches the partitions of the range and the days beside it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from ..avoidable import PromptAttempt, RetriedAlike
from ..records import WORKFLOW_LABEL_LENGTH
from .schema import ATTEMPTS

__all__ = ["REQUEST_SPAN", "retried_prompts"]

REQUEST_SPAN = timedelta(days=1)
"""How far before or after a report's range an attempt of one of its retried requests is still read
(an SDK's retries of one request are seconds to minutes apart)."""


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
    return (
        sa.select(
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
                    sa.and_(
                        c.prompt_bytes.is_not(None), c.prompt_bytes != 0, c.stable_prefix_bytes.is_not(None)
                    ),
                    1,
                ),
                else_=0,
            ).label("measured"),
            sa.func.row_number()
            .over(partition_by=c.logical_request_id, order_by=(c.attempt_number.desc(), c.started_at.desc()))
            .label("from_last"),
        )
        .where(c.logical_request_id.in_(retried), *near)
        .cte("retried_attempt")
    )


def retried_prompts(
    connection: sa.Connection, start: datetime | None = None, end: datetime | None = None
) -> tuple[list[RetriedAlike], dict[str, list[PromptAttempt]]]:
    """The retried requests of ``[start, end)`` that billed a prompt twice or more: those with nothing
    to price one by one, summed, and the attempts of the others, by logical request."""
    attempt = _per_attempt(start, end)
    a = attempt.c
    # AttemptRecord.workflow; read from the JSON only where needed (the last attempts, and those
    # priced one by one): parsing it is most of the cost of a row.
    workflow = sa.func.coalesce(sa.func.substr(a.tags["workflow"].as_string(), 1, WORKFLOW_LABEL_LENGTH), "")

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
