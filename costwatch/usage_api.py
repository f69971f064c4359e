"""Reading Anthropic's own usage figures: the Usage and Cost Analytics API, through the anthropic SDK.

``GET /v1/organizations/analytics/usage`` and ``/cost`` (beta ``analytics-usage-cost-2026-08-24``),
grouped by model, one row per time bucket, every page followed. The calls go through the SDK's
generic ``client.get`` rather than 2.x's ``client.beta.organization.analytics``, so both SDK lines
read the same wire format; the shapes are those of anthropic 2.16's ``BetaAnalyticsUsageItem`` and
``BetaAnalyticsCostItem``. The admin key is handed to the SDK and nowhere else: no message, row or
log line here contains it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

__all__ = [
    "ADMIN_KEY_ENV",
    "ANALYTICS_BETA",
    "BUCKET_WIDTHS",
    "ReportedCost",
    "ReportedUsage",
    "UsageApiError",
    "UsageApiRefused",
    "admin_key",
    "read_reported",
]

ADMIN_KEY_ENV = "ANTHROPIC_ADMIN_API_KEY"
ANALYTICS_BETA = "analytics-usage-cost-2026-08-24"
USAGE_PATH = "/v1/organizations/analytics/usage"
COST_PATH = "/v1/organizations/analytics/cost"
BUCKET_WIDTHS = {"1m": timedelta(minutes=1), "1h": timedelta(hours=1), "1d": timedelta(days=1)}
"""The API's time bucket widths."""
MAX_RANGE = {"1m": timedelta(hours=24), "1h": timedelta(days=31), "1d": timedelta(days=31)}
"""The longest range one request may span, by bucket width; longer windows are read in pieces."""
EARLIEST = datetime(2026, 1, 1, tzinfo=timezone.utc)
"""The API has no data before this, nor more than 365 days back."""
_MAX_PAGES = 10_000


class UsageApiError(Exception):
    """The usage figures could not be read (unreachable, a page missing): not the user's mistake."""


class UsageApiRefused(Exception):
    """The API refused the request for a reason the user can fix (the key, the range); one line."""


@dataclass(frozen=True)
class ReportedUsage:
    """What Anthropic reports for one time bucket and model."""

    bucket_start: datetime
    bucket_end: datetime
    model: str
    uncached_input_tokens: int
    cache_read_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    output_tokens: int
    requests: int | None

    @property
    def cache_write_tokens(self) -> int:
        """Cache writes of both lifetimes."""
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens


@dataclass(frozen=True)
class ReportedCost:
    """What Anthropic charged for one time bucket and model, in US dollars."""

    bucket_start: datetime
    model: str
    usd: float


def admin_key() -> str:
    """The admin key from ``ANTHROPIC_ADMIN_API_KEY``; :class:`UsageApiRefused` when it is not set."""
    key = os.environ.get(ADMIN_KEY_ENV, "").strip()
    if not key:
        raise UsageApiRefused(
            f"{ADMIN_KEY_ENV} is not set; export an Admin API key (sk-ant-admin...) from the Console's "
            "Admin keys page"
        )
    return key


def _chunks(start: datetime, end: datetime, bucket: str) -> Iterator[tuple[datetime, datetime]]:
    step = MAX_RANGE[bucket]
    while start < end:
        yield start, min(end, start + step)
        start += step


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def _pages(client: Any, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    import anthropic

    page: str | None = None
    for _ in range(_MAX_PAGES):
        query = {**params, **({"page": page} if page else {})}
        try:
            body = client.get(
                path,
                cast_to=object,
                options={"params": query, "headers": {"anthropic-beta": ANALYTICS_BETA}},
            )
        except anthropic.AuthenticationError:
            raise UsageApiRefused(
                f"the usage API refused the admin key (401); set {ADMIN_KEY_ENV} to a valid Admin API key"
            ) from None
        except anthropic.PermissionDeniedError:
            raise UsageApiRefused(
                f"the usage API refused the key (403): it is not an Admin key (a workspace or regular API "
                f"key cannot read organization usage); set {ADMIN_KEY_ENV} to an Admin API key"
            ) from None
        except anthropic.BadRequestError as exc:
            raise UsageApiRefused(f"the usage API refused the request (400): {_message(exc)}") from None
        except anthropic.NotFoundError:
            raise UsageApiRefused(
                f"{path} was not found (404) at {client.base_url}; check --base-url / ANTHROPIC_BASE_URL"
            ) from None
        except anthropic.APIStatusError as exc:
            raise UsageApiError(f"the usage API answered {exc.status_code}: {_message(exc)}") from None
        except anthropic.APIConnectionError as exc:
            raise UsageApiError(
                f"cannot reach the usage API at {client.base_url}: {type(exc).__name__}"
            ) from None
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise UsageApiError(f"the usage API's answer from {path} has no data list")
        yield body
        page = body.get("next_page")
        if not body.get("has_more"):
            return
        if not page:
            # Stopping here would under-report every bucket after this page: refuse to guess.
            raise UsageApiError(
                f"the usage API said more pages follow but gave no next_page ({path}); nothing was written, "
                "run it again later"
            )
    raise UsageApiError(f"the usage API returned more than {_MAX_PAGES} pages ({path}); nothing was written")


def _message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return " ".join(str(error["message"]).split())
    return type(exc).__name__


def _params(
    start: datetime, end: datetime, bucket: str, api_key_ids: tuple[str, ...], page_size: int
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "starting_at": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ending_at": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "time_bucket_width": bucket,
        "group_by": ["model"],
        "order_by": "time",
        "order": "asc",
        "limit": page_size,
    }
    if api_key_ids:
        params["api_key_ids"] = list(api_key_ids)
    return params


def read_reported(
    *,
    key: str,
    start: datetime,
    end: datetime,
    bucket: str,
    api_key_ids: tuple[str, ...] = (),
    base_url: str | None = None,
    timeout_s: float = 60.0,
    page_size: int = 1000,
) -> tuple[list[ReportedUsage], list[ReportedCost], datetime | None]:
    """Anthropic's usage and cost per ``bucket`` and model over ``[start, end)``, and when its data
    was last refreshed. Raises :class:`UsageApiRefused` or :class:`UsageApiError`; returns only once
    every page of both reports was read. ``page_size`` is the rows asked per page (the API's most).
    """
    import anthropic

    now = datetime.now(timezone.utc)
    if start < EARLIEST or start < now - timedelta(days=365):
        raise UsageApiRefused(
            "the usage API keeps data from 2026-01-01 and for the last 365 days only; choose a later --since"
        )
    client = anthropic.Anthropic(api_key=key, base_url=base_url, max_retries=2, timeout=timeout_s)
    usage: list[ReportedUsage] = []
    costs: list[ReportedCost] = []
    refreshed: datetime | None = None
    try:
        for chunk_start, chunk_end in _chunks(start, end, bucket):
            params = _params(chunk_start, chunk_end, bucket, api_key_ids, page_size)
            for body in _pages(client, USAGE_PATH, params):
                refreshed = _refreshed(body, refreshed)
                for item in body["data"]:
                    usage.append(_usage_row(item))
            for body in _pages(client, COST_PATH, params):
                refreshed = _refreshed(body, refreshed)
                for item in body["data"]:
                    costs.append(_cost_row(item))
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageApiError(
            f"the usage API's answer has an unexpected shape ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        client.close()
    return usage, costs, refreshed


def _refreshed(body: dict[str, Any], seen: datetime | None) -> datetime | None:
    text = body.get("data_refreshed_at")
    if not isinstance(text, str):
        return seen
    moment = _moment(text)
    return moment if seen is None else min(seen, moment)


def _usage_row(item: dict[str, Any]) -> ReportedUsage:
    figures = item["usage"]
    creation = figures.get("cache_creation") or {}
    return ReportedUsage(
        bucket_start=_moment(item["starting_at"]),
        bucket_end=_moment(item["ending_at"]),
        model=item["group"].get("model") or "",
        uncached_input_tokens=int(figures["uncached_input_tokens"]),
        cache_read_tokens=int(figures["cache_read_input_tokens"]),
        cache_write_5m_tokens=int(creation.get("ephemeral_5m_input_tokens", 0)),
        cache_write_1h_tokens=int(creation.get("ephemeral_1h_input_tokens", 0)),
        output_tokens=int(figures["output_tokens"]),
        requests=figures.get("requests"),
    )


def _cost_row(item: dict[str, Any]) -> ReportedCost:
    # ``amount`` is in cents (minor units), as a decimal string.
    return ReportedCost(
        bucket_start=_moment(item["starting_at"]),
        model=item["group"].get("model") or "",
        usd=float(item["cost"]["amount"]) / 100,
    )
