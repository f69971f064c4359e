"""The demo workload: seeded requests, large cached prompts, and a store that agrees with the server."""

from __future__ import annotations

import sqlalchemy as sa

from costwatch.demo import (
    DEFAULT_WORKFLOWS,
    DEMO_BLOCKS,
    DemoError,
    DemoOptions,
    default_models,
    demo_requests,
    demo_response_spec,
    ledger_summary,
    run_demo,
)
from costwatch.pricing import load_prices
from costwatch.store import SqlStore
from costwatch.store.schema import ATTEMPTS
from costwatch.testing import BlockKind

PRICES = load_prices()


def test_default_model_mix_is_the_current_priced_models_of_the_price_table():
    models = default_models(PRICES)
    assert models
    for model in models:
        price = PRICES.lookup(model)
        assert price is not None and price.status == "active"


def test_demo_requests_are_seeded_and_spread_over_models_and_workflows():
    options = DemoOptions(requests=12, seed=3)
    models = ("claude-sonnet-5-5", "claude-haiku-5-5")
    first, again = demo_requests(options, models), demo_requests(options, models)
    assert first == again
    assert {r.model for r in first} == set(models)
    assert [r.workflow for r in first[:3]] == list(DEFAULT_WORKFLOWS)
    assert len({str(r.body["messages"]) for r in first}) == 12, "each logical request has its own body"
    assert all(r.body["thinking"]["type"] == "enabled" for r in first)


def test_demo_answers_are_agentic_turns_over_a_large_cached_prompt_billed_alike_on_every_retry():
    spec = demo_response_spec("ab" * 32)
    assert spec == demo_response_spec("ab" * 32)
    assert spec.input_tokens is not None
    assert spec.input_tokens + spec.cache_read_tokens >= 60_000
    assert spec.blocks == DEMO_BLOCKS
    kinds = {block.kind for block in spec.blocks}
    assert {BlockKind.THINKING, BlockKind.BASH_CODE_EXECUTION, BlockKind.TOOL_USE} <= kinds
    sizes = [demo_response_spec(f"{n:064x}") for n in range(50)]
    assert sum(s.cache_read_tokens + (s.input_tokens or 0) for s in sizes) / 50 >= 100_000


def test_demo_options_that_cannot_work_are_refused():
    for bad in (
        DemoOptions(requests=0),
        DemoOptions(drop_rate=1.0),
        DemoOptions(concurrency=0),
        DemoOptions(workflows=()),
    ):
        try:
            bad.check()
        except DemoError:
            continue
        raise AssertionError(f"{bad} was accepted")


def test_demo_stores_every_attempt_exactly_as_the_server_billed_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    result = run_demo(DemoOptions(requests=6, drop_rate=0.5, concurrency=2, seed=1), url, prices=PRICES)
    assert result.completed + result.gave_up == result.requests == 6
    cut = [e for e in result.ledger if e.ending.value == "cut"]
    assert cut, "the seed must drop at least one stream"
    store = SqlStore(url)
    try:
        with store.engine.connect() as connection:
            rows = {row.request_id: row for row in connection.execute(sa.select(ATTEMPTS))}
    finally:
        store.shutdown()
    assert len(rows) == len(result.ledger)
    for entry in result.ledger:
        row = rows[entry.request_id]
        assert (row.input_tokens, row.cache_read_tokens, row.cache_write_5m_tokens) == (
            entry.input_tokens,
            entry.cache_read_tokens,
            entry.cache_write_5m_tokens,
        )
        if entry.ending.value == "completed":
            assert row.outcome == "completed" and row.output_tokens == entry.output_tokens
            assert not row.output_estimated
        else:
            assert row.outcome == "dropped" and row.error_type == "RemoteProtocolError" and row.wasted
            assert abs(row.output_tokens - entry.output_tokens) <= max(5, 0.15 * entry.output_tokens)
    truth = ledger_summary(result.ledger)
    assert truth["attempts"] == len(result.ledger)
    assert (
        truth["completed_output_tokens"] + truth["failed_output_tokens"] == truth["billed_tokens"]["output"]
    )
