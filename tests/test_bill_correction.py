"""Estimates corrected by the bill, as pure logic: how the residual output is shared and when it is not."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from costwatch.pricing import load_prices
from costwatch.reconcile import apportion, billed_revision, reconcile
from costwatch.records import AttemptRecord, Outcome, OutputSource, Usage, WasteReason
from costwatch.usage_api import ReportedUsage


@pytest.fixture
def store_url(new_store_url: str) -> str:
    """A store at the newest revision already (conftest's ``new_store_url``): these tests are of what
    a store does, not of how it is created."""
    return new_store_url


PRICES = load_prices()
MODEL = "claude-opus-4-6"
HOUR = datetime(2026, 11, 30, 10, tzinfo=timezone.utc)
_ids = iter(range(10_000))


def _attempt(
    output: int,
    source: OutputSource = OutputSource.REPORTED,
    *,
    model: str = MODEL,
    platform: str = "anthropic",
    input_tokens: int = 1000,
) -> AttemptRecord:
    estimated = source is OutputSource.ESTIMATED
    usage = Usage(
        input_tokens=input_tokens,
        output_tokens=output,
        output_estimated=estimated,
        estimated_output_tokens=output if estimated else 0,
        output_source=source,
    )
    record = AttemptRecord(
        attempt_id=f"a{next(_ids):05d}",
        logical_request_id=f"r{next(_ids):05d}",
        attempt_number=1,
        started_at=HOUR + timedelta(minutes=5),
        outcome=Outcome.COMPLETED if source is OutputSource.REPORTED else Outcome.DROPPED,
        model_requested=model,
        model=model,
        usage=usage,
        platform=platform,
    )
    if source is not OutputSource.REPORTED:
        record = record.with_waste(WasteReason.ABANDONED)
    return dataclasses.replace(record, cost=PRICES.cost_of(record))


def _bill(
    records: Sequence[AttemptRecord], *, output: int, model: str = MODEL, requests: int | None = None
) -> list[ReportedUsage]:
    return [
        ReportedUsage(
            bucket_start=HOUR,
            bucket_end=HOUR + timedelta(hours=1),
            model=model,
            uncached_input_tokens=sum(r.usage.input_tokens for r in records),
            cache_read_tokens=0,
            cache_write_5m_tokens=0,
            cache_write_1h_tokens=0,
            output_tokens=output,
            requests=len(records) if requests is None else requests,
        )
    ]


def _reconcile(reported: list[ReportedUsage], records: Sequence[AttemptRecord]):  # type: ignore[no-untyped-def]
    return reconcile(
        reported, [], records, start=HOUR, end=HOUR + timedelta(hours=1), bucket="1h", prices=PRICES
    )


def test_apportion_sums_exactly_in_proportion_with_the_largest_remainders_first() -> None:
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(100, [50, 30, 20]) == [50, 30, 20]
    assert apportion(7, [2, 0, 5]) == [2, 0, 5]
    assert apportion(5, [1, 2]) == [2, 3]  # 1.67 and 3.33: the larger remainder gets the token
    assert apportion(3, [0, 0, 0]) == [1, 1, 1]  # nothing estimated: shared equally
    assert apportion(0, [4, 9]) == [0, 0]
    shares = apportion(1_000_003, [7, 11, 13, 17, 19])
    assert sum(shares) == 1_000_003
    assert all(
        abs(share - 1_000_003 * w / 67) < 1 for share, w in zip(shares, [7, 11, 13, 17, 19], strict=True)
    )


def test_apportion_refuses_a_negative_total_or_a_total_with_nowhere_to_go() -> None:
    with pytest.raises(ValueError):
        apportion(-1, [1])
    with pytest.raises(ValueError):
        apportion(5, [])


def test_a_matched_bucket_gives_its_dropped_attempts_the_billed_output_by_their_estimates() -> None:
    completed = _attempt(400)
    dropped = [_attempt(100, OutputSource.ESTIMATED), _attempt(300, OutputSource.ESTIMATED)]
    records = [completed, *dropped]
    # The bill says the dropped attempts generated 500 tokens, not the 400 estimated.
    found = _reconcile(_bill(records, output=400 + 500), records)
    assert sorted(r.usage.output_tokens for r in found.revisions) == [125, 375]
    for revision in found.revisions:
        assert revision.output_source is OutputSource.RECONCILED
        assert not revision.usage.output_estimated
        assert revision.revision == 2  # the waste attribution was revision 1
        assert revision.cost == PRICES.cost_of(revision)
    by_id = {r.attempt_id: r for r in found.revisions}
    assert {by_id[d.attempt_id].usage.estimated_output_tokens for d in dropped} == {100, 300}
    row = found.result["rows"][0]
    assert row["recorded"]["output_tokens"] == row["reported"]["output_tokens"] == 900
    assert row["recorded"]["output_estimated_tokens"] == 0
    assert row["recorded"]["output_reconciled_tokens"] == 500
    assert row["coverage"]["output"] == 1.0
    assert row["dropped_output"] == {"input_matched": True, "estimated_tokens": 400, "residual_tokens": 500}
    correction = row["correction"]
    assert correction["status"] == "corrected" and correction["reason"] is None
    assert correction["attempts"] == correction["revised_attempts"] == 2
    assert correction["output_tokens_moved"] == 100
    # 100 more output tokens at $25/MTok, all of them wasted.
    assert correction["wasted_usd_moved"] == pytest.approx(100 * 25 / 1e6)
    assert correction["wasted_usd_at_bill"] - correction["wasted_usd_at_estimate"] == pytest.approx(
        100 * 25 / 1e6
    )
    assert found.result["totals"]["correction"]["corrected_rows"] == 1


def test_reconciling_the_same_bill_again_changes_nothing() -> None:
    records = [_attempt(400), _attempt(100, OutputSource.ESTIMATED), _attempt(300, OutputSource.ESTIMATED)]
    bill = _bill(records, output=917)
    first = _reconcile(bill, records)
    revised = {r.attempt_id: r for r in first.revisions}
    again = _reconcile(bill, [revised.get(r.attempt_id, r) for r in records])
    assert again.revisions == []
    row = again.result["rows"][0]
    assert row["correction"]["status"] == "settled"
    assert row["correction"]["revised_attempts"] == row["correction"]["output_tokens_moved"] == 0
    assert row["correction"]["wasted_usd_moved"] == 0.0
    assert (
        row["correction"]["wasted_usd_at_bill"] == first.result["rows"][0]["correction"]["wasted_usd_at_bill"]
    )
    # The estimate the bill replaced still stands beside the bill, for the estimator drift alert.
    assert row["dropped_output"] == first.result["rows"][0]["dropped_output"]


def test_a_bill_that_grew_since_moves_the_corrected_attempts_again() -> None:
    records = [_attempt(400), _attempt(100, OutputSource.ESTIMATED), _attempt(300, OutputSource.ESTIMATED)]
    first = _reconcile(_bill(records, output=800), records)
    revised = {r.attempt_id: r for r in first.revisions}
    later = _reconcile(_bill(records, output=1200), [revised.get(r.attempt_id, r) for r in records])
    assert sorted(r.usage.output_tokens for r in later.revisions) == [200, 600]
    assert later.result["rows"][0]["correction"]["output_tokens_moved"] == 400


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"uncached_input_tokens": 3500}, "input_not_matched"),  # another process's input
        ({"requests": 4}, "unseen_requests"),  # a request the input tolerance could hide
        ({"output_tokens": 300}, "over_recorded"),  # less output than the completed attempt reported
    ],
)
def test_a_bucket_that_does_not_match_the_bill_keeps_its_estimates_and_says_why(
    change: dict[str, int], reason: str
) -> None:
    records = [_attempt(400), _attempt(100, OutputSource.ESTIMATED), _attempt(300, OutputSource.ESTIMATED)]
    bill = [dataclasses.replace(_bill(records, output=900)[0], **change)]
    found = _reconcile(bill, records)
    assert found.revisions == []
    row = found.result["rows"][0]
    assert row["correction"]["status"] == "left_alone"
    assert row["correction"]["reason"] == reason
    assert row["correction"]["wasted_usd_at_bill"] is None
    assert row["recorded"]["output_estimated_tokens"] == 400


def test_a_bucket_the_report_does_not_have_yet_is_left_alone() -> None:
    records = [_attempt(400), _attempt(100, OutputSource.ESTIMATED)]
    found = _reconcile([], records)
    assert found.revisions == []
    assert found.result["rows"][0]["correction"] == {
        "status": "left_alone",
        "reason": "not_reported",
        "attempts": 0,
        "revised_attempts": 0,
        "output_tokens_moved": 0,
        "wasted_usd_moved": 0.0,
        "wasted_usd_at_estimate": None,
        "wasted_usd_at_bill": None,
    }


def test_counted_and_reported_outputs_are_never_moved() -> None:
    counted = _attempt(250, OutputSource.COUNTED)
    estimated = _attempt(100, OutputSource.ESTIMATED)
    records = [_attempt(400), counted, estimated]
    found = _reconcile(_bill(records, output=400 + 250 + 180), records)
    assert [r.attempt_id for r in found.revisions] == [estimated.attempt_id]
    assert found.revisions[0].usage.output_tokens == 180
    assert found.result["rows"][0]["recorded"]["output_reported_tokens"] == 650


def test_a_dated_model_id_meets_its_alias_in_the_report_and_other_platforms_stay_out() -> None:
    dated = "claude-sonnet-4-5-20250929"
    records = [_attempt(400, model=dated), _attempt(100, OutputSource.ESTIMATED, model=dated)]
    bedrock = _attempt(999, model=dated, platform="bedrock")
    found = _reconcile(_bill(records, output=520, model="claude-sonnet-4-5"), [*records, bedrock])
    [row] = found.result["rows"]
    assert row["model"] == dated  # as costwatch's other figures label it
    assert row["coverage"]["input"] == 1.0
    assert row["correction"]["status"] == "corrected"
    assert [r.usage.output_tokens for r in found.revisions] == [120]


def test_an_unchanged_attempt_has_no_billed_revision() -> None:
    dropped = _attempt(100, OutputSource.ESTIMATED)
    revision = billed_revision(dropped, 130, PRICES)
    assert revision is not None and revision.usage.output_tokens == 130
    assert billed_revision(revision, 130, PRICES) is None


def test_a_correction_of_an_attempt_revised_meanwhile_writes_nothing(store_url: str) -> None:
    from costwatch.store import SqlStore, create_store_engine
    from costwatch.store.reconciliations import AttemptsChanged
    from costwatch.store.schema import RECONCILIATIONS

    completed, dropped = _attempt(400), _attempt(100, OutputSource.ESTIMATED)
    store = SqlStore(store_url)
    try:
        store.write([completed, dropped])
        read = [completed, dropped]
        found = _reconcile(_bill(read, output=550), read)
        assert len(found.revisions) == 1
        # The attempt's retry lands between the read and the write: the stored attempt moves on.
        store.write([dropped.with_waste(WasteReason.RETRIED)])
        with pytest.raises(AttemptsChanged):
            store.write_reconciliation(found.result, found.revisions, reconciled_at=HOUR)
        stored = store.attempt(dropped.attempt_id)
        assert stored is not None
        assert stored.output_source is OutputSource.ESTIMATED and stored.usage.output_tokens == 100
    finally:
        store.shutdown()
    engine = create_store_engine(store_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.select(sa.func.count()).select_from(RECONCILIATIONS)).scalar() == 0
    finally:
        engine.dispose()
