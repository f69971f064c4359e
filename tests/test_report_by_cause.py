"""The report says why the money went: by any tag, filtered, the worst requests, one request's story."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from costwatch.cli import main
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, Outcome, Usage, WasteReason
from costwatch.store import SqlStore

PRICES = load_prices()
START = datetime.now(timezone.utc) - timedelta(days=2)
SONNET, OPUS = "claude-sonnet-5-5", "claude-opus-5-5"
DROPPED = Usage(
    input_tokens=2_000,
    cache_read_tokens=40_000,
    output_tokens=300,
    output_estimated=True,
    estimated_output_tokens=300,
)
DONE = Usage(input_tokens=2_000, cache_read_tokens=40_000, output_tokens=900)


def attempt(
    request: str,
    number: int,
    outcome: Outcome,
    model: str,
    usage: Usage,
    *,
    team: str,
    waste: WasteReason | None = None,
) -> AttemptRecord:
    return AttemptRecord(
        attempt_id=f"{request}-{number}",
        logical_request_id=request,
        attempt_number=number,
        started_at=START + timedelta(minutes=5 * number, seconds=len(request)),
        outcome=outcome,
        model_requested=model,
        model=model,
        error_type="RemoteProtocolError" if outcome is Outcome.DROPPED else None,
        duration_s=30.0,
        usage=usage,
        cost=PRICES.cost(model, usage),
        wasted=waste is not None,
        waste_reason=waste,
        tags={"team": team, "workflow": f"{team}-jobs", "job": "nightly"},
    )


RECORDS = [
    # search: an opus request dropped twice then answered (the worst), and a sonnet request answered at once
    attempt("worst", 1, Outcome.DROPPED, OPUS, DROPPED, team="search", waste=WasteReason.RETRIED),
    attempt("worst", 2, Outcome.DROPPED, OPUS, DROPPED, team="search", waste=WasteReason.RETRIED),
    attempt("worst", 3, Outcome.COMPLETED, OPUS, DONE, team="search"),
    attempt("fine", 1, Outcome.COMPLETED, SONNET, DONE, team="search"),
    # ads: a sonnet request given up after one drop
    attempt("gave-up", 1, Outcome.DROPPED, SONNET, DROPPED, team="ads", waste=WasteReason.ABANDONED),
]


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('cause') / 'cause.db'}"
    store = SqlStore(url)
    try:
        store.write(RECORDS)
    finally:
        store.shutdown()
    return url


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def report(capsys, db: str, *options: str) -> dict:
    code, out, err = run(capsys, "report", "--format", "json", "--db", db, *options)
    assert code == 0, err
    return json.loads(out)


def cost(*records: AttemptRecord) -> float:
    return sum(r.cost.total_usd for r in records if r.cost is not None)


def test_by_any_tag_groups_the_attempts_by_that_tags_value(capsys, db):
    seen = report(capsys, db, "--by", "tag:team")
    groups = {g["tag:team"]: g for g in seen["groups"]}
    assert set(groups) == {"search", "ads"}
    assert groups["search"]["attempts"] == 4 and groups["ads"]["attempts"] == 1
    assert groups["search"]["wasted_cost_usd"] == pytest.approx(cost(*RECORDS[:2]))
    assert groups["ads"]["wasted_cost_usd_by_reason"]["abandoned"] == pytest.approx(cost(RECORDS[4]))
    # The same totals as the rollups give.
    assert seen["billed_cost_usd"] == pytest.approx(report(capsys, db)["billed_cost_usd"])


def test_filters_keep_only_the_matching_attempts_from_rollups_and_from_rows_alike(capsys, db):
    opus = report(capsys, db, "--model", OPUS)
    assert opus["attempts"] == 3 and opus["filters"] == {"model": [OPUS]}
    dropped = report(capsys, db, "--outcome", "dropped", "--workflow", "search-jobs")
    assert dropped["attempts"] == 2
    tagged = report(capsys, db, "--tag", "team=ads", "--tag", "job=nightly")
    assert tagged["attempts"] == 1 and tagged["filters"] == {"tag": {"team": "ads", "job": "nightly"}}
    assert report(capsys, db, "--tag", "team=nobody")["attempts"] == 0


def test_top_lists_the_logical_requests_that_wasted_most_with_their_attempts_and_times(capsys, db):
    top = report(capsys, db, "--top", "5")["top"]
    assert [t["logical_request_id"] for t in top] == ["worst", "gave-up"]
    worst = top[0]
    assert (worst["model"], worst["workflow"], worst["attempts"], worst["wasted_attempts"]) == (
        OPUS,
        "search-jobs",
        3,
        2,
    )
    assert worst["wasted_cost_usd"] == pytest.approx(cost(*RECORDS[:2]), abs=1e-6)
    assert worst["first"] < worst["last"]
    code, out, _ = run(capsys, "report", "--top", "1", "--db", db)
    assert code == 0 and "Most wasteful logical requests" in out and "worst" in out and "gave-up" not in out


def test_explain_prints_every_attempt_with_outcome_tokens_source_cost_and_gap(capsys, db):
    code, out, err = run(capsys, "explain", "worst", "--format", "json", "--db", db)
    assert code == 0, err
    story = json.loads(out)
    assert story["attempts"] == 3 and story["answered"] is True
    first, second, third = story["timeline"]
    assert [s["outcome"] for s in story["timeline"]] == ["dropped", "dropped", "completed"]
    assert first["gap_before_s"] is None and second["gap_before_s"] == pytest.approx(5 * 60 - 30)
    assert first["output_source"] == "estimated" and third["output_source"] == "reported"
    assert first["tokens"] == {"input": 2000, "cache_read": 40000, "cache_write": 0, "output": 300}
    assert first["error"] == "RemoteProtocolError" and first["waste_reason"] == "retried"
    assert story["wasted_cost_usd"] == pytest.approx(cost(*RECORDS[:2]), abs=1e-6)
    code, out, _ = run(capsys, "explain", "worst", "--db", db)
    assert code == 0 and "3 attempts, answered" in out
    assert [line.split()[0] for line in out.splitlines() if "dropped" in line or "completed" in line] == [
        "1",
        "2",
        "3",
    ]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (("report", "--by", "tag:"), "tag key"),
        (("report", "--outcome", "exploded"), "--outcome exploded"),
        (("report", "--tag", "team"), "KEY=VALUE"),
        (("report", "--top", "0"), "--top"),
        (("explain", "no-such-request"), "no attempts of logical request"),
    ],
)
def test_report_and_explain_mistakes_are_one_line_exit_2(capsys, db, argv, fragment):
    code, _, err = run(capsys, *argv, "--db", db)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err
