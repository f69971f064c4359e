"""The fake's Usage and Cost Analytics endpoints: the ledger summed per time bucket and group.

``GET /v1/organizations/analytics/usage`` and ``/cost`` (beta ``analytics-usage-cost-2026-08-24``)
as anthropic 2.16's ``client.beta.organization.analytics.usage.list`` / ``.cost.list`` define them
(``BetaAnalyticsUsageItem``, ``BetaAnalyticsCostItem``, ``SyncReportPageCursor``): one row per time
bucket and group with usage, ``data``/``has_more``/``next_page``/``data_refreshed_at`` pages, the
documented limits (31 days per request, 24 hours with ``1m`` buckets, ``limit`` 1-1000) and admin
authentication. Pure functions of the ledger's entries and the query, so they are tested directly.
"""

from __future__ import annotations

import base64
import hashlib
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from ..pricing import PriceTable
from ..records import Usage
from .ledger import LedgerEntry

__all__ = [
    "ANALYTICS_BETA",
    "COST_PATH",
    "FAKE_ADMIN_KEY",
    "USAGE_PATH",
    "AnalyticsError",
    "api_key_id_of",
    "authorize",
    "cost_page",
    "usage_page",
]

USAGE_PATH = "/v1/organizations/analytics/usage"
COST_PATH = "/v1/organizations/analytics/cost"
ANALYTICS_BETA = "analytics-usage-cost-2026-08-24"
"""The beta the SDK sends in ``anthropic-beta`` for both endpoints."""

FAKE_ADMIN_KEY = "sk-ant-admin01-costwatch-fake"
"""The admin key the fake accepts unless it is given another one."""

_WIDTHS = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}
_EARLIEST = datetime(2026, 1, 1, tzinfo=timezone.utc)
_MAX_RANGE = timedelta(days=31)
_MAX_MINUTE_RANGE = timedelta(hours=24)
_GROUP_KEYS = (
    "actor",
    "actor_type",
    "agent_id",
    "api_key_id",
    "claude_tag_category",
    "claude_tag_user_id",
    "context_window",
    "deployment_id",
    "environment_id",
    "inference_geo",
    "model",
    "organization_id",
    "product",
    "rbac_group_id",
    "service_tier",
    "session_id",
    "slack_channel_id",
    "speed",
    "user_profile_id",
    "workspace_id",
)
"""Every key of ``BetaAnalyticsUsageGroup`` (the cost group adds ``cost_type`` and ``token_type``)."""
_SUPPORTED_GROUPS = ("model", "api_key_id")
"""The dimensions the fake can break usage out by: the ones its ledger knows."""


class AnalyticsError(Exception):
    """A request the API refuses: the HTTP status and the error type and message of its JSON body."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def api_key_id_of(api_key: str) -> str:
    """The tagged id the fake gives an API key (``apikey_...``): a digest, never the key itself."""
    return "apikey_" + hashlib.sha256(api_key.encode()).hexdigest()[:24]


def authorize(api_key: str | None, admin_key: str) -> None:
    """Refuse what the real API refuses: no or a wrong admin key (401), a non-admin key (403)."""
    if not api_key:
        raise AnalyticsError(401, "authentication_error", "x-api-key header is required")
    if api_key == admin_key:
        return
    if api_key.startswith("sk-ant-admin"):
        raise AnalyticsError(401, "authentication_error", "invalid x-api-key")
    raise AnalyticsError(
        403,
        "permission_error",
        "This endpoint requires an Admin API key or an API key with the read:analytics scope.",
    )


@dataclass(frozen=True)
class _Query:
    start: datetime
    end: datetime
    width: timedelta | None
    group_by: tuple[str, ...]
    models: tuple[str, ...]
    api_key_ids: tuple[str, ...]
    limit: int
    offset: int
    order_by: str
    descending: bool


def _moment(name: str, text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AnalyticsError(400, "invalid_request_error", f"{name}: not an RFC 3339 timestamp") from None
    if moment.tzinfo is None:
        raise AnalyticsError(400, "invalid_request_error", f"{name}: must be timezone-aware")
    return moment.astimezone(timezone.utc)


def _floor(moment: datetime, width: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    return epoch + ((moment - epoch) // width) * width


def _parse(query: str, now: datetime, *, cost: bool) -> _Query:
    params = urllib.parse.parse_qs(query, keep_blank_values=True)

    def one(name: str) -> str | None:
        values = params.get(name)
        return values[-1] if values else None

    def many(name: str) -> tuple[str, ...]:
        return tuple([*params.get(f"{name}[]", []), *params.get(name, [])])

    bad = "invalid_request_error"
    starting_at = one("starting_at")
    if starting_at is None:
        raise AnalyticsError(400, bad, "starting_at: field required")
    start = _moment("starting_at", starting_at)
    if start < _EARLIEST or start < now - timedelta(days=365):
        raise AnalyticsError(
            400, bad, "starting_at: must be within the last 365 days and no earlier than 2026-01-01T00:00:00Z"
        )
    width_name = one("time_bucket_width")
    width = None
    if width_name is not None:
        if width_name not in _WIDTHS:
            raise AnalyticsError(400, bad, "time_bucket_width: must be one of 1d, 1h, 1m")
        width = _WIDTHS[width_name]
    ending_at = one("ending_at")
    if ending_at is None:
        if width is not None:
            raise AnalyticsError(400, bad, "ending_at: required when time_bucket_width is set")
        end = min(now, start + _MAX_RANGE)
    else:
        end = _moment("ending_at", ending_at)
    if end <= start:
        raise AnalyticsError(400, bad, "ending_at: must be after starting_at")
    if end - start > _MAX_RANGE:
        raise AnalyticsError(400, bad, "the range may span at most 31 days")
    if width_name == "1m" and end - start > _MAX_MINUTE_RANGE:
        raise AnalyticsError(400, bad, "with time_bucket_width=1m the range may span at most 24 hours")
    group_by = many("group_by")
    allowed = (*_GROUP_KEYS, "cost_type", "token_type") if cost else _GROUP_KEYS
    for key in group_by:
        if key not in allowed:
            raise AnalyticsError(400, bad, f"group_by: unknown dimension {key!r}")
        if key not in _SUPPORTED_GROUPS:
            raise AnalyticsError(400, bad, f"group_by: the fake API cannot break usage out by {key!r}")
    if len(group_by) > 5:
        raise AnalyticsError(400, bad, "group_by: at most 5 dimensions")
    limit_text = one("limit") or "20"
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 1000:
        raise AnalyticsError(400, bad, "limit: must be an integer from 1 to 1000")
    offset = 0
    page = one("page")
    if page:
        try:
            offset = int(base64.urlsafe_b64decode(page.encode()).decode().removeprefix("offset:"))
        except ValueError:
            raise AnalyticsError(400, bad, "page: not a cursor this endpoint returned") from None
    order_by = one("order_by") or ("total_tokens" if not cost else "amount")
    if order_by not in ("time", "total_tokens", "amount"):
        raise AnalyticsError(400, bad, "order_by: must be time or a metric")
    order = one("order") or "desc"
    if order not in ("asc", "desc"):
        raise AnalyticsError(400, bad, "order: must be asc or desc")
    if width is None:
        # Without buckets the report covers whole hours.
        hour = timedelta(hours=1)
        start, end = _floor(start, hour), _floor(end, hour)
    return _Query(
        start=start,
        end=end,
        width=width,
        group_by=group_by,
        models=many("models"),
        api_key_ids=many("api_key_ids"),
        limit=int(limit_text),
        offset=offset,
        order_by=order_by,
        descending=order == "desc",
    )


@dataclass
class _Sums:
    uncached_input: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    output: int = 0
    requests: int = 0
    cents: float = 0.0

    @property
    def total(self) -> int:
        return self.uncached_input + self.cache_read + self.cache_write_5m + self.cache_write_1h + self.output


def _rows(
    entries: Iterable[LedgerEntry],
    query: _Query,
    now: datetime,
    lag: timedelta,
    prices: PriceTable | None = None,
) -> list[tuple[datetime, datetime, dict[str, Any], _Sums]]:
    sums: dict[tuple[datetime, tuple[Any, ...]], _Sums] = {}
    for entry in entries:
        if not entry.billed or entry.model is None or not entry.billed_at:
            continue
        at = datetime.fromtimestamp(entry.billed_at, timezone.utc)
        # The API's figures lag the traffic: what arrived within ``lag`` is not reported yet.
        if not query.start <= at < query.end or at > now - lag:
            continue
        if query.models and entry.model not in query.models:
            continue
        if query.api_key_ids and (entry.api_key_id or "") not in query.api_key_ids:
            continue
        bucket = _floor(at, query.width) if query.width is not None else query.start
        values = {"model": entry.model, "api_key_id": entry.api_key_id}
        group = tuple(values[key] for key in query.group_by)
        total = sums.setdefault((bucket, group), _Sums())
        total.uncached_input += entry.input_tokens
        total.cache_read += entry.cache_read_tokens
        total.cache_write_5m += entry.cache_write_5m_tokens
        total.cache_write_1h += entry.cache_write_1h_tokens
        total.output += entry.output_tokens
        total.requests += 1
        price = prices.lookup(entry.model) if prices is not None else None
        if price is not None:
            usage = Usage(
                input_tokens=entry.input_tokens,
                cache_read_tokens=entry.cache_read_tokens,
                cache_write_5m_tokens=entry.cache_write_5m_tokens,
                cache_write_1h_tokens=entry.cache_write_1h_tokens,
                output_tokens=entry.output_tokens,
            )
            total.cents += price.cost(usage).total_usd * 100
    rows = []
    for (bucket, group), total in sums.items():
        end = bucket + query.width if query.width is not None else query.end
        named = dict.fromkeys(_GROUP_KEYS)
        named.update(zip(query.group_by, group, strict=True))
        rows.append((bucket, end, named, total))
    return rows


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _page(items: list[dict[str, Any]], query: _Query, now: datetime, max_pages: int | None) -> dict[str, Any]:
    chunk = items[query.offset : query.offset + query.limit]
    more = query.offset + query.limit < len(items)
    cursor: str | None = base64.urlsafe_b64encode(f"offset:{query.offset + query.limit}".encode()).decode()
    if not more or (max_pages is not None and query.offset // query.limit + 1 >= max_pages):
        cursor = None
    return {
        "data": chunk,
        "has_more": more,
        "next_page": cursor,
        "data_refreshed_at": _iso(now),
    }


def _sorted(
    rows: list[tuple[datetime, datetime, dict[str, Any], _Sums]], query: _Query, metric: Mapping[int, float]
) -> list[int]:
    order = list(range(len(rows)))
    if query.order_by == "time" and query.width is not None:
        # By bucket in the asked direction; within a bucket, the biggest row first.
        order.sort(key=lambda i: -metric[i])
        order.sort(key=lambda i: rows[i][0], reverse=query.descending)
    else:
        order.sort(key=lambda i: (metric[i], rows[i][0]), reverse=query.descending)
    return order


def usage_page(
    entries: Iterable[LedgerEntry],
    query: str,
    *,
    now: datetime,
    lag: timedelta = timedelta(0),
    max_pages: int | None = None,
) -> dict[str, Any]:
    """One page of ``GET /v1/organizations/analytics/usage`` for ``query`` (the raw query string)."""
    parsed = _parse(query, now, cost=False)
    rows = _rows(entries, parsed, now, lag)
    order = _sorted(rows, parsed, {i: float(row[3].total) for i, row in enumerate(rows)})
    items = []
    for i in order:
        start, end, group, total = rows[i]
        items.append(
            {
                "starting_at": _iso(start),
                "ending_at": _iso(end),
                "group": group,
                "usage": {
                    "uncached_input_tokens": total.uncached_input,
                    "cache_read_input_tokens": total.cache_read,
                    "cache_creation": {
                        "ephemeral_5m_input_tokens": total.cache_write_5m,
                        "ephemeral_1h_input_tokens": total.cache_write_1h,
                    },
                    "output_tokens": total.output,
                    "server_tool_use": {"web_search_requests": 0},
                    "requests": total.requests,
                    "total_tokens": total.total,
                },
            }
        )
    return _page(items, parsed, now, max_pages)


def cost_page(
    entries: Iterable[LedgerEntry],
    query: str,
    *,
    now: datetime,
    prices: PriceTable,
    lag: timedelta = timedelta(0),
    max_pages: int | None = None,
) -> dict[str, Any]:
    """One page of ``GET /v1/organizations/analytics/cost``: amounts in cents, as decimal strings.

    The fake bills at list price from ``prices`` (so ``amount`` equals ``list_amount``); a model
    ``prices`` does not know costs ``"0"``. ``max_pages`` ends the pagination early on purpose.
    """
    parsed = _parse(query, now, cost=True)
    rows = _rows(entries, parsed, now, lag, prices)
    cents = {i: row[3].cents for i, row in enumerate(rows)}
    order = _sorted(rows, parsed, cents)
    items = []
    for i in order:
        start, end, group, total = rows[i]
        amount = f"{cents[i]:.6f}"
        items.append(
            {
                "starting_at": _iso(start),
                "ending_at": _iso(end),
                "group": {**group, "cost_type": None, "token_type": None},
                "cost": {
                    "amount": amount,
                    "list_amount": amount,
                    "currency": "USD",
                    "requests": total.requests,
                },
            }
        )
    return _page(items, parsed, now, max_pages)
