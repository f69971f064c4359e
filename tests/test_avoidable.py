"""Avoidable waste: what prompt caching of the stable prefix would have saved the retried requests."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import postgres_schema_url, sample_value, sync_client
from prometheus_client import REGISTRY, CollectorRegistry

import costwatch
from costwatch.avoidable import MIN_CACHEABLE_TOKENS, Unknown, avoidable_for_request, avoidable_of_retried
from costwatch.cli import main
from costwatch.metrics import MetricsSink
from costwatch.pipeline import Pipeline
from costwatch.platforms import BEDROCK, FOUNDRY, GLOBAL, REGIONAL, VERTEX
from costwatch.pricing import PriceTable, load_prices
from costwatch.records import AttemptRecord, Outcome, Usage, WasteReason
from costwatch.report import avoidable_waste_section
from costwatch.store import SqlStore, create_store_engine, migrate
from costwatch.store.schema import RETRIED_ALIKE, RETRIED_REQUESTS
from costwatch.testing import FakeAnthropicServer, Fault, LedgerEntry, ResponseSpec


@pytest.fixture
def store_url(new_store_url: str) -> str:
    """A store at the newest revision already (conftest's ``new_store_url``): these tests start from
    the newest schema (the migration's own test downgrades it first), never from an empty database."""
    return new_store_url


PRICES = load_prices()
MODEL = "claude-sonnet-4-5"
PRICE = PRICES.lookup(MODEL)
assert PRICE is not None
RATE = PRICE.input_usd_per_mtok / 1e6
START = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)


def attempt(
    number: int,
    *,
    after_s: float = 0.0,
    prompt: int = 10_000,
    failed: bool = True,
    measured: tuple[int, int] | None = (40_000, 36_000),
    cache_read: int = 0,
    model: str = MODEL,
    platform: str = "anthropic",
    endpoint: str | None = None,
    prices: PriceTable = PRICES,
) -> AttemptRecord:
    usage = Usage(input_tokens=prompt - cache_read, cache_read_tokens=cache_read, output_tokens=100)
    cost = prices.cost(model, usage, platform=platform, endpoint=endpoint)
    return AttemptRecord(
        attempt_id=f"a{number}",
        logical_request_id="job-7",
        attempt_number=number,
        started_at=START + timedelta(seconds=after_s),
        outcome=Outcome.DROPPED if failed else Outcome.COMPLETED,
        model=model,
        usage=usage,
        cost=cost,
        wasted=failed,
        waste_reason=WasteReason.RETRIED if failed else None,
        tags={"workflow": "nightly"},
        prompt_bytes=measured[0] if measured and number > 1 else None,
        stable_prefix_bytes=measured[1] if measured and number > 1 else None,
        platform=platform,
        endpoint=endpoint,
    )


def test_a_retry_within_five_minutes_would_have_read_the_prefix_the_first_attempt_wrote():
    found = avoidable_for_request([attempt(1), attempt(2, after_s=30, failed=False)], PRICES)
    assert found is not None and found.lifetime == "5m" and found.prefix_tokens == 9_000
    # Actual: two full prompts. Cached: 1,000 + 9,000 x 1.25, then 1,000 + 9,000 x 0.1.
    expected = (20_000 - (1_000 + 9_000 * 1.25 + 1_000 + 9_000 * 0.1)) * RATE
    assert found.avoidable_usd == pytest.approx(expected)
    assert found.wasted_usd == pytest.approx(attempt(1).wasted_cost_usd)
    assert (found.model, found.workflow, found.attempts) == (MODEL, "nightly", 2)


def test_gaps_over_five_minutes_are_priced_with_the_one_hour_lifetime_and_over_an_hour_save_nothing():
    twenty_minutes = [attempt(1), attempt(2, after_s=1200), attempt(3, after_s=2400, failed=False)]
    found = avoidable_for_request(twenty_minutes, PRICES)
    assert found is not None and found.lifetime == "1h"
    expected = (30_000 - (1_000 + 9_000 * 2.0 + 2 * (1_000 + 9_000 * 0.1))) * RATE
    assert found.avoidable_usd == pytest.approx(expected)
    # One retry 20 minutes later: the 1-hour write's premium costs more than one read saves.
    one_retry = avoidable_for_request([attempt(1), attempt(2, after_s=1200, failed=False)], PRICES)
    assert one_retry is not None and one_retry.avoidable_usd == 0.0 and one_retry.lifetime is None
    hours_apart = avoidable_for_request([attempt(1), attempt(2, after_s=7200, failed=False)], PRICES)
    assert hours_apart is not None and hours_apart.avoidable_usd == 0.0


def test_what_cannot_be_known_is_said_and_what_cannot_be_cached_saves_nothing():
    not_measured = avoidable_for_request([attempt(1), attempt(2, measured=None, failed=False)], PRICES)
    assert not_measured is not None and not_measured.avoidable_usd is None
    assert not_measured.unknown == Unknown.NOT_MEASURED
    unpriced = avoidable_for_request(
        [attempt(1, model="claude-mythos-5-2"), attempt(2, model="claude-mythos-5-2", failed=False)], PRICES
    )
    assert unpriced is not None and unpriced.unknown == Unknown.UNPRICED
    cached = avoidable_for_request([attempt(1, cache_read=8000), attempt(2, cache_read=8000)], PRICES)
    assert cached is not None and cached.avoidable_usd == 0.0 and cached.already_cached
    short = [attempt(1, prompt=1000), attempt(2, prompt=1000, failed=False)]
    found = avoidable_for_request(short, PRICES)
    assert found is not None and found.prefix_tokens < MIN_CACHEABLE_TOKENS and found.avoidable_usd == 0.0
    assert avoidable_for_request([attempt(1, failed=False)], PRICES) is None, "never retried"


def test_the_report_section_totals_by_model_and_workflow_and_names_the_requests_that_gain_most():
    gaining = avoidable_for_request([attempt(1), attempt(2, after_s=30, failed=False)], PRICES)
    unknown = avoidable_for_request([attempt(1), attempt(2, measured=None, failed=False)], PRICES)
    assert gaining is not None and unknown is not None
    section = avoidable_waste_section([gaining, unknown], wasted_usd=1.0, refused_retries=3)
    avoidable = section["avoidable_with_prompt_caching"]
    assert avoidable["avoidable_usd"] == pytest.approx(gaining.avoidable_usd, abs=1e-6)
    assert avoidable["wasted_usd"] == 1.0 and avoidable["retried_requests"] == 1
    assert avoidable["unknown_requests"] == 1 and avoidable["unknown_reasons"] == {"prefix_not_measured": 1}
    assert [row["model"] for row in avoidable["by_model"]] == [MODEL]
    assert [row["workflow"] for row in avoidable["by_workflow"]] == ["nightly"]
    assert avoidable["top_requests"][0]["logical_request_id"] == "job-7"
    assert avoidable["top_requests"][0]["cache_lifetime"] == "5m"
    assert section["refused_retries"] == 3


BEDROCK_HAIKU = {"input_usd_per_mtok": 2.0, "output_usd_per_mtok": 9.0, "source": "https://aws.amazon.com/"}


def with_bedrock_prices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PriceTable:
    """The built-in table plus a Bedrock price of one model, unlike its first-party price."""
    path = tmp_path / "prices.json"
    platforms = {BEDROCK: {"models": {"claude-haiku-4-5-20251001": BEDROCK_HAIKU}}}
    path.write_text(json.dumps({"version": "aws-1", "models": {}, "platforms": platforms}))
    monkeypatch.setenv("COSTWATCH_PRICES_FILE", str(path))
    return load_prices()


def test_a_platform_attempt_is_priced_at_its_platform_and_endpoint_and_unpriced_where_they_are_unknown(
    tmp_path, monkeypatch
):
    table = with_bedrock_prices(tmp_path, monkeypatch)
    haiku = "claude-haiku-4-5"

    def request(platform: str, endpoint: str | None) -> list[AttemptRecord]:
        on = {"model": haiku, "platform": platform, "endpoint": endpoint, "prices": table}
        return [attempt(1, **on), attempt(2, after_s=30, failed=False, **on)]

    def caching_saves(rate_usd_per_mtok: float) -> float:
        # As above: two full prompts against a 5-minute write then a read of the 9,000-token prefix.
        return (20_000 - (1_000 + 9_000 * 1.25 + 1_000 + 9_000 * 0.1)) * rate_usd_per_mtok / 1e6

    regional = avoidable_for_request(request(BEDROCK, REGIONAL), table)
    assert regional is not None and regional.avoidable_usd == pytest.approx(caching_saves(2.0 * 1.1))
    global_ = avoidable_for_request(request(BEDROCK, GLOBAL), table)
    assert global_ is not None and global_.avoidable_usd == pytest.approx(caching_saves(2.0))
    first_party = table.lookup(haiku)
    assert first_party is not None and first_party.input_usd_per_mtok != 2.0
    foundry = avoidable_for_request(request(FOUNDRY, None), table)  # Foundry bills the Claude API's rates
    assert foundry is not None
    assert foundry.avoidable_usd == pytest.approx(caching_saves(first_party.input_usd_per_mtok))
    # Bedrock with its endpoint kind unknown, and Vertex (no price of its own in the table): unpriced.
    for platform, endpoint in ((BEDROCK, None), (VERTEX, GLOBAL)):
        unpriced = avoidable_for_request(request(platform, endpoint), table)
        assert unpriced is not None and unpriced.avoidable_usd is None, platform
        assert unpriced.unknown == Unknown.UNPRICED


def mixed_requests(table: PriceTable, count: int, *, seed: int) -> list[AttemptRecord]:
    """Logical requests of every kind the avoidable waste tells apart, over three days from ``START``:
    retried or not, billed or not, measured or not, caching or not, priced or not (an unknown model,
    a platform or endpoint without a price), a model switched on the last attempt, long workflows."""
    rng = random.Random(seed)
    workflows = ("nightly", "", "triage", "w" * 80)
    models = (MODEL, "claude-haiku-4-5", "claude-opus-4-1", "claude-mythos-5-2")
    routes = (("anthropic", None),) * 4 + (
        (BEDROCK, GLOBAL),
        (BEDROCK, REGIONAL),
        (BEDROCK, None),
        (VERTEX, None),
    )
    made = []
    for request in range(count):
        started = START + timedelta(seconds=rng.uniform(0, 3 * 86_400))
        model, workflow = rng.choice(models), rng.choice(workflows)
        platform, endpoint = rng.choice(routes)
        measured, cached = rng.random() < 0.6, rng.random() < 0.15
        attempts = rng.choice((1, 2, 2, 3, 4))
        for number in range(1, attempts + 1):
            last = number == attempts
            billed = rng.random() < 0.85
            prompt = rng.randint(500, 50_000) if billed else 0
            usage = Usage(
                input_tokens=prompt // 2 if cached else prompt,
                cache_read_tokens=prompt - prompt // 2 if cached else 0,
                output_tokens=rng.randint(0, 2_000) if billed else 0,
            )
            answered = rng.choice(models) if last and rng.random() < 0.1 else model
            made.append(
                AttemptRecord(
                    attempt_id=f"r{request}-a{number}",
                    logical_request_id=f"r{request}",
                    attempt_number=number,
                    started_at=started + timedelta(seconds=rng.choice((5, 200, 900, 4_000)) * (number - 1)),
                    outcome=Outcome.COMPLETED if last else Outcome.DROPPED,
                    model_requested=model,
                    model=answered if billed else None,
                    platform=platform,
                    endpoint=endpoint,
                    usage=usage,
                    cost=table.cost(answered, usage, platform=platform, endpoint=endpoint),
                    wasted=not last and billed,
                    waste_reason=WasteReason.RETRIED if not last and billed else None,
                    tags={"workflow": workflow} if workflow else {},
                    prompt_bytes=rng.randint(1_000, 200_000) if measured and number > 1 else None,
                    stable_prefix_bytes=rng.randint(0, 1_000) * 200 if measured and number > 1 else None,
                )
            )
    return made


@contextlib.contextmanager
def exported(store_url: str, records: list[AttemptRecord]) -> Iterator[SqlStore]:
    """A store at ``store_url`` holding ``records``, shut down afterwards."""
    store = SqlStore(store_url)
    try:
        store.export(records)
        yield store
    finally:
        store.shutdown()


def assert_same_section(grouped: dict[str, Any], every_record: dict[str, Any]) -> None:
    """Equal, up to the last float bit of sums added in another order."""
    assert grouped.keys() == every_record.keys()
    for key, value in every_record.items():
        if isinstance(value, dict):
            assert_same_section(grouped[key], value)
        elif isinstance(value, list):
            assert len(grouped[key]) == len(value), key
            for ours, theirs in zip(grouped[key], value, strict=True):
                assert_same_section(ours, theirs)
        elif isinstance(value, float):
            assert grouped[key] == pytest.approx(value, abs=2e-6), key
        else:
            assert grouped[key] == value, key


def test_the_report_groups_the_avoidable_waste_in_the_database_to_the_same_numbers_as_from_every_record(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    table = with_bedrock_prices(tmp_path, monkeypatch)
    records = mixed_requests(table, 400, seed=18)
    with exported(store_url, records) as store:
        for start, end in ((None, None), (START + timedelta(days=1), START + timedelta(days=2))):
            every = [avoidable_for_request(r, table) for r in store.retried_requests(start, end).values()]
            alike, prompts = store.retried_prompts(start, end)
            grouped = avoidable_of_retried(alike, prompts.values(), table)
            assert len(prompts) < len(every) and alike, "some summed, some priced one by one"
            wasted = sum(r.wasted_cost_usd for r in records)
            expected = avoidable_waste_section([r for r in every if r is not None], wasted_usd=wasted, top=20)
            assert expected["avoidable_with_prompt_caching"]["avoidable_usd"] > 0
            assert set(expected["avoidable_with_prompt_caching"]["unknown_reasons"]) == {
                Unknown.UNPRICED,
                Unknown.NOT_MEASURED,
            }
            assert_same_section(avoidable_waste_section(grouped, wasted_usd=wasted, top=20), expected)


# -- the summaries the writer keeps (all time) ------------------------------------------------------
def section_from_every_record(store: SqlStore, table: PriceTable, wasted: float) -> dict[str, Any]:
    every = [avoidable_for_request(r, table) for r in store.retried_requests().values()]
    return avoidable_waste_section([r for r in every if r is not None], wasted_usd=wasted, top=20)


def section_from_summaries(store: SqlStore, table: PriceTable, wasted: float) -> dict[str, Any]:
    alike, requests = store.retried_prompts()
    return avoidable_waste_section(
        avoidable_of_retried(alike, requests.values(), table), wasted_usd=wasted, top=20
    )


def summaries(url: str) -> list[tuple[Any, ...]]:
    """The stored summaries and sums of requests alike, dollars rounded (sums added in another order
    differ in the last bit), groups of no request left out."""
    engine = create_store_engine(url)
    try:
        with engine.connect() as connection:
            rows = [
                *connection.execute(
                    sa.select(RETRIED_REQUESTS).order_by(RETRIED_REQUESTS.c.logical_request_id)
                ),
                *connection.execute(
                    sa.select(RETRIED_ALIKE)
                    .where(RETRIED_ALIKE.c.requests != 0)
                    .order_by(*RETRIED_ALIKE.primary_key.columns)
                ),
            ]
            return [tuple(round(v, 9) if isinstance(v, float) else v for v in row) for row in rows]
    finally:
        engine.dispose()


def revised(record: AttemptRecord, table: PriceTable) -> AttemptRecord:
    """A later revision of ``record``: more output and another prompt measurement, repriced."""
    usage = dataclasses.replace(record.usage, output_tokens=record.usage.output_tokens + 500)
    cost = table.cost(record.model_name, usage, platform=record.platform, endpoint=record.endpoint)
    return dataclasses.replace(
        record,
        usage=usage,
        cost=cost,
        revision=record.revision + 1,
        prompt_bytes=None if record.prompt_bytes else 50_000,
        stable_prefix_bytes=None if record.prompt_bytes else 45_000,
    )


def test_the_summaries_written_in_any_order_batches_and_revisions_are_those_of_the_attempts_as_stored(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A request's first attempt may land after its retries, in another batch, or be revised later;
    the summary the writer keeps is the one made from the attempts as stored (migration 0016's fill
    makes the same rows), and the all-time report reads from it what it read from every record."""
    table = with_bedrock_prices(tmp_path, monkeypatch)
    rng = random.Random(5)
    records = mixed_requests(table, 300, seed=5)
    later = [revised(r, table) for r in rng.sample(records, 120)]
    arriving = [*records, *rng.sample(records, 40)]  # some delivered twice
    rng.shuffle(arriving)
    store = SqlStore(store_url)
    try:
        while arriving:
            size = rng.randint(1, 25)
            store.export(arriving[:size])
            arriving = arriving[size:]
        for start in range(0, len(later), 7):
            store.export(later[start : start + 7])
        stored = store.retried_requests()
        assert sum(len(a) for a in stored.values()) < len(records) and stored
        wasted = sum(r.wasted_cost_usd for attempts in stored.values() for r in attempts)
        assert_same_section(
            section_from_summaries(store, table, wasted), section_from_every_record(store, table, wasted)
        )
    finally:
        store.shutdown()
    kept = summaries(store_url)
    assert sum(isinstance(row[0], str) for row in kept) == len(stored)  # and the sums alike
    migrate.downgrade(store_url, "0015")
    migrate.upgrade(store_url)
    assert summaries(store_url) == kept


@pytest.mark.postgres
def test_writers_of_the_same_requests_at_once_keep_one_summary_each(
    postgres_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Two processes' writers storing the attempts of the same requests at the same moment, each in its
    own order: every request's summary is made once and moved by every attempt."""
    table = with_bedrock_prices(tmp_path, monkeypatch)
    url = postgres_schema_url(postgres_schema)
    records = mixed_requests(table, 200, seed=11)
    SqlStore(url).shutdown()  # migrated before the race
    halves = [[r for r in records if r.attempt_number % 2 == parity] for parity in (0, 1)]
    random.Random(3).shuffle(halves[1])
    stores = [SqlStore(url) for _ in halves]
    start = threading.Barrier(len(halves))

    def write(store: SqlStore, half: list[AttemptRecord]) -> None:
        start.wait()
        for at in range(0, len(half), 4):
            store.export(half[at : at + 4])

    threads = [threading.Thread(target=write, args=pair) for pair in zip(stores, halves, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert all(store.rejected_records == 0 for store in stores)
        wasted = sum(r.wasted_cost_usd for r in records)
        assert_same_section(
            section_from_summaries(stores[0], table, wasted),
            section_from_every_record(stores[0], table, wasted),
        )
    finally:
        for store in stores:
            store.shutdown()


def test_a_prune_leaves_the_all_time_avoidable_waste_as_it_leaves_the_all_time_waste(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    table = with_bedrock_prices(tmp_path, monkeypatch)
    records = mixed_requests(table, 200, seed=13)
    with exported(store_url, records) as store:
        wasted = store.rollup_totals()[0].wasted_cost_usd
        before = section_from_summaries(store, table, wasted)
        assert before["avoidable_with_prompt_caching"]["avoidable_usd"] > 0
        assert store.prune_before(START + timedelta(days=5)) == len(records)
        assert store.rollup_totals()[0].wasted_cost_usd == wasted
        assert section_from_summaries(store, table, wasted) == before
        # A range reads the attempts: those of pruned days are gone.
        assert store.retried_prompts(START, START + timedelta(days=5)) == ([], {})


# -- end to end: the SDK, the store, the report, the metric, and the fake's ledger as the truth ---------
def agent_turn(task: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 1024,
        "system": "You are a careful agent. " + "Repository rules. " * 1500,
        "messages": [
            {"role": "user", "content": f"Task {task}: find the failing test. " + "log line\n" * 2000},
            {"role": "assistant", "content": [{"type": "text", "text": "Reading the test file."}]},
            {"role": "user", "content": "Here it is; now fix it."},
        ],
    }


def run_workload(server: FakeAnthropicServer, *, cache_prefix_on_retry: bool) -> None:
    client = sync_client(server)
    for task in range(3):
        server.enqueue(Fault.cut_after_deltas(10), Fault.cut_after_deltas(30), None)
        with costwatch.tags(workflow="nightly"):
            costwatch.stream_with_retries(
                client,
                cache_prefix_on_retry=cache_prefix_on_retry,
                initial_backoff_s=0.001,
                **agent_turn(task),
            )


def prompt_cost(entries: tuple[LedgerEntry, ...]) -> float:
    return sum(
        PRICES.cost(
            MODEL,
            Usage(
                input_tokens=e.input_tokens,
                cache_read_tokens=e.cache_read_tokens,
                cache_write_5m_tokens=e.cache_write_5m_tokens,
            ),
        ).total_usd
        for e in entries
    )


def test_the_report_and_the_metric_predict_what_caching_the_prefix_then_saves_on_the_fake_api(
    capsys, tmp_path: Path
):
    db = f"sqlite:///{tmp_path / 'store.db'}"
    pipeline = Pipeline()
    store = SqlStore(db)
    registry = CollectorRegistry()
    metrics = MetricsSink(registry=registry, pipeline=pipeline, prices=PRICES)
    costwatch.instrument(pipeline=pipeline, sinks=[store, metrics], listeners=[], prices=PRICES)
    try:
        with FakeAnthropicServer(ResponseSpec.small(200)) as server:
            run_workload(server, cache_prefix_on_retry=False)
            uncached = server.ledger.entries
        assert costwatch.flush(10)
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()
        store.shutdown()
    reader = SqlStore(db)
    try:
        retries = list(reader.retried_requests().values())
    finally:
        reader.shutdown()
    assert len(retries) == 3 and all(len(attempts) == 3 for attempts in retries)
    assert all(r.prompt_bytes and r.stable_prefix_bytes for a in retries for r in a if r.attempt_number > 1)
    assert all(r.prompt_bytes is None for a in retries for r in a if r.attempt_number == 1)

    assert main(["report", "--db", db, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    predicted = report["avoidable_with_prompt_caching"]["avoidable_usd"]
    assert report["avoidable_with_prompt_caching"]["wasted_usd"] == report["wasted_cost_usd"]
    assert 0 < predicted < report["wasted_cost_usd"]
    counted = sample_value(registry, "costwatch_avoidable_waste_usd_total", model=MODEL, workflow="nightly")
    assert counted == pytest.approx(predicted, abs=1e-5)

    # The same workload with the lever pulled: the fake's ledger shows what caching really saved.
    with FakeAnthropicServer(ResponseSpec.small(200)) as server:
        run_workload(server, cache_prefix_on_retry=True)
        cached = server.ledger.entries
    saved = prompt_cost(uncached) - prompt_cost(cached)
    prefixes = [e.cache_write_5m_tokens for e in cached if e.cache_write_5m_tokens]
    assert len(prefixes) == 3, "each request's first retry wrote its prefix"
    # Predicted, per request: three prompts in full, against a write on the first attempt (1.25) and
    # reads on the two retries (0.1 each): 1.55 prefixes saved. The prefix is estimated from bytes.
    assert predicted == pytest.approx(sum(1.55 * p * RATE for p in prefixes), rel=0.03)
    # The lever never touches the first attempt: it writes on the first retry and reads on the
    # second, so it saves 3 - (1 + 1.25 + 0.1) = 0.65 prefixes of those 1.55.
    assert saved == pytest.approx(sum(0.65 * p * RATE for p in prefixes), rel=0.01)

    assert main(["report", "--db", db]) == 0
    table = capsys.readouterr().out
    assert "Avoidable with prompt caching: $" in table and " wasted" in table
    assert "logical requests that would gain most" in table


def test_the_process_metrics_sink_prices_avoidable_waste_with_the_latest_instrument_s_table():
    """The process's metrics sink outlives ``uninstrument()``: the next ``instrument(prices=...)``
    prices the avoidable waste it counts with its own table, not the first call's."""
    doubled = PriceTable(
        {
            model: dataclasses.replace(
                price,
                input_usd_per_mtok=2 * price.input_usd_per_mtok,
                output_usd_per_mtok=2 * price.output_usd_per_mtok,
            )
            for model in PRICES.models
            if (price := PRICES.lookup(model)) is not None
        },
        version="doubled",
        updated=PRICES.updated,
        source="every rate of the built-in table, doubled",
    )

    def counted_with(prices: PriceTable) -> float:
        def total() -> float:
            labels = {"model": MODEL, "workflow": "nightly"}
            return sample_value(REGISTRY, "costwatch_avoidable_waste_usd_total", **labels) or 0.0

        pipeline = Pipeline()
        before = total()
        # The default sinks without the store: the process's metrics sink alone.
        assert costwatch.instrument(pipeline=pipeline, store=False, listeners=[], prices=prices)
        try:
            with FakeAnthropicServer(ResponseSpec.small(200)) as server:
                run_workload(server, cache_prefix_on_retry=False)
            assert costwatch.flush(10)
        finally:
            costwatch.uninstrument()
            pipeline.shutdown()
        return total() - before

    first = counted_with(PRICES)
    assert first > 0
    assert counted_with(doubled) == pytest.approx(2 * first, rel=1e-9)
