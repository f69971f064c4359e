"""Writing attempts to the store: idempotence, revisions, retried/abandoned reclassification, rollups."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import postgres_schema_url
from sqlalchemy.dialects import postgresql

from costwatch.records import (
    WORKFLOW_LABEL_LENGTH,
    AttemptRecord,
    Cost,
    Outcome,
    OutputSource,
    Usage,
    WasteReason,
)
from costwatch.store import ROLLUP_MEASURES, SqlStore
from costwatch.store import write as store_write
from costwatch.store.database import create_store_engine
from costwatch.store.partitions import is_attempt_partition
from costwatch.store.retried import StoredSummary, stored_summaries_parameters, stored_summaries_query
from costwatch.store.rows import (
    ATTEMPT_COLUMNS,
    _amounts,
    _kind,
    attempt_row,
    record_from_row,
    rollup_delta_rows,
    rollup_key,
    rollup_measures,
)
from costwatch.store.schema import ATTEMPTS, ROLLUPS
from costwatch.store.write import _attempt_rows, _listed, _lock_keys, _sqlite_utc_text


@pytest.fixture
def store_url(new_store_url: str) -> str:
    """A store at the newest revision already (conftest's ``new_store_url``): these tests are of what
    a store does, not of how it is created."""
    return new_store_url


T0 = datetime(2025, 3, 1, 10, 15, tzinfo=timezone.utc)


def attempt(n: int, **changes: Any) -> AttemptRecord:
    """A completed, priced attempt; ``changes`` override any field."""
    fields: dict[str, Any] = {
        "attempt_id": f"att-{n}",
        "logical_request_id": f"req-{n}",
        "attempt_number": 1,
        "started_at": T0 + timedelta(seconds=n),
        "outcome": Outcome.COMPLETED,
        "model_requested": "claude-sonnet-4-5",
        "model": "claude-sonnet-4-5-20250929",
        "stream": True,
        "usage": Usage(input_tokens=1000, cache_read_tokens=200, cache_write_5m_tokens=50, output_tokens=300),
        "cost": Cost(input_usd=0.003, cache_write_usd=0.0002, cache_read_usd=0.00006, output_usd=0.0045),
        "duration_s": 2.5,
        "fingerprint": f"fp-{n}",
        "tags": {"workflow": "summarise"},
    }
    fields.update(changes)
    return AttemptRecord(**fields)


def dropped(n: int, **changes: Any) -> AttemptRecord:
    """A dropped stream, billed for its input and some estimated output, marked abandoned."""
    return attempt(
        n,
        outcome=Outcome.DROPPED,
        error_type="RemoteProtocolError",
        usage=Usage(input_tokens=1000, output_tokens=120, output_estimated=True, estimated_output_tokens=120),
        wasted=True,
        waste_reason=WasteReason.ABANDONED,
        **changes,
    )


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    """A store on an empty database of each backend."""
    sql_store = SqlStore(store_url)
    yield sql_store
    sql_store.shutdown()


def rollup_rows(store: SqlStore) -> dict[tuple[Any, ...], dict[str, float]]:
    """Every non-empty rollup row, keyed by its dimensions."""
    with store.engine.connect() as connection:
        rows = connection.execute(sa.select(ROLLUPS)).mappings().all()
    return {
        (r["hour"], r["model"], r["outcome"], r["error_type"], r["waste_reason"], r["workflow"]): {
            m: r[m] for m in ROLLUP_MEASURES
        }
        for r in rows
        if r["attempts"] != 0
    }


def sums_over_raw_rows(store: SqlStore) -> dict[tuple[Any, ...], dict[str, float]]:
    """The rollups recomputed from scratch from the raw attempt rows, written independently here."""
    with store.engine.connect() as connection:
        rows = connection.execute(sa.select(ATTEMPTS)).mappings().all()
    sums: dict[tuple[Any, ...], dict[str, float]] = defaultdict(lambda: dict.fromkeys(ROLLUP_MEASURES, 0))
    for r in rows:
        hour = r["started_at"].replace(minute=0, second=0, microsecond=0)
        reason = r["waste_reason"] if r["wasted"] else ""
        workflow = (r["tags"].get("workflow") or "")[:WORKFLOW_LABEL_LENGTH]
        key = (
            hour,
            r["model"] or r["model_requested"],
            r["outcome"],
            r["error_type"] or "",
            reason,
            workflow,
        )
        s = sums[key]
        tokens = {
            "input": r["input_tokens"],
            "output": r["output_tokens"],
            "cache_read": r["cache_read_tokens"],
            "cache_write": r["cache_write_5m_tokens"] + r["cache_write_1h_tokens"],
        }
        cost = sum(
            r[c] or 0.0
            for c in (
                "input_cost_usd",
                "cache_write_cost_usd",
                "cache_read_cost_usd",
                "output_cost_usd",
                "server_tool_cost_usd",
            )
        )
        s["attempts"] += 1
        s["dropped_attempts"] += r["outcome"] == "dropped"
        s["logical_requests_started"] += r["attempt_number"] == 1
        for kind, count in tokens.items():
            s[f"billed_{kind}_tokens"] += count
            s[f"wasted_{kind}_tokens"] += count if r["wasted"] else 0
        s["billed_cost_usd"] += cost
        s["wasted_cost_usd"] += cost if r["wasted"] else 0.0
        s["estimated_output_tokens"] += r["estimated_output_tokens"] if r["output_estimated"] else 0
        s["duration_s"] += r["duration_s"]
        unpriced = r["input_cost_usd"] is None
        s["unpriced_attempts"] += unpriced
        s["unpriced_tokens"] += sum(tokens.values()) if unpriced else 0
        for part in ("input", "cache_read", "cache_write", "output", "server_tool"):
            s[f"wasted_{part}_cost_usd"] += (r[f"{part}_cost_usd"] or 0.0) if r["wasted"] else 0.0
        source = r["output_source"]
        if source != "estimated":  # the estimated tokens are estimated_output_tokens, above
            s[f"{source}_output_tokens"] += r["output_tokens"]
        s[f"{source}_output_cost_usd"] += r["output_cost_usd"] or 0.0
    return dict(sums)


def assert_rollups_match_raw_rows(store: SqlStore) -> None:
    """Rollups equal the sums over the raw rows (costs and durations to float rounding)."""
    expected, actual = sums_over_raw_rows(store), rollup_rows(store)
    assert set(actual) == set(expected)
    for key, values in expected.items():
        assert actual[key] == pytest.approx(values, rel=1e-9, abs=1e-9), key


# -- pure conversions ------------------------------------------------------------------------


def rollup_contribution(record: AttemptRecord) -> tuple[tuple[Any, ...], dict[str, float]]:
    """What one attempt adds to its rollup row: the key, and each measure by name."""
    return rollup_key(record), dict(zip(ROLLUP_MEASURES, rollup_measures(record), strict=True))


def rollup_deltas(
    added: list[AttemptRecord], removed: list[AttemptRecord]
) -> dict[tuple[Any, ...], dict[str, float]]:
    """The writer's rollup delta rows, keyed by dimensions, each measure by name."""
    width = len(ROLLUP_MEASURES)
    return {
        row[:-width]: dict(zip(ROLLUP_MEASURES, row[-width:], strict=True))
        for row in rollup_delta_rows(added, removed)
    }


def test_record_survives_the_round_trip_through_a_row() -> None:
    record = dropped(1, beta_features=("context-1m",), server_tool_use={"web_search_requests": 2}, revision=3)
    assert record_from_row(attempt_row(record)) == record


def test_unpriced_attempt_keeps_null_cost_and_adds_no_cost_to_rollups() -> None:
    record = attempt(1, cost=None)
    row = attempt_row(record)
    assert row["input_cost_usd"] is None and record_from_row(row).cost is None
    _, values = rollup_contribution(record)
    assert values["billed_cost_usd"] == 0 and values["billed_input_tokens"] == 1000


def test_dropped_stream_counts_billed_input_and_partial_output_as_wasted() -> None:
    key, values = rollup_contribution(dropped(1))
    assert key[2:5] == ("dropped", "RemoteProtocolError", "abandoned")
    assert values["dropped_attempts"] == 1
    assert values["wasted_input_tokens"] == 1000 and values["wasted_output_tokens"] == 120
    assert values["estimated_output_tokens"] == 120


def test_reclassification_moves_the_contribution_between_waste_reasons() -> None:
    before = dropped(1)
    after = before.with_waste(WasteReason.RETRIED)
    deltas = rollup_deltas([after], [before])
    by_reason = {key[4]: values for key, values in deltas.items()}
    assert by_reason["abandoned"]["attempts"] == -1 and by_reason["retried"]["attempts"] == 1
    assert by_reason["abandoned"]["wasted_input_tokens"] == -1000
    assert rollup_deltas([before], [before]) == {}


def test_workflow_label_is_truncated_in_rollups() -> None:
    key, _ = rollup_contribution(attempt(1, tags={"workflow": "w" * 500}))
    assert key[5] == "w" * WORKFLOW_LABEL_LENGTH


def test_a_batch_of_alike_attempts_sums_to_what_each_adds_alone_whatever_the_offset_of_its_moments() -> None:
    """The writer makes a rollup key and kind once per set of alike fields in a batch: a moment's UTC
    hour still decides its row, whether the moment is UTC, naive or at another offset."""
    india = timezone(timedelta(hours=5, minutes=30))
    moments = [
        T0,
        T0.replace(tzinfo=None),
        T0.astimezone(india),
        (T0 + timedelta(minutes=50)).astimezone(india),  # 11:05 UTC, but 16:35 there as 16:05 is
        T0.astimezone(india).replace(minute=5),  # 09:35 UTC
        T0 + timedelta(hours=1),
    ]
    batch = [
        attempt(n, started_at=moment, model=model, tags=tags)
        for n, moment in enumerate(moments)
        for model, tags in (("claude-sonnet-4-5-20250929", {"workflow": "summarise"}), (None, {}))
    ]
    one_by_one: dict[tuple[Any, ...], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for record in batch:
        key, values = rollup_contribution(record)
        for name, value in values.items():
            one_by_one[key][name] += value
    together = rollup_deltas(batch, [])
    assert {key[0] for key in together} == {T0.replace(minute=0) + timedelta(hours=h) for h in (-1, 0, 1)}
    assert together == {key: dict(values) for key, values in one_by_one.items()}


def test_attempts_that_differ_in_any_field_their_rollup_row_or_kind_reads_are_never_summed_as_alike() -> None:
    """The writer makes a key and kind once per set of the fields they are read from: each attempt
    below differs from the first in one of those fields alone, and the batch sums to what each adds."""
    base = attempt(0, started_at=T0)
    usage = base.usage
    batch = [
        base,
        dataclasses.replace(base, attempt_id="model", model="claude-opus-4-6"),
        dataclasses.replace(base, attempt_id="asked", model=None, model_requested="claude-haiku-4-5"),
        dataclasses.replace(base, attempt_id="asked-as-answered", model=None),
        dataclasses.replace(base, attempt_id="dropped", outcome=Outcome.DROPPED),
        dataclasses.replace(base, attempt_id="http", outcome=Outcome.HTTP_ERROR),
        dataclasses.replace(
            base, attempt_id="error", outcome=Outcome.HTTP_ERROR, error_type="APIStatusError"
        ),
        dataclasses.replace(
            base, attempt_id="api-error", outcome=Outcome.HTTP_ERROR, api_error_type="overloaded_error"
        ),
        dataclasses.replace(base, attempt_id="wasted", wasted=True),
        dataclasses.replace(base, attempt_id="reason", wasted=True, waste_reason=WasteReason.RETRIED),
        dataclasses.replace(base, attempt_id="workflow", tags={"workflow": "translate"}),
        dataclasses.replace(base, attempt_id="platform", platform="bedrock"),
        dataclasses.replace(base, attempt_id="second", attempt_number=2),
        dataclasses.replace(base, attempt_id="unpriced", cost=None),
        dataclasses.replace(
            base,
            attempt_id="estimated",
            usage=dataclasses.replace(usage, output_estimated=True, estimated_output_tokens=300),
        ),
        dataclasses.replace(
            base,
            attempt_id="counted",
            usage=dataclasses.replace(usage, output_source=OutputSource.COUNTED),
        ),
    ]
    one_by_one: dict[tuple[Any, ...], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for record in batch:
        key, values = rollup_contribution(record)
        for name, value in values.items():
            one_by_one[key][name] += value
    assert rollup_deltas(batch, []) == {key: dict(values) for key, values in one_by_one.items()}


def test_what_a_batch_holds_until_it_commits_is_plain_values_the_garbage_collector_lets_go() -> None:
    """The attempt rows PostgreSQL's insert copies and the per-attempt rollup terms are tuples of plain
    values (JSON as its text): the collector untracks them when it first looks at them (a pair of
    terms at its second look), so a batch's thousands do not reach its oldest generation, where each
    brings a full collection of the process's heap nearer (benchmarks/README.md, row 9, pg-writes,
    sixth session)."""
    records = [
        dropped(n, beta_features=("context-1m",), server_tool_use={"web_search_requests": 2})
        for n in range(3)
    ]
    rows = _attempt_rows(postgresql.dialect(), records)
    terms = [(_kind(record), _amounts(record)) for record in records]
    gc.collect()
    assert not any(gc.is_tracked(held) for held in [*rows, *(term for pair in terms for term in pair)])
    gc.collect()
    assert not any(gc.is_tracked(pair) for pair in terms)
    [row] = _attempt_rows(postgresql.dialect(), records[:1])
    values = dict(zip(ATTEMPT_COLUMNS, row, strict=True))
    assert (values["tags"], values["beta_features"], values["outcome"]) == (
        '{"workflow": "summarise"}',
        '["context-1m"]',
        "dropped",
    )


# -- against the databases ----------------------------------------------------------------------


def test_record_reads_back_unchanged(store: SqlStore) -> None:
    record = dropped(1, beta_features=("context-1m",), server_tool_use={"web_search_requests": 2})
    store.export([record])
    assert store.attempt("att-1") == record


def test_unusual_values_read_back_unchanged(store: SqlStore) -> None:
    record = attempt(
        1,
        attempt_id='att-"quoted" \\ back\\slash',
        started_at=datetime(2025, 3, 1, 15, 45, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        model=None,
        time_to_first_token_s=float("inf"),
        duration_s=1e-300,
        tags={"workflow": 'naïve "café" \\ 😀', "team": "{a,b}"},
        beta_features=("context-1m", "NULL"),
        server_tool_use={"web_search_requests": 2**40},
        fingerprint=None,
    )
    store.export([record])
    assert store.attempt(record.attempt_id) == record


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 12, 4, 2, 30, 59, 999_999, tzinfo=timezone.utc),
        datetime(2026, 12, 4, 2, 30, 59, 1, tzinfo=timezone.utc),  # the same second, from its text made once
        datetime(2026, 12, 4, 2, 31, 0, tzinfo=timezone.utc),  # no microseconds: still six digits
        datetime(2026, 12, 4, 2, 31, 0, 5),  # naive: taken as UTC
        datetime(2025, 3, 1, 15, 45, 0, 120, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc),  # a four-digit year
    ],
)
def test_a_moment_binds_for_sqlite_as_its_utc_text_to_the_microsecond(moment: datetime) -> None:
    utc = moment if moment.tzinfo is None else moment.astimezone(timezone.utc).replace(tzinfo=None)
    assert _sqlite_utc_text(moment) == utc.isoformat(sep=" ", timespec="microseconds")


def test_batch_rows_are_stored_exactly_as_sqlalchemy_core_stores_them(store: SqlStore) -> None:
    record = dropped(1, started_at=T0, tags={"workflow": "w", "team": "t"}, beta_features=("b",))
    twin = dataclasses.replace(record, attempt_id="att-twin", logical_request_id="req-twin")
    store.export([record])
    with store.engine.begin() as connection:
        connection.execute(sa.insert(ATTEMPTS).values(attempt_row(twin)))
    with store.engine.connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT * FROM costwatch_attempts WHERE attempt_id IN ('att-1', 'att-twin') ORDER BY attempt_id"
        ).all()
    columns = [c.name for c in ATTEMPTS.columns]
    stored, core = (dict(zip(columns, row, strict=True)) for row in rows)
    for name in ("attempt_id", "logical_request_id"):
        del stored[name], core[name]
    assert stored == core


def test_retention_cuts_exactly_at_the_given_moment(store: SqlStore) -> None:
    store.export([attempt(n, started_at=T0 + timedelta(seconds=n)) for n in range(3)])
    assert store.prune_before(T0 + timedelta(seconds=1)) == 1
    assert store.attempt("att-0") is None and store.attempt("att-1") is not None


def test_redelivered_batch_is_stored_once(store: SqlStore) -> None:
    batch = [attempt(n) for n in range(50)]
    store.export(batch)
    first = rollup_rows(store)
    assert store.write(batch).inserted == 0
    assert store.attempt_count() == 50
    assert rollup_rows(store) == first
    assert_rollups_match_raw_rows(store)


def test_duplicate_attempts_within_one_batch_keep_the_highest_revision(store: SqlStore) -> None:
    record = dropped(1)
    store.export([record.with_waste(WasteReason.RETRIED), record])
    stored = store.attempt("att-1")
    assert stored is not None and stored.waste_reason is WasteReason.RETRIED and stored.revision == 1
    assert_rollups_match_raw_rows(store)


def test_higher_revision_replaces_row_and_moves_rollups(store: SqlStore) -> None:
    record = dropped(1)
    store.export([record])
    [abandoned] = store.rollup_totals(group_by=["waste_reason"])
    assert abandoned.group == {"waste_reason": "abandoned"} and abandoned.wasted_input_tokens == 1000

    result = store.write([record.with_waste(WasteReason.RETRIED)])

    assert result.revised == 1
    stored = store.attempt("att-1")
    assert stored is not None and stored.waste_reason is WasteReason.RETRIED and stored.revision == 1
    [retried] = store.rollup_totals(group_by=["waste_reason"])
    assert retried.group == {"waste_reason": "retried"}
    assert (retried.attempts, retried.wasted_input_tokens, retried.wasted_output_tokens) == (1, 1000, 120)
    assert_rollups_match_raw_rows(store)


def test_lower_or_equal_revision_is_ignored(store: SqlStore) -> None:
    record = dropped(1)
    store.export([record.with_waste(WasteReason.RETRIED)])
    result = store.write(
        [record, dataclasses.replace(record, revision=1, waste_reason=WasteReason.ABANDONED)]
    )
    assert result.revised == 0
    stored = store.attempt("att-1")
    assert stored is not None and stored.waste_reason is WasteReason.RETRIED
    assert_rollups_match_raw_rows(store)


def test_retry_arriving_later_turns_stored_abandoned_attempt_into_retried(store: SqlStore) -> None:
    store.export([dropped(1)])
    retry = attempt(2, logical_request_id="req-1", attempt_number=2, fingerprint="fp-1")

    assert store.write([retry]).reclassified == 1

    stored = store.attempt("att-1")
    assert stored is not None and stored.waste_reason is WasteReason.RETRIED and stored.revision == 1
    totals = {t.group["waste_reason"]: t for t in store.rollup_totals(group_by=["waste_reason"])}
    assert set(totals) == {"", "retried"}
    assert totals["retried"].wasted_cost_usd == pytest.approx(dropped(1).cost.total_usd)  # type: ignore[union-attr]
    assert_rollups_match_raw_rows(store)


def test_same_fingerprint_soon_after_counts_as_a_retry_from_another_process(store: SqlStore) -> None:
    store.export([dropped(1, fingerprint="same-request")])
    # A different worker (its own logical request id) sends the identical request a minute later.
    store.export([attempt(60, fingerprint="same-request")])
    stored = store.attempt("att-1")
    assert stored is not None and stored.waste_reason is WasteReason.RETRIED
    assert_rollups_match_raw_rows(store)


def test_abandoned_attempt_arriving_after_its_retry_is_stored_as_retried(store: SqlStore) -> None:
    store.export([attempt(2, logical_request_id="req-1", attempt_number=2)])
    store.export([dropped(1)])
    stored = store.attempt("att-1")
    assert stored is not None and stored.waste_reason is WasteReason.RETRIED
    assert_rollups_match_raw_rows(store)


@pytest.mark.parametrize("key", ["plain-0192f3a4", 'with "quotes", \\ and \t', "café 東京 \u2028"])
def test_stored_abandoned_attempts_are_found_by_keys_json_must_escape(store: SqlStore, key: str) -> None:
    """The lookup finds an abandoned attempt by its request and another by its fingerprint, whatever
    characters the keys hold (a key's JSON text is then escaped)."""
    store.export(
        [
            dropped(1, logical_request_id=key, fingerprint="fp-1"),
            dropped(2, logical_request_id="req-2", fingerprint=key),
        ]
    )
    by_request = attempt(3, logical_request_id=key, attempt_number=2, fingerprint="fp-3")
    by_fingerprint = attempt(4, fingerprint=key)

    assert store.write([by_request, by_fingerprint]).reclassified == 2

    for attempt_id in ("att-1", "att-2"):
        stored = store.attempt(attempt_id)
        assert stored is not None and stored.waste_reason is WasteReason.RETRIED, attempt_id
    assert_rollups_match_raw_rows(store)


def test_abandoned_attempt_and_its_retry_in_one_batch(store: SqlStore) -> None:
    store.export([dropped(1), attempt(2, logical_request_id="req-1", attempt_number=2)])
    stored = store.attempt("att-1")
    assert stored is not None and stored.waste_reason is WasteReason.RETRIED
    assert_rollups_match_raw_rows(store)


def test_a_batch_that_revises_stored_attempts_and_lands_their_retries_counts_each_change_once(
    store: SqlStore,
) -> None:
    """On PostgreSQL the batch's stored abandoned attempts are read before its insert; what its own
    rows and revisions change in between is accounted for exactly as a read after it would."""
    stored_abandoned = dropped(1)  # to be revised into a completed attempt, its retry beside it
    becomes_abandoned = attempt(3)  # to be revised into a dropped one, whose retry is already stored
    kept_abandoned = dropped(5)  # only a stale revision of it comes again, with its retry
    store.export([stored_abandoned, becomes_abandoned, kept_abandoned])
    store.export([attempt(4, logical_request_id="req-3", attempt_number=2)])

    result = store.write(
        [
            dataclasses.replace(stored_abandoned, revision=1, wasted=False, waste_reason=None),
            attempt(2, logical_request_id="req-1", attempt_number=2),
            dropped(3, revision=1),
            dataclasses.replace(kept_abandoned, revision=0),
            attempt(6, logical_request_id="req-5", attempt_number=2),
            dropped(7),  # new, and its retry in the same batch
            attempt(8, logical_request_id="req-7", attempt_number=2),
        ]
    )

    assert (result.inserted, result.revised, result.reclassified) == (4, 2, 3)
    reasons = {n: store.attempt(f"att-{n}") for n in (1, 3, 5, 7)}
    assert {n: (r.wasted, r.waste_reason) for n, r in reasons.items() if r is not None} == {
        1: (False, None),
        3: (True, WasteReason.RETRIED),
        5: (True, WasteReason.RETRIED),
        7: (True, WasteReason.RETRIED),
    }
    assert_rollups_match_raw_rows(store)
    assert store.rollup_totals(where={"waste_reason": "abandoned"}) == []


@pytest.mark.postgres
def test_without_pipeline_mode_a_batch_reads_ahead_one_statement_after_the_other(
    postgres_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a libpq older than 14 (no pipeline mode) the lookups are read before the insert all the
    same, one after the other, with the same result."""
    monkeypatch.setattr(store_write, "_pipelines_work", lambda: False)
    store = SqlStore(postgres_schema_url(postgres_schema))
    try:
        test_a_batch_that_revises_stored_attempts_and_lands_their_retries_counts_each_change_once(store)
    finally:
        store.shutdown()


@pytest.mark.postgres
def test_a_query_sent_to_the_driver_binds_and_reads_each_type_as_sqlalchemy_executes_it(
    postgres_schema: str,
) -> None:
    """The read-ahead sends its queries to psycopg itself (in a pipeline): each parameter and value
    goes through the dialect's processing for its type, as in ``connection.execute`` (a JSON
    parameter is serialised; a numeric read as a float is converted by the type the server reports)."""
    engine = create_store_engine(postgres_schema_url(postgres_schema))
    query = sa.select(
        sa.cast(sa.bindparam("doc", type_=sa.JSON()), sa.JSON).label("doc"),
        sa.cast(sa.bindparam("share", type_=sa.Double()), sa.Double).label("share"),
        sa.cast(sa.bindparam("cost", type_=sa.Numeric(10, 4)), sa.Numeric(10, 4, asdecimal=False)).label(
            "cost"
        ),
        sa.cast(sa.null(), sa.Double).label("missing"),
    )
    values = {"doc": {"workflow": ["a", 1]}, "share": 0.25, "cost": Decimal("1.5")}
    try:
        with engine.connect() as connection:
            expected = [dict(row) for row in connection.execute(query, values).mappings()]
            sent = store_write._DriverQuery.of(query, connection.dialect)
            with connection.connection.driver_connection.cursor() as cursor:
                sent.send(cursor, values)
                got = sent.mappings(cursor)
    finally:
        engine.dispose()
    assert got == expected == [{"doc": {"workflow": ["a", 1]}, "share": 0.25, "cost": 1.5, "missing": None}]


@pytest.mark.postgres
def test_a_batch_reads_ahead_the_rows_sqlalchemy_would_read_nulls_and_every_column_type_included(
    postgres_schema: str,
) -> None:
    """Both queries the writer reads ahead with, as it binds them, against ``connection.execute``."""
    store = SqlStore(postgres_schema_url(postgres_schema))
    window = timedelta(minutes=10)
    stored = [
        dropped(1),  # NULLs: no request id, first token, status, endpoint, prompt sizes
        dropped(6, cost=None, time_to_first_token_s=0.4, endpoint="/v1/messages", prompt_bytes=900),
        dropped(3),
        attempt(4, logical_request_id="req-3", attempt_number=2, endpoint=None),  # req-3 summarised
    ]
    batch = [
        attempt(2, logical_request_id="req-1", attempt_number=2),
        attempt(5, logical_request_id="req-3", attempt_number=3),
        attempt(7, logical_request_id="req-6", attempt_number=2),
    ]
    try:
        store.export(stored)
        with store.engine.begin() as connection:
            abandoned, summaries = store_write._read_ahead_queries(connection.dialect)
            read: dict[str, Any] = {}
            for name, query, sent, values in (
                (
                    "abandoned",
                    store_write._postgres_abandoned(),
                    abandoned,
                    store_write._abandoned_parameters(batch, window),
                ),
                (
                    "summaries",
                    stored_summaries_query("postgresql"),
                    summaries,
                    stored_summaries_parameters(["req-1", "req-3", "req-6"]),
                ),
            ):
                expected = [dict(row) for row in connection.execute(query, values).mappings()]
                with connection.connection.driver_connection.cursor() as cursor:
                    sent.send(cursor, values)
                    assert sent.mappings(cursor) == expected, name
                read[name] = expected
            ahead, _ = store_write._read_ahead(connection, batch, window, list)
    finally:
        store.shutdown()
    # What the batch's later steps are handed: records, and summaries as plain typed tuples.
    assert ahead.abandoned == [store_write.record_from_row(row) for row in read["abandoned"]]
    assert ahead.summaries == {"req-3": StoredSummary(**read["summaries"][0])}
    assert [row["attempt_id"] for row in read["abandoned"]] == ["att-1", "att-6"]
    assert [row["logical_request_id"] for row in read["summaries"]] == ["req-3"]
    nulls = {column for row in read["abandoned"] for column, value in row.items() if value is None}
    assert {"request_id", "time_to_first_token_s", "endpoint", "input_cost_usd", "prompt_bytes"} <= nulls


@pytest.mark.postgres
@pytest.mark.parametrize("pipeline", [True, False], ids=["pipeline", "one-after-the-other"])
@pytest.mark.parametrize("failing", ["abandoned", "summaries"])
def test_a_read_ahead_that_fails_names_the_query_that_failed(
    postgres_schema: str, monkeypatch: pytest.MonkeyPatch, failing: str, pipeline: bool
) -> None:
    monkeypatch.setattr(store_write, "_pipelines_work", lambda: pipeline)
    if failing == "abandoned":
        made = store_write._abandoned_parameters
        monkeypatch.setattr(
            store_write,
            "_abandoned_parameters",
            lambda *args: {**made(*args), "request_ids": "{not an array"},
        )
    else:
        monkeypatch.setattr(store_write, "stored_summaries_parameters", lambda _: {"ids": "not json"})
    store = SqlStore(postgres_schema_url(postgres_schema))
    try:
        with store.engine.connect() as connection:
            expected = store_write._read_ahead_queries(connection.dialect)[failing == "summaries"].sql
            with pytest.raises(sa.exc.DBAPIError) as raised:
                store_write._read_ahead(connection, [attempt(1)], timedelta(minutes=10), list)
    finally:
        store.shutdown()
    assert raised.value.statement == expected


def test_identical_request_long_after_is_not_a_retry(store: SqlStore) -> None:
    store.export([dropped(1, fingerprint="same-request")])
    store.export(
        [
            attempt(
                1,
                attempt_id="later",
                logical_request_id="other",
                started_at=T0 + timedelta(days=1),
                fingerprint="same-request",
            )
        ]
    )
    stored = store.attempt("att-1")
    assert stored is not None and stored.waste_reason is WasteReason.ABANDONED


def test_long_stream_that_dropped_is_retried_by_another_process_within_the_window_after_it_ended(
    store: SqlStore,
) -> None:
    # A 25-minute stream drops; a different worker resends it a minute after the drop.
    store.export([dropped(1, fingerprint="same-request", duration_s=1500.0)])
    retry_start = T0 + timedelta(seconds=1 + 1500 + 60)
    store.export(
        [
            attempt(
                1,
                attempt_id="later",
                logical_request_id="other",
                started_at=retry_start,
                fingerprint="same-request",
            )
        ]
    )
    stored = store.attempt("att-1")
    assert stored is not None and stored.waste_reason is WasteReason.RETRIED
    assert_rollups_match_raw_rows(store)


def test_abandoned_attempt_arriving_after_another_processes_resend_is_stored_as_retried(
    store: SqlStore,
) -> None:
    store.export([attempt(60, logical_request_id="other-worker", fingerprint="same-request")])
    store.export([dropped(1, fingerprint="same-request")])
    stored = store.attempt("att-1")
    assert stored is not None and stored.waste_reason is WasteReason.RETRIED
    assert_rollups_match_raw_rows(store)


@pytest.mark.parametrize(
    ("after_end", "retried"), [(timedelta(minutes=9), True), (timedelta(minutes=11), False)]
)
def test_a_long_stream_stored_after_its_resend_hours_later_is_retried_only_within_the_window(
    store: SqlStore, after_end: timedelta, retried: bool
) -> None:
    # A stream ran two and a half hours before it dropped; another worker resent it after the drop,
    # in a later hour than the stream started, and its record reached the store first.
    duration = timedelta(hours=2, minutes=30)
    resend_start = T0 + timedelta(seconds=1) + duration + after_end
    store.export(
        [
            attempt(
                1, attempt_id="resend", logical_request_id="other", started_at=resend_start, fingerprint="fp"
            )
        ]
    )
    store.export([dropped(1, fingerprint="fp", duration_s=duration.total_seconds())])
    stored = store.attempt("att-1")
    expected = WasteReason.RETRIED if retried else WasteReason.ABANDONED
    assert stored is not None and stored.waste_reason is expected
    assert_rollups_match_raw_rows(store)


def test_an_absurd_duration_neither_fails_the_batch_nor_stops_its_resend_from_counting(
    store: SqlStore,
) -> None:
    store.export([attempt(60, logical_request_id="other-worker", fingerprint="same-request")])
    store.export([dropped(1, fingerprint="same-request", duration_s=1e12)])
    stored = store.attempt("att-1")
    assert stored is not None and stored.waste_reason is WasteReason.RETRIED


@pytest.mark.postgres
@pytest.mark.parametrize("duration_s", [math.nan, math.inf, 1e13, -5.0])
def test_a_stored_duration_no_interval_can_hold_fails_no_later_batch(
    postgres_schema: str, duration_s: float
) -> None:
    store = SqlStore(postgres_schema_url(postgres_schema))
    try:
        store.export([dropped(1, fingerprint="same-request", duration_s=duration_s)])
        store.export([attempt(60, logical_request_id="other-worker", fingerprint="same-request")])
        assert store.attempt("att-60") is not None
    finally:
        store.shutdown()


def test_the_writer_finds_attempts_by_key_through_indexes_never_by_scanning_them(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every lookup of a batch (stored ids, abandoned attempts, their retries) probes an index."""
    store.export([dropped(n, fingerprint=f"fp-{n}") for n in range(1, 2001)])  # many abandoned rows
    store.export([attempt(n) for n in range(2001, 3001)])
    lookups: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if statement.lstrip().startswith("SELECT") and "costwatch_attempts" in statement:
            lookups.append((statement, params))

    # The lookups the writer sends to the driver itself (compiled once) pass no SQLAlchemy event.
    send = store_write._DriverQuery.send

    def sent(query: Any, cursor: Any, values: dict[str, Any]) -> None:
        capture(None, cursor, query.sql, query.parameters(values), None, False)
        send(query, cursor, values)

    monkeypatch.setattr(store_write._DriverQuery, "send", sent)
    sa.event.listen(store.engine, "before_cursor_execute", capture)
    try:
        # New attempts, abandoned ones among them, sharing requests and fingerprints with stored ones,
        # and stored ones delivered again (which SQLite then looks up by id).
        store.export(
            [dropped(n, fingerprint=f"fp-{n - 1500}") for n in range(3001, 3101)]
            + [attempt(n, logical_request_id=f"req-{n - 1000}") for n in range(3101, 3201)]
            + [attempt(n) for n in range(2001, 2011)]
        )
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", capture)
    assert len(lookups) >= 2  # abandoned attempts, and retries of the abandoned ones landing now
    with store.engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            for statement, params in lookups:
                plan = [
                    str(row[-1])
                    for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)
                ]
                reads = [step for step in plan if "costwatch_attempts" in step]
                assert reads and all(step.startswith("SEARCH costwatch_attempts USING") for step in reads), (
                    plan
                )
            return
        connection.exec_driver_sql("ANALYZE costwatch_attempts")  # as autovacuum would have by now
        for statement, params in lookups:
            # The abandoned attempts' lookup reads every abandoned attempt of its days through their
            # partial index, and tests them against the batch's keys (hashed): what it reads grows
            # with the abandoned attempts, not with all of them. Here most rows are abandoned, so the
            # planner would rightly read the day whole; what is checked is that the index serves it.
            abandoned_lookup = "= ANY (CAST(" in statement
            if abandoned_lookup:
                connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
            [[plan]] = connection.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, params).all()
            connection.exec_driver_sql("RESET enable_seqscan")
            # The table, or its day partitions (migration 0013) that hold rows: an empty one (a day
            # ahead) has nothing to scan, and the planner rightly reads it whole.
            reads = [
                node
                for node in _plan_nodes(plan[0]["Plan"])
                if node.get("Relation Name") == "costwatch_attempts"
                or (is_attempt_partition(node.get("Relation Name")) and _holds_rows(connection, node))
            ]
            if abandoned_lookup:
                assert reads and all(_reads_abandoned_only(connection, node) for node in reads), plan
            else:
                assert reads and all(_probes_an_index(node) for node in reads), plan


@pytest.mark.parametrize(
    "keys",
    [
        [],
        ["0192f3a4b5c6d7e8f90a1b2c3d4e5f60", "5d41402abc4b2a76b9719d911017c592"],
        ["job-42", "tenant:7/job 8", "x\x7f"],
        ['say "hi"', "back\\slash", "tab\there", "bell\x07"],
        ["café", "東京", "\ud800"],
    ],
)
def test_the_keys_a_lookup_binds_are_the_json_array_json_dumps_writes(keys: list[str]) -> None:
    """Hex ids are joined as they are; any key JSON escapes sends the list through ``json.dumps``."""
    assert _listed(keys) == json.dumps(keys)
    assert json.loads(_listed(keys)) == keys


def test_a_batch_runs_the_same_statements_whatever_its_size(store: SqlStore) -> None:
    """A batch's cost per record is its rows; its statements (and their texts) are fixed."""
    store.export([attempt(1)])  # the first batch of a process checks and compiles once
    executed: list[str] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        executed.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", capture)
    try:
        store.export([attempt(2)])
        one = list(executed)
        executed.clear()
        store.export([attempt(n) for n in range(3, 203)])
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", capture)
    assert executed == one


def test_columns_null_in_a_whole_batch_store_as_null_and_beside_values_as_given(store: SqlStore) -> None:
    """SQLite leaves a column NULL in every row of a batch out of its insert (the driver looks for an
    adapter for each NULL it binds): what is stored is the same either way."""
    store.export([attempt(1)])
    inserts: list[str] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if statement.startswith("INSERT INTO") and "costwatch_attempts " in statement:
            inserts.append(statement)

    all_null = [attempt(n) for n in (2, 3)]  # request_id, message_id, stop_reason... NULL in both
    mixed = [attempt(4, request_id="req_4", http_status=200, time_to_first_token_s=0.25), attempt(5)]
    sa.event.listen(store.engine, "before_cursor_execute", capture)
    try:
        store.export(all_null)
        store.export(mixed)
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", capture)
    for record in [*all_null, *mixed]:
        assert store.attempt(record.attempt_id) == record
    if store.engine.dialect.name == "sqlite":
        left_out, beside_values = inserts
        assert "request_id" not in left_out.replace("logical_request_id", "")
        assert "request_id" in beside_values.replace("logical_request_id", "")
        assert "message_id" not in beside_values  # NULL in both rows of that batch too


def _holds_rows(connection: sa.Connection, read: dict[str, Any]) -> bool:
    name = read["Relation Name"]
    return connection.exec_driver_sql(f'SELECT 1 FROM "{name}" LIMIT 1').first() is not None


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _plan_nodes(child)


def _reads_abandoned_only(connection: sa.Connection, read: dict[str, Any]) -> bool:
    """A PostgreSQL read of a table through an index of its abandoned attempts only (a partial index)."""
    if read["Node Type"] in ("Index Scan", "Index Only Scan"):
        names = [read["Index Name"]]
    elif read["Node Type"] == "Bitmap Heap Scan":
        names = [node["Index Name"] for node in _plan_nodes(read) if node["Node Type"] == "Bitmap Index Scan"]
    else:
        return False
    predicates = [
        connection.exec_driver_sql(
            "SELECT pg_get_expr(indpred, indrelid) FROM pg_index WHERE indexrelid = to_regclass(%(name)s)",
            {"name": name},
        ).scalar()
        for name in names
    ]
    return bool(predicates) and all(p is not None and "'abandoned'" in p for p in predicates)


def _probes_an_index(read: dict[str, Any]) -> bool:
    """A PostgreSQL read of a table that looks keys up in an index, not one that reads a whole index."""
    if read["Node Type"] in ("Index Scan", "Index Only Scan"):
        return "Index Cond" in read
    if read["Node Type"] == "Bitmap Heap Scan":
        return any(
            node["Node Type"] == "Bitmap Index Scan" and "Index Cond" in node for node in _plan_nodes(read)
        )
    return False


def test_later_attempt_of_the_same_request_long_after_the_window_is_not_its_retry(store: SqlStore) -> None:
    store.export([dropped(1)])
    store.export([attempt(1, attempt_id="att-next-day", attempt_number=2, started_at=T0 + timedelta(days=1))])
    stored = store.attempt("att-1")
    assert stored is not None and stored.waste_reason is WasteReason.ABANDONED
    assert_rollups_match_raw_rows(store)


def test_store_retry_window_defaults_to_the_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COSTWATCH_RETRY_WINDOW", "42")
    assert SqlStore(f"sqlite:///{tmp_path / 'w.db'}").retry_window == timedelta(seconds=42)


def test_earlier_attempt_of_the_same_request_is_not_its_retry(store: SqlStore) -> None:
    store.export([dropped(2, logical_request_id="req-1", attempt_number=2)])
    store.export([attempt(1, attempt_number=1)])
    stored = store.attempt("att-2")
    assert stored is not None and stored.waste_reason is WasteReason.ABANDONED


def test_prune_before_deletes_raw_rows_but_keeps_rollups(store: SqlStore) -> None:
    store.export([attempt(n, started_at=T0 + timedelta(hours=n)) for n in range(4)])
    before = store.rollup_totals()

    assert store.prune_before(T0 + timedelta(hours=2)) == 2

    assert store.attempt_count() == 2
    assert store.attempt("att-0") is None and store.attempt("att-3") is not None
    assert store.rollup_totals() == before


def test_rollup_totals_group_and_filter_over_an_hour_range(store: SqlStore) -> None:
    store.export(
        [
            attempt(1),
            attempt(2, tags={"workflow": "classify"}),
            dropped(3),
            attempt(4, started_at=T0 + timedelta(hours=1)),
            attempt(5, started_at=T0 + timedelta(hours=2), model="claude-haiku-4-5"),
        ]
    )
    hour = T0.replace(minute=0)
    by_workflow = store.rollup_totals(hour, hour + timedelta(hours=1), group_by=["workflow"])
    assert [(t.group["workflow"], t.attempts) for t in by_workflow] == [("classify", 1), ("summarise", 2)]

    [dropped_only] = store.rollup_totals(where={"outcome": "dropped"})
    assert dropped_only.attempts == 1 and dropped_only.wasted_tokens == 1120

    by_hour = store.rollup_totals(group_by=["hour"], where={"model": ["claude-sonnet-4-5-20250929"]})
    assert [(t.group["hour"], t.attempts) for t in by_hour] == [(hour, 3), (hour + timedelta(hours=1), 1)]

    [everything] = store.rollup_totals()
    assert everything.attempts == 5 and everything.logical_requests_started == 5
    assert everything.billed_tokens == 4 * 1550 + 1120
    assert everything.duration_s == pytest.approx(12.5)

    with pytest.raises(ValueError, match="unknown rollup dimension"):
        store.rollup_totals(group_by=["prompt"])


def test_mixed_workload_keeps_rollups_equal_to_raw_row_sums(store: SqlStore) -> None:
    records: list[AttemptRecord] = []
    for n in range(300):
        if n % 5 == 0:
            records.append(dropped(n, logical_request_id=f"req-{n}"))
        elif n % 5 == 1:
            records.append(attempt(n, logical_request_id=f"req-{n - 1}", attempt_number=2))
        elif n % 7 == 0:
            records.append(attempt(n, cost=None, tags={}))
        else:
            records.append(attempt(n, started_at=T0 + timedelta(minutes=n)))
    for start in range(0, len(records), 64):
        store.export(records[start : start + 64])
    assert store.attempt_count() == 300
    assert_rollups_match_raw_rows(store)
    [retried] = store.rollup_totals(where={"waste_reason": "retried"})
    assert retried.attempts == 60
    assert store.rollup_totals(where={"waste_reason": "abandoned"}) == []


@pytest.mark.parametrize("kind", ["request", "fingerprint"])
def test_advisory_lock_keys_are_those_every_earlier_writer_takes(kind: str) -> None:
    """Writers of different versions sharing a PostgreSQL store serialise on the same keys: each is the
    first 8 bytes of blake2b over ``costwatch:<kind>:<value>``, however it is computed."""
    values = ["req-1", "0192f4c2a7b1", "ünïcode", "", "x" * 500, 'quote" and \\ backslash']

    def whole(value: str) -> int:
        digest = hashlib.blake2b(f"costwatch:{kind}:{value}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=True)

    assert _lock_keys(kind, values) == {whole(value) for value in values}
    assert _lock_keys(kind, values) != _lock_keys("fingerprint" if kind == "request" else "request", values)
