"""Retries form logical requests, and failed attempts' billed tokens become retried or abandoned waste."""

from __future__ import annotations

from datetime import datetime, timezone

from conftest import ManualClock

from costwatch.attribution import RetryTracker
from costwatch.records import AttemptRecord, Outcome, Usage, WasteReason


def finished(
    assignment, outcome: Outcome, *, billed: int = 100, fingerprint: str | None = "fp"
) -> AttemptRecord:
    return AttemptRecord(
        attempt_id=f"{assignment.logical_request_id}-{assignment.attempt_number}",
        logical_request_id=assignment.logical_request_id,
        attempt_number=assignment.attempt_number,
        started_at=datetime.now(timezone.utc),
        outcome=outcome,
        usage=Usage(input_tokens=billed),
        fingerprint=fingerprint,
    )


def test_a_dropped_attempt_is_abandoned_until_its_retry_arrives_then_retried():
    tracker = RetryTracker()
    first = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    dropped = tracker.finish(finished(first, Outcome.DROPPED))
    assert dropped.wasted and dropped.waste_reason is WasteReason.ABANDONED and dropped.revision == 0

    retry = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    assert retry.logical_request_id == first.logical_request_id
    assert retry.attempt_number == 2
    (flipped,) = retry.now_retried
    assert flipped.attempt_id == dropped.attempt_id
    assert flipped.waste_reason is WasteReason.RETRIED and flipped.revision == 1
    completed = tracker.finish(finished(retry, Outcome.COMPLETED))
    assert not completed.wasted and completed.waste_reason is None


def test_an_identical_request_after_a_success_starts_a_new_logical_request():
    tracker = RetryTracker()
    first = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    tracker.finish(finished(first, Outcome.COMPLETED))
    second = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    assert second.logical_request_id != first.logical_request_id and second.attempt_number == 1


def test_attempts_that_billed_nothing_waste_nothing():
    tracker = RetryTracker()
    first = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    record = tracker.finish(finished(first, Outcome.HTTP_ERROR, billed=0))
    assert not record.wasted
    retry = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    assert retry.attempt_number == 2 and retry.now_retried == ()


def test_explicit_logical_requests_group_attempts_whatever_their_bodies():
    tracker = RetryTracker()
    a = tracker.begin(explicit_id="job-42", fingerprint="one", previous_id=None)
    tracker.finish(finished(a, Outcome.DROPPED, fingerprint="one"))
    b = tracker.begin(explicit_id="job-42", fingerprint="two", previous_id=None)
    assert (b.logical_request_id, b.attempt_number) == ("job-42", 2)
    assert len(b.now_retried) == 1


def test_sdk_internal_retries_join_the_previous_attempt_of_their_context():
    tracker = RetryTracker()
    a = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    tracker.finish(finished(a, Outcome.HTTP_ERROR, billed=0))
    b = tracker.begin(explicit_id=None, fingerprint="other", previous_id=a.logical_request_id)
    assert (b.logical_request_id, b.attempt_number) == (a.logical_request_id, 2)


def test_a_failure_older_than_the_window_is_not_matched_and_stays_abandoned():
    clock = ManualClock(0.0)
    tracker = RetryTracker(window_s=60, clock=clock)
    first = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    tracker.finish(finished(first, Outcome.DROPPED))
    clock.now = 61
    later = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    assert later.logical_request_id != first.logical_request_id and later.now_retried == ()


def test_the_tracker_forgets_the_oldest_requests_beyond_its_bound():
    tracker = RetryTracker(max_requests=10)
    first = tracker.begin(explicit_id=None, fingerprint="fp0", previous_id=None)
    tracker.finish(finished(first, Outcome.DROPPED, fingerprint="fp0"))
    for i in range(1, 20):
        a = tracker.begin(explicit_id=None, fingerprint=f"fp{i}", previous_id=None)
        tracker.finish(finished(a, Outcome.DROPPED, fingerprint=f"fp{i}"))
    assert len(tracker._requests) <= 10 and len(tracker._failed_by_fingerprint) <= 10
    again = tracker.begin(explicit_id=None, fingerprint="fp0", previous_id=None)
    assert again.logical_request_id != first.logical_request_id


def test_two_failures_then_success_flip_both_failures_to_retried():
    tracker = RetryTracker()
    wasted = []
    a = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    wasted.append(tracker.finish(finished(a, Outcome.DROPPED)))
    b = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    wasted.extend(b.now_retried)
    wasted.append(tracker.finish(finished(b, Outcome.STREAM_ERROR)))
    c = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    wasted.extend(c.now_retried)
    latest = {}
    for r in wasted:
        if r.attempt_id not in latest or r.revision > latest[r.attempt_id].revision:
            latest[r.attempt_id] = r
    assert c.attempt_number == 3
    assert {r.waste_reason for r in latest.values()} == {WasteReason.RETRIED}


def test_a_logical_request_is_findable_by_one_fingerprint_only_and_forgets_it_when_expired():
    clock = ManualClock(0.0)
    tracker = RetryTracker(window_s=60, clock=clock)
    first = tracker.begin(explicit_id="job-1", fingerprint="body-a", previous_id=None)
    tracker.finish(finished(first, Outcome.DROPPED, fingerprint="body-a"))
    second = tracker.begin(explicit_id="job-1", fingerprint="body-b", previous_id=None)
    tracker.finish(finished(second, Outcome.DROPPED, fingerprint="body-b"))
    assert {fp: list(waiting) for fp, waiting in tracker._failed_by_fingerprint.items()} == {
        "body-b": ["job-1"]
    }
    clock.now = 10_000
    later = tracker.begin(explicit_id=None, fingerprint="body-a", previous_id=None)
    assert later.logical_request_id != "job-1" and later.attempt_number == 1
    assert "body-b" not in tracker._failed_by_fingerprint


def test_a_logical_request_is_findable_only_by_the_body_of_its_last_failed_attempt():
    tracker = RetryTracker()
    first = tracker.begin(explicit_id="job-1", fingerprint="body-a", previous_id=None)
    tracker.finish(finished(first, Outcome.DROPPED, fingerprint="body-a"))
    # The retry's body was not fingerprinted (empty, say): it failed too, and body-a was retried already.
    second = tracker.begin(explicit_id="job-1", fingerprint=None, previous_id=None)
    tracker.finish(finished(second, Outcome.DROPPED, fingerprint=None))
    unrelated = tracker.begin(explicit_id=None, fingerprint="body-a", previous_id=None)
    assert unrelated.logical_request_id != "job-1" and unrelated.attempt_number == 1
    assert unrelated.now_retried == ()


def test_a_failure_just_out_of_the_window_is_not_matched_even_before_the_tracker_sweeps():
    clock = ManualClock(0.0)
    tracker = RetryTracker(window_s=10, clock=clock)
    failed = tracker.begin(explicit_id=None, fingerprint="body", previous_id=None)
    tracker.finish(finished(failed, Outcome.DROPPED, fingerprint="body"))
    clock.now = 9.6  # a sweep here keeps the failure: it is 9.6 s old
    tracker.begin(explicit_id=None, fingerprint="other", previous_id=None)
    clock.now = 10.3  # sweeps run at most once a second, so none runs here
    resent = tracker.begin(explicit_id=None, fingerprint="body", previous_id=None)
    assert resent.logical_request_id != failed.logical_request_id and resent.attempt_number == 1
    assert resent.now_retried == ()


def test_an_explicit_logical_request_out_of_the_window_starts_over_at_attempt_one():
    clock = ManualClock(0.0)
    tracker = RetryTracker(window_s=10, clock=clock)
    tracker.begin(explicit_id="job-7", fingerprint=None, previous_id=None)
    clock.now = 9.6
    tracker.begin(explicit_id=None, fingerprint=None, previous_id=None)
    clock.now = 10.3
    again = tracker.begin(explicit_id="job-7", fingerprint=None, previous_id=None)
    assert again.logical_request_id == "job-7" and again.attempt_number == 1


class Owner:
    """A thread or task stand-in: alive until it ends."""

    def __init__(self) -> None:
        self.ended = False

    def is_alive(self) -> bool:
        return not self.ended


def test_a_resend_joins_the_failure_of_its_own_context_before_an_older_one():
    tracker = RetryTracker()
    a, b = Owner(), Owner()
    first_a = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None, owner=a)
    first_b = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None, owner=b)
    tracker.finish(finished(first_a, Outcome.DROPPED))
    tracker.finish(finished(first_b, Outcome.DROPPED))
    retry_b = tracker.begin(
        explicit_id=None, fingerprint="fp", previous_id=None, context_id=first_b.logical_request_id, owner=b
    )
    assert retry_b.logical_request_id == first_b.logical_request_id and retry_b.attempt_number == 2
    retry_a = tracker.begin(
        explicit_id=None, fingerprint="fp", previous_id=None, context_id=first_a.logical_request_id, owner=a
    )
    assert retry_a.logical_request_id == first_a.logical_request_id and retry_a.attempt_number == 2


def test_a_failure_whose_context_still_runs_is_not_taken_by_another_context_s_new_request():
    tracker = RetryTracker()
    a, b = Owner(), Owner()
    first_a = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None, owner=a)
    tracker.finish(finished(first_a, Outcome.DROPPED))
    other = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None, owner=b)
    assert other.logical_request_id != first_a.logical_request_id and other.attempt_number == 1
    assert other.now_retried == ()
    retry_a = tracker.begin(
        explicit_id=None, fingerprint="fp", previous_id=None, context_id=first_a.logical_request_id, owner=a
    )
    assert (retry_a.logical_request_id, retry_a.attempt_number) == (first_a.logical_request_id, 2)


def test_a_failure_whose_context_ended_or_moved_on_goes_to_the_next_resend_oldest_first():
    tracker = RetryTracker()
    a, b, c = Owner(), Owner(), Owner()
    first_a = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None, owner=a)
    first_b = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None, owner=b)
    tracker.finish(finished(first_a, Outcome.DROPPED))
    tracker.finish(finished(first_b, Outcome.DROPPED))
    a.ended = True  # the thread that failed first is gone
    # b goes on to other work: a different body, so its failure is free for another context too
    moved_on = first_b.logical_request_id
    tracker.begin(explicit_id=None, fingerprint="other", previous_id=None, context_id=moved_on, owner=b)
    taken = [tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None, owner=c) for _ in range(3)]
    assert [t.logical_request_id for t in taken[:2]] == [first_a.logical_request_id, moved_on]
    assert [t.attempt_number for t in taken] == [2, 2, 1]
    assert all(len(t.now_retried) == 1 for t in taken[:2]) and taken[2].now_retried == ()


def test_each_failure_is_claimed_by_one_resend_only():
    tracker = RetryTracker()
    first = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    tracker.finish(finished(first, Outcome.DROPPED))
    resends = [tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None) for _ in range(2)]
    assert [r.logical_request_id == first.logical_request_id for r in resends] == [True, False]


def test_a_stream_the_application_stopped_reading_is_cancelled_waste_never_resent():
    tracker = RetryTracker()
    first = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    record = tracker.finish(finished(first, Outcome.CANCELLED))
    assert record.wasted and record.waste_reason is WasteReason.CANCELLED
    again = tracker.begin(explicit_id=None, fingerprint="fp", previous_id=None)
    assert again.logical_request_id != first.logical_request_id and again.now_retried == ()
