"""The fake API's Usage and Cost Analytics endpoints, read with the real SDK over real sockets."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Any

import anthropic
import pytest

from costwatch.testing import FakeAnthropicServer, ResponseSpec
from costwatch.testing.usage_report import ANALYTICS_BETA, FAKE_ADMIN_KEY, USAGE_PATH, api_key_id_of
from costwatch.usage_api import UsageApiError, UsageApiRefused, read_reported

SDK_MAJOR = int(anthropic.__version__.split(".")[0])
MESSAGES: Any = [{"role": "user", "content": "Summarise the billing table."}]
SPEC = ResponseSpec(cache_read_tokens=1000, cache_write_5m_tokens=200, cache_write_1h_tokens=30)


def _send(server: FakeAnthropicServer, model: str, count: int, key: str = "sk-ant-api03-app") -> None:
    client = anthropic.Anthropic(base_url=server.base_url, api_key=key, max_retries=0)
    for _ in range(count):
        client.messages.create(model=model, max_tokens=512, messages=MESSAGES)
    client.close()


def _get(server: FakeAnthropicServer, query: str, key: str | None = FAKE_ADMIN_KEY) -> tuple[int, Any]:
    headers = {"anthropic-beta": ANALYTICS_BETA}
    if key is not None:
        headers["x-api-key"] = key
    request = urllib.request.Request(f"{server.base_url}{USAGE_PATH}?{query}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _window() -> tuple[datetime, datetime]:
    now = datetime.now(timezone.utc)
    return now - timedelta(hours=1), now + timedelta(minutes=2)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_usage_report_sums_the_ledger_per_bucket_and_model() -> None:
    with FakeAnthropicServer(SPEC) as server:
        _send(server, "claude-opus-4-6", 3)
        _send(server, "claude-haiku-4-5", 2)
        start, end = _window()
        usage, costs, refreshed = read_reported(
            key=FAKE_ADMIN_KEY, start=start, end=end, bucket="1m", base_url=server.base_url
        )
        entries = server.ledger.entries
    assert refreshed is not None
    for model, count in (("claude-opus-4-6", 3), ("claude-haiku-4-5", 2)):
        billed = [e for e in entries if e.model == model]
        rows = [row for row in usage if row.model == model]
        assert sum(row.uncached_input_tokens for row in rows) == sum(e.input_tokens for e in billed)
        assert sum(row.cache_read_tokens for row in rows) == 1000 * count
        assert sum(row.cache_write_tokens for row in rows) == 230 * count
        assert sum(row.output_tokens for row in rows) == sum(e.output_tokens for e in billed)
        assert sum(row.requests or 0 for row in rows) == count
        assert all(row.bucket_end - row.bucket_start == timedelta(minutes=1) for row in rows)
        assert sum(c.usd for c in costs if c.model == model) > 0
    # Reading the report is not an attempt.
    assert len(entries) == 5


@pytest.mark.skipif(SDK_MAJOR < 2, reason="client.beta.organization.analytics is in the 2.x SDK")
def test_sdk_analytics_client_parses_the_fake_usage_and_cost_pages_with_pagination() -> None:
    with FakeAnthropicServer(SPEC) as server:
        _send(server, "claude-opus-4-6", 2, key="sk-ant-api03-one")
        _send(server, "claude-opus-4-6", 1, key="sk-ant-api03-two")
        admin = anthropic.Anthropic(base_url=server.base_url, api_key=FAKE_ADMIN_KEY, max_retries=0)
        start, end = _window()
        usage_api: Any = admin.beta.organization.analytics  # type: ignore[attr-defined]
        pages = usage_api.usage.list(
            starting_at=start,
            ending_at=end,
            time_bucket_width="1h",
            group_by=["model", "api_key_id"],
            limit=1,
        )
        items = list(pages)  # the SDK follows next_page
        costs = list(
            usage_api.cost.list(starting_at=start, ending_at=end, time_bucket_width="1h", group_by=["model"])
        )
        admin.close()
    by_key = {item.group.api_key_id: item.usage.requests for item in items}
    assert by_key == {api_key_id_of("sk-ant-api03-one"): 2, api_key_id_of("sk-ant-api03-two"): 1}
    assert all(item.group.model == "claude-opus-4-6" for item in items)
    assert len(costs) == 1 and costs[0].cost.currency == "USD" and float(costs[0].cost.amount) > 0


def test_usage_report_pages_hold_limit_rows_and_the_last_says_no_more() -> None:
    with FakeAnthropicServer(SPEC) as server:
        _send(server, "claude-opus-4-6", 1)
        _send(server, "claude-haiku-4-5", 1)
        _send(server, "claude-sonnet-4-5", 1)
        start, end = _window()
        query = (
            f"starting_at={_iso(start)}&ending_at={_iso(end)}&time_bucket_width=1h&group_by[]=model&limit=2"
        )
        status, first = _get(server, query)
        status_2, second = _get(server, f"{query}&page={first['next_page']}")
    assert (status, status_2) == (200, 200)
    assert len(first["data"]) == 2 and first["has_more"] is True and first["next_page"]
    assert len(second["data"]) == 1 and second["has_more"] is False and second["next_page"] is None
    models = {row["group"]["model"] for row in first["data"] + second["data"]}
    assert models == {"claude-opus-4-6", "claude-haiku-4-5", "claude-sonnet-4-5"}


def test_analytics_endpoints_refuse_no_key_and_a_wrong_admin_key_401_and_a_regular_key_403() -> None:
    start, end = _window()
    query = f"starting_at={_iso(start)}&ending_at={_iso(end)}&time_bucket_width=1h"
    with FakeAnthropicServer() as server:
        answers = {
            key: _get(server, query, key) for key in (None, "sk-ant-admin01-wrong", "sk-ant-api03-workspace")
        }
        with pytest.raises(UsageApiRefused, match=r"\(401\)"):
            read_reported(
                key="sk-ant-admin01-wrong", start=start, end=end, bucket="1h", base_url=server.base_url
            )
        with pytest.raises(UsageApiRefused, match=r"\(403\).*not an Admin key"):
            read_reported(
                key="sk-ant-api03-workspace", start=start, end=end, bucket="1h", base_url=server.base_url
            )
    assert answers[None][0] == 401
    assert answers["sk-ant-admin01-wrong"][0] == 401
    assert answers["sk-ant-admin01-wrong"][1]["error"]["type"] == "authentication_error"
    assert answers["sk-ant-api03-workspace"][0] == 403
    assert answers["sk-ant-api03-workspace"][1]["error"]["type"] == "permission_error"


@pytest.mark.parametrize(
    ("span", "width", "complaint"),
    [
        (timedelta(days=32), "1h", "at most 31 days"),
        (timedelta(hours=25), "1m", "at most 24 hours"),
    ],
)
def test_usage_report_refuses_ranges_past_the_api_limits(span: timedelta, width: str, complaint: str) -> None:
    end = datetime.now(timezone.utc)
    with FakeAnthropicServer() as server:
        status, body = _get(
            server, f"starting_at={_iso(end - span)}&ending_at={_iso(end)}&time_bucket_width={width}"
        )
    assert status == 400
    assert complaint in body["error"]["message"]


def test_usage_report_before_the_api_keeps_data_is_refused_before_asking() -> None:
    with pytest.raises(UsageApiRefused, match="2026-01-01"):
        read_reported(
            key=FAKE_ADMIN_KEY,
            start=datetime(2025, 6, 1, tzinfo=timezone.utc),
            end=datetime(2025, 6, 2, tzinfo=timezone.utc),
            bucket="1h",
            base_url="http://127.0.0.1:9",
        )


def test_usage_report_lags_the_traffic_by_the_configured_delay() -> None:
    with FakeAnthropicServer(SPEC, usage_lag_s=3600) as server:
        _send(server, "claude-opus-4-6", 2)
        start, end = _window()
        usage, _costs, _ = read_reported(
            key=FAKE_ADMIN_KEY, start=start, end=end, bucket="1h", base_url=server.base_url
        )
        server.usage_lag_s = 0
        settled, _costs, _ = read_reported(
            key=FAKE_ADMIN_KEY, start=start, end=end, bucket="1h", base_url=server.base_url
        )
    assert usage == []
    assert sum(row.requests or 0 for row in settled) == 2


def test_pagination_that_ends_early_is_an_error_not_a_short_report() -> None:
    with FakeAnthropicServer(SPEC) as server:
        _send(server, "claude-opus-4-6", 1)
        _send(server, "claude-haiku-4-5", 1)
        server.usage_page_limit = 1
        start, end = _window()
        # Two models in one bucket, one row per page: the second page never comes.
        with pytest.raises(UsageApiError, match="no next_page"):
            read_reported(
                key=FAKE_ADMIN_KEY, start=start, end=end, bucket="1h", base_url=server.base_url, page_size=1
            )


def test_unreachable_usage_api_is_one_line() -> None:
    start, end = _window()
    with pytest.raises(UsageApiError, match=r"cannot reach the usage API at http://127\.0\.0\.1:9"):
        read_reported(
            key=FAKE_ADMIN_KEY, start=start, end=end, bucket="1h", base_url="http://127.0.0.1:9", timeout_s=2
        )
