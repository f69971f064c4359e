"""The waste report as pure functions: rollup totals in, a report dict out, rendered three ways."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from rich.console import Console

from costwatch.durations import MomentError, ceil_hour, floor_hour, parse_duration, parse_moment
from costwatch.report import (
    GROUPINGS,
    build_report,
    render_csv,
    render_json,
    render_table,
    rollup_group_by,
    subtract_totals,
)
from costwatch.store import RollupTotals

NOW = datetime(2026, 11, 25, 18, 40, tzinfo=timezone.utc)
HOUR = datetime(2026, 11, 25, 18, tzinfo=timezone.utc)


def totals(group: dict[str, object], **measures: float) -> RollupTotals:
    return RollupTotals(group=group, **measures)  # type: ignore[arg-type]


def on_m(outcome: str, waste_reason: str, **measures: float) -> RollupTotals:
    """A rollup row of model ``m``, grouped by outcome and waste reason."""
    return totals({"model": "m", "outcome": outcome, "waste_reason": waste_reason}, **measures)


def table_text(report: dict[str, Any], width: int = 140) -> str:
    """The report as ``render_table`` prints it on a terminal ``width`` columns wide."""
    console = Console(file=io.StringIO(), width=width)
    render_table(report, console)
    text: str = console.file.getvalue()  # type: ignore[attr-defined]
    return text


def sonnet_dropped_and_retried() -> list[RollupTotals]:
    """One logical request on sonnet: a dropped attempt (wasted) and its completed retry."""
    return [
        totals(
            {"model": "claude-sonnet-5-5", "outcome": "dropped"},
            attempts=1,
            dropped_attempts=1,
            logical_requests_started=1,
            billed_input_tokens=1000,
            billed_cache_read_tokens=50_000,
            billed_output_tokens=120,
            wasted_input_tokens=1000,
            wasted_cache_read_tokens=50_000,
            wasted_output_tokens=120,
            billed_cost_usd=0.5,
            wasted_cost_usd=0.5,
            estimated_output_tokens=119,
        ),
        totals(
            {"model": "claude-sonnet-5-5", "outcome": "completed"},
            attempts=1,
            billed_input_tokens=1000,
            billed_cache_read_tokens=50_000,
            billed_output_tokens=800,
            billed_cost_usd=0.6,
        ),
        totals(
            {"model": "claude-haiku-5-5", "outcome": "http_error"},
            attempts=1,
            logical_requests_started=1,
        ),
        totals(
            {"model": "claude-haiku-5-5", "outcome": "completed"},
            attempts=1,
            billed_input_tokens=500,
            billed_output_tokens=100,
            billed_cost_usd=0.01,
        ),
    ]


def test_report_totals_sum_every_group_and_count_failed_attempts_by_outcome():
    report = build_report(sonnet_dropped_and_retried(), "model")
    assert report["attempts"] == 4
    assert report["dropped_attempts"] == 1
    assert report["failed_attempts"] == 2
    assert report["logical_requests"] == 2
    assert report["billed_tokens"] == {"input": 2500, "output": 1020, "cache_read": 100_000, "cache_write": 0}
    assert report["wasted_tokens"] == {"input": 1000, "output": 120, "cache_read": 50_000, "cache_write": 0}
    assert report["billed_cost_usd"] == pytest.approx(1.11)
    assert report["wasted_cost_usd"] == pytest.approx(0.5)
    assert report["waste_ratio"] == pytest.approx(51_120 / 103_520, abs=1e-6)
    assert report["estimated_output_tokens"] == 119


def test_report_groups_carry_the_same_fields_plus_their_key_most_wasted_first():
    report = build_report(sonnet_dropped_and_retried(), "model")
    assert [g["model"] for g in report["groups"]] == ["claude-sonnet-5-5", "claude-haiku-5-5"]
    sonnet, haiku = report["groups"]
    assert set(sonnet) == set(report) - {"by", "start", "end", "groups"} | {"model"}
    assert (sonnet["attempts"], sonnet["failed_attempts"], sonnet["logical_requests"]) == (2, 1, 1)
    assert (haiku["attempts"], haiku["failed_attempts"], haiku["waste_ratio"]) == (2, 1, 0.0)


def test_report_by_outcome_reads_only_the_outcome_dimension():
    assert rollup_group_by("outcome") == ("outcome", "waste_reason")
    rows = [
        totals({"outcome": "completed"}, attempts=3),
        totals({"outcome": "dropped"}, attempts=2, dropped_attempts=2, wasted_cost_usd=1.0),
    ]
    report = build_report(rows, "outcome")
    assert [(g["outcome"], g["failed_attempts"]) for g in report["groups"]] == [
        ("dropped", 2),
        ("completed", 0),
    ]


@pytest.mark.parametrize("by", ["model", "workflow", "error_type"])
def test_a_label_absent_from_the_attempts_is_null_in_the_report(by):
    rows = [totals({by: "", "outcome": "completed"}, attempts=1)]
    assert build_report(rows, by)["groups"][0][by] is None


def test_report_by_hour_and_day_merges_hours_in_time_order():
    rows = [
        totals({"hour": HOUR, "outcome": "completed"}, attempts=1),
        totals({"hour": HOUR - timedelta(days=1), "outcome": "completed"}, attempts=2),
        totals({"hour": HOUR - timedelta(days=1, hours=3), "outcome": "dropped"}, attempts=4),
    ]
    assert rollup_group_by("hour") == rollup_group_by("day") == ("hour", "outcome", "waste_reason")
    by_hour = build_report(rows, "hour")
    assert [g["hour"] for g in by_hour["groups"]] == [
        "2026-11-24T15:00:00+00:00",
        "2026-11-24T18:00:00+00:00",
        "2026-11-25T18:00:00+00:00",
    ]
    by_day = build_report(rows, "day")
    assert [(g["day"], g["attempts"], g["failed_attempts"]) for g in by_day["groups"]] == [
        ("2026-11-24", 6, 4),
        ("2026-11-25", 1, 0),
    ]


def test_unknown_grouping_is_refused():
    with pytest.raises(ValueError, match="choose from"):
        rollup_group_by("colour")
    assert set(GROUPINGS) == {"model", "workflow", "outcome", "error_type", "platform", "hour", "day"}


def test_empty_report_has_zero_totals_and_no_groups():
    report = build_report([], "model", start=HOUR, end=HOUR + timedelta(hours=1))
    assert report["attempts"] == 0 and report["waste_ratio"] == 0.0 and report["groups"] == []
    assert (report["start"], report["end"]) == ("2026-11-25T18:00:00+00:00", "2026-11-25T19:00:00+00:00")


def test_subtracting_an_earlier_read_leaves_only_what_was_added_since():
    before = [totals({"model": "m", "outcome": "completed"}, attempts=2, billed_input_tokens=10)]
    after = [
        totals({"model": "m", "outcome": "completed"}, attempts=5, billed_input_tokens=40),
        totals({"model": "m", "outcome": "dropped"}, attempts=1, dropped_attempts=1),
        totals({"model": "n", "outcome": "completed"}, attempts=0),
    ]
    changed = subtract_totals(after, before)
    assert [(r.group["outcome"], r.attempts, r.billed_input_tokens) for r in changed] == [
        ("completed", 3, 30),
        ("dropped", 1, 0),
        ("completed", 0, 0),
    ]
    assert subtract_totals(before, before) == []


def test_waste_is_split_by_reason_with_cancelled_apart_from_retried_and_abandoned():
    assert rollup_group_by("model") == ("model", "outcome", "waste_reason")
    rows = [
        on_m(
            "dropped",
            "retried",
            attempts=2,
            wasted_input_tokens=1000,
            wasted_output_tokens=20,
            wasted_cost_usd=0.5,
        ),
        on_m("dropped", "abandoned", attempts=1, wasted_input_tokens=300, wasted_cost_usd=0.1),
        on_m(
            "cancelled",
            "cancelled",
            attempts=1,
            wasted_input_tokens=400,
            wasted_output_tokens=7,
            wasted_cost_usd=0.2,
        ),
        on_m("completed", "", attempts=3),
    ]
    report = build_report(rows, "model")
    assert report["wasted_cost_usd_by_reason"] == {"retried": 0.5, "abandoned": 0.1, "cancelled": 0.2}
    assert report["groups"][0]["wasted_cost_usd_by_reason"] == report["wasted_cost_usd_by_reason"]
    text = table_text(report, width=200)
    assert "$0.20 cancelled (the application stopped reading)" in text


def test_json_rendering_is_one_object_with_the_documented_keys():
    report = build_report(sonnet_dropped_and_retried(), "model")
    parsed = json.loads(render_json(report))
    for key in (
        "attempts",
        "dropped_attempts",
        "failed_attempts",
        "logical_requests",
        "billed_tokens",
        "wasted_tokens",
        "billed_cost_usd",
        "wasted_cost_usd",
        "waste_ratio",
        "estimated_output_tokens",
        "groups",
    ):
        assert key in parsed
    assert parsed == report


def test_csv_rendering_has_one_row_per_group_with_flat_token_columns():
    report = build_report(sonnet_dropped_and_retried(), "model")
    rows = list(csv.DictReader(io.StringIO(render_csv(report))))
    assert [row["model"] for row in rows] == ["claude-sonnet-5-5", "claude-haiku-5-5"]
    assert rows[0]["wasted_cache_read_tokens"] == "50000"
    assert sum(int(row["attempts"]) for row in rows) == report["attempts"]


def test_table_rendering_names_totals_and_the_top_offender():
    text = table_text(build_report(sonnet_dropped_and_retried(), "model"))
    assert "2 requests took 4 calls to the API: 2 calls failed (1 of them cut off mid-answer)" in text
    assert "Top offenders" in text
    assert "claude-sonnet-5-5: $0.50 wasted (100% of all waste) over 1 failed attempt\n" in text


def test_table_rendering_of_an_empty_window_says_so():
    assert "No attempts recorded" in table_text(build_report([], "model"))


# -- durations and moments ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "ago"),
    [
        ("90m", timedelta(minutes=90)),
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("30s", timedelta(seconds=30)),
        ("1.5h", timedelta(minutes=90)),
    ],
)
def test_a_duration_means_that_long_before_now(text, ago):
    assert parse_duration(text) == ago
    assert parse_moment(text, NOW) == NOW - ago


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=timezone.utc)),
        ("2026-11-01T06:30", datetime(2026, 11, 1, 6, 30, tzinfo=timezone.utc)),
        ("2026-11-01T06:30:00Z", datetime(2026, 11, 1, 6, 30, tzinfo=timezone.utc)),
        ("2026-11-01T08:30:00+02:00", datetime(2026, 11, 1, 6, 30, tzinfo=timezone.utc)),
    ],
)
def test_iso_dates_and_datetimes_are_read_as_utc(text, moment):
    assert parse_moment(text, NOW) == moment


@pytest.mark.parametrize("text", ["yesterday", "24", "h24", "3 fortnights", "2026-13-01", ""])
def test_text_that_is_neither_duration_nor_date_is_refused_with_examples(text):
    with pytest.raises(MomentError, match="24h"):
        parse_moment(text, NOW)


def test_report_windows_widen_to_whole_hours():
    assert floor_hour(NOW) == HOUR
    assert ceil_hour(NOW) == HOUR + timedelta(hours=1)
    assert ceil_hour(HOUR) == HOUR


def wasted_by_reason() -> list[RollupTotals]:
    """Waste on one model: retried (input and output), abandoned (cache), and a completed call."""
    return [
        on_m(
            "dropped",
            "retried",
            attempts=2,
            billed_cost_usd=3.0,
            wasted_cost_usd=3.0,
            wasted_input_cost_usd=2.0,
            wasted_output_cost_usd=1.0,
            billed_input_tokens=100,
            wasted_input_tokens=100,
        ),
        on_m(
            "dropped",
            "abandoned",
            attempts=1,
            billed_cost_usd=0.5,
            wasted_cost_usd=0.5,
            wasted_cache_read_cost_usd=0.2,
            wasted_cache_write_cost_usd=0.3,
            billed_cache_read_tokens=1000,
            wasted_cache_read_tokens=1000,
        ),
        on_m("completed", "", attempts=1, billed_cost_usd=6.5, billed_input_tokens=900),
    ]


def test_wasted_dollars_are_split_by_every_waste_reason_and_by_part_of_the_bill():
    report = build_report(wasted_by_reason(), "model")
    assert set(report["wasted_cost_usd_by_reason"]) >= {"retried", "abandoned"}
    assert report["wasted_cost_usd_by_reason"]["retried"] == pytest.approx(3.0)
    assert report["wasted_cost_usd_by_reason"]["abandoned"] == pytest.approx(0.5)
    assert sum(report["wasted_cost_usd_by_reason"].values()) == pytest.approx(report["wasted_cost_usd"])
    assert report["wasted_cost_usd_by_part"] == pytest.approx(
        {"input": 2.0, "cache_read": 0.2, "cache_write": 0.3, "output": 1.0, "server_tool": 0.0}
    )
    # The token share and the dollar share differ: cache reads are many cheap tokens.
    assert report["waste_ratio"] == pytest.approx(1100 / 2000)
    assert report["wasted_cost_ratio"] == pytest.approx(3.5 / 10.0)
    (group,) = report["groups"]
    assert group["wasted_cost_usd_by_reason"] == report["wasted_cost_usd_by_reason"]
    row = next(csv.DictReader(io.StringIO(render_csv(report))))
    assert float(row["wasted_retried_cost_usd"]) == 3.0 and float(row["wasted_cache_write_cost_usd"]) == 0.3

    text = table_text(report, width=120)
    assert "why: $3.00 retried (paid again by a retry), $0.50 abandoned (the request was given up)" in text
    assert "what: $2.00 re-billed input, $0.20 cache reads, $0.30 cache writes, $1.00 partial output" in text
    assert "wasted share: 55.0% of billed tokens, 35.0% of billed dollars" in text
    assert "token" in text and "share" in text and "$ share" in text


def test_abandoned_waste_of_unsettled_hours_is_reported_as_pending():
    pending = [totals({"model": "m"}, attempts=1, wasted_cost_usd=0.5)]
    report = build_report(wasted_by_reason(), "model", pending=pending)
    assert (report["pending_abandoned_attempts"], report["pending_abandoned_cost_usd"]) == (1, 0.5)
    assert report["groups"][0]["pending_abandoned_attempts"] == 1
    assert "pending: $0.50 of it (1 call given up" in table_text(report, width=120)
