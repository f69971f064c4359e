"""The waste budget refuses retries of failed requests, unsent, once a scope wasted too much in an hour."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone

import anthropic
import pytest
from conftest import ManualClock, raises_the_cut, sample_value, sync_client
from prometheus_client import CollectorRegistry

import costwatch
from costwatch.metrics import MetricsSink
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.records import AttemptRecord, Cost, Outcome, Usage, WasteReason
from costwatch.settings import SettingsError, load_settings
from costwatch.sinks import MemorySink
from costwatch.testing import FakeAnthropicServer, Fault, ResponseSpec
from costwatch.waste_budget import WasteBudget, current

REQUEST = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 512,
    "messages": [{"role": "user", "content": "fix it"}],
}


@pytest.fixture(autouse=True)
def no_budget_left_behind() -> Iterator[None]:
    costwatch.waste_budget(None)
    yield
    costwatch.waste_budget(None)


def failed(request_id: str, usd: float, workflow: str = "") -> AttemptRecord:
    return AttemptRecord(
        attempt_id=f"a-{request_id}-{usd}",
        logical_request_id=request_id,
        attempt_number=1,
        started_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
        outcome=Outcome.DROPPED,
        model="claude-sonnet-4-5",
        usage=Usage(input_tokens=1000),
        cost=Cost(input_usd=usd),
        wasted=True,
        waste_reason=WasteReason.ABANDONED,
        tags={"workflow": workflow} if workflow else {},
    )


def test_the_refusal_is_an_anthropic_error_wherever_it_is_imported_from():
    from costwatch.waste_budget import WasteBudgetExceeded

    # An AnthropicError raised by the HTTP client's send() reaches the caller unwrapped, unretried.
    assert issubclass(costwatch.WasteBudgetExceeded, anthropic.AnthropicError)
    assert WasteBudgetExceeded is costwatch.WasteBudgetExceeded
    assert "WasteBudgetExceeded" in costwatch.__all__ and "WasteBudgetExceeded" in dir(costwatch)
    with pytest.raises(AttributeError, match="no attribute 'WasteBudgetExceded'"):
        costwatch.WasteBudgetExceded  # noqa: B018


def test_only_retries_of_failed_requests_are_refused_and_only_while_the_last_hour_is_over_budget():
    clock = ManualClock(10_000.0)
    budget = WasteBudget(1.0, clock=clock)
    budget.observe(failed("r1", 0.6))
    assert budget.refusal("r1") is None  # $0.60 is within $1/hour
    budget.observe(failed("r2", 0.6))
    refusal = budget.refusal("r1")
    assert refusal is not None and refusal.wasted_usd == pytest.approx(1.2)
    assert "wasted $1.20 in the last hour, over its budget of $1.00/hour" in str(refusal)
    assert budget.refusal("never-failed") is None, "a first attempt or a healthy request is never refused"
    clock.now += 3600 + 60  # both failures leave the window
    assert budget.refusal("r1") is None and budget.wasted_usd() == 0.0


def test_a_workflow_budget_counts_each_workflow_alone():
    budget = WasteBudget(1.0, scope="workflow", clock=ManualClock(10_000.0))
    budget.observe(failed("r1", 2.0, workflow="nightly"))
    budget.observe(failed("r2", 0.1, workflow="triage"))
    assert budget.refusal("r1", "nightly") is not None
    assert budget.refusal("r2", "triage") is None


def test_bad_budgets_are_named():
    with pytest.raises(ValueError, match="usd_per_hour must be a number of dollars >= 0"):
        costwatch.waste_budget(-1)
    with pytest.raises(ValueError, match="scope must be one of process, workflow"):
        costwatch.waste_budget(5, scope="team")
    with pytest.raises(SettingsError, match="COSTWATCH_WASTE_BUDGET_SCOPE='team' is not valid"):
        load_settings(environ={"COSTWATCH_WASTE_BUDGET_SCOPE": "team"})


@pytest.fixture
def accounted() -> Iterator[tuple[MemorySink, CollectorRegistry]]:
    pipeline = Pipeline()
    sink = MemorySink()
    registry = CollectorRegistry()
    metrics = MetricsSink(registry=registry, pipeline=pipeline)
    costwatch.instrument(pipeline=pipeline, sinks=[sink, metrics], listeners=[], prices=load_prices())
    try:
        yield sink, registry
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def read_stream(client: anthropic.Anthropic, **changes: object) -> None:
    with client.messages.stream(**{**REQUEST, **changes}) as stream:
        for _event in stream:
            pass


def test_the_budget_is_off_by_default_and_on_from_the_settings(monkeypatch):
    pipeline = Pipeline()
    costwatch.instrument(pipeline=pipeline, sinks=[], listeners=[], prices=load_prices())
    costwatch.uninstrument()
    assert current() is None
    monkeypatch.setenv("COSTWATCH_WASTE_BUDGET_USD_PER_HOUR", "2.5")
    monkeypatch.setenv("COSTWATCH_WASTE_BUDGET_SCOPE", "workflow")
    costwatch.instrument(pipeline=pipeline, sinks=[], listeners=[], prices=load_prices())
    costwatch.uninstrument()
    pipeline.shutdown()
    budget = current()
    assert budget is not None and (budget.usd_per_hour, budget.scope) == (2.5, "workflow")


def test_an_application_retry_over_budget_is_refused_unsent_recorded_and_counted(accounted):
    sink, registry = accounted
    costwatch.waste_budget(usd_per_hour=0.0)
    with FakeAnthropicServer(ResponseSpec.small(200)) as server:
        server.enqueue(Fault.cut_after_deltas(20))
        client = sync_client(server, max_retries=2)  # the SDK retries nothing it raised itself
        with costwatch.logical_request("job-1"):
            with raises_the_cut():
                read_stream(client)
            assert costwatch.flush(10)
            with pytest.raises(costwatch.WasteBudgetExceeded) as raised:
                read_stream(client)
        refusal = raised.value
        assert refusal.scope == "process" and refusal.wasted_usd > 0 and refusal.__cause__ is None
        assert len(server.ledger) == 1, "the refused retry never reached the API"
        # A first attempt of another request is never refused (the same body again would be a retry).
        read_stream(client, max_tokens=600)
        assert len(server.ledger) == 2
    assert costwatch.flush(10)
    cut, refused, fresh = sink.records
    assert refused.logical_request_id == cut.logical_request_id == "job-1" and refused.attempt_number == 2
    assert refused.outcome is Outcome.CONNECT_ERROR and refused.error_type == "WasteBudgetExceeded"
    assert refused.usage.billed_tokens == 0 and not refused.wasted
    assert cut.waste_reason is WasteReason.ABANDONED, "nothing paid for the cut attempt again"
    assert fresh.outcome is Outcome.COMPLETED
    attempts = sample_value(
        registry,
        "costwatch_attempts_total",
        model="claude-sonnet-4-5",
        outcome="connect_error",
        error_type="WasteBudgetExceeded",
    )
    assert attempts == 1


def test_stream_with_retries_raises_the_budgets_refusal_itself(accounted):
    costwatch.waste_budget(usd_per_hour=0.0)
    with FakeAnthropicServer(ResponseSpec.small(200)) as server:
        server.enqueue(Fault.cut_after_deltas(20), None)
        with pytest.raises(costwatch.WasteBudgetExceeded, match="this retry was not sent"):
            costwatch.stream_with_retries(sync_client(server), initial_backoff_s=0.001, **REQUEST)
        assert len(server.ledger) == 1


def test_a_large_body_resent_after_a_failure_is_recognised_as_a_retry_and_refused(accounted):
    sink, _registry = accounted
    costwatch.waste_budget(usd_per_hour=0.0)
    large = {**REQUEST, "messages": [{"role": "user", "content": "fix it " * 4000}]}  # ~28 KB
    with FakeAnthropicServer(ResponseSpec.small(200)) as server:
        server.enqueue(Fault.cut_after_deltas(20))
        client = sync_client(server)
        with raises_the_cut():
            read_stream(client, **large)
        assert costwatch.flush(10)
        with pytest.raises(costwatch.WasteBudgetExceeded):
            read_stream(client, **large)
        assert len(server.ledger) == 1
    assert costwatch.flush(10)
    cut, refused = sink.records
    assert refused.logical_request_id == cut.logical_request_id
    assert refused.error_type == "WasteBudgetExceeded"
