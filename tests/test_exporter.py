"""The fleet exporter: a store's rollups as costwatch's metrics, monotonic across flips and restarts."""

from __future__ import annotations

import dataclasses
import functools
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

import pytest
from conftest import sample_value as value
from conftest import wasted_tokens
from prometheus_client import CollectorRegistry, generate_latest

from costwatch.exporter import FleetCollector, serve, settled_before
from costwatch.metrics import OTHER
from costwatch.records import AttemptRecord, Cost, Outcome, Usage, WasteReason
from costwatch.store import SqlStore
from costwatch.store import sink as sql_store_sink


@pytest.fixture
def store_url(new_store_url: str) -> str:
    """A store at the newest revision already (conftest's ``new_store_url``): these tests are of what
    a store does, not of how it is created."""
    return new_store_url


MODEL = "claude-sonnet-4-6"
NOW = datetime(2025, 3, 1, 12, 30, tzinfo=timezone.utc)
WINDOW = timedelta(hours=1)
OLD = NOW - timedelta(hours=5)  # settled
RECENT = NOW - timedelta(minutes=10)  # not settled


def record(
    attempt_id: str,
    started_at: datetime,
    *,
    request: str | None = None,
    number: int = 1,
    outcome: Outcome = Outcome.COMPLETED,
    waste: WasteReason | None = None,
    workflow: str = "nightly",
    model: str = MODEL,
    fingerprint: str | None = None,
) -> AttemptRecord:
    failed = outcome is not Outcome.COMPLETED
    return AttemptRecord(
        attempt_id=attempt_id,
        logical_request_id=request or attempt_id,
        attempt_number=number,
        started_at=started_at,
        outcome=outcome,
        model_requested=model,
        model=model,
        error_type="RemoteProtocolError" if failed else None,
        duration_s=30.0 if failed else 10.0,
        usage=Usage(
            input_tokens=1000,
            output_tokens=20 if failed else 200,
            output_estimated=failed,
            estimated_output_tokens=20 if failed else 0,
        ),
        cost=Cost(input_usd=3.0, output_usd=0.3 if failed else 3.0),
        wasted=waste is not None,
        waste_reason=waste,
        tags=MappingProxyType({"workflow": workflow}),
        fingerprint=fingerprint or uuid.uuid4().hex,
    )


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    sql_store = SqlStore(store_url, retry_window=WINDOW)
    yield sql_store
    sql_store.shutdown()


def exporter(store_url: str, now: datetime = NOW, **kw: Any) -> tuple[FleetCollector, CollectorRegistry]:
    registry = CollectorRegistry()
    collector = FleetCollector(
        store_url, retry_window=WINDOW, workflow_label_limit=20, clock=lambda: now, **kw
    )
    registry.register(collector)
    return collector, registry


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


wasted = functools.partial(wasted_tokens, model=MODEL, workflow="nightly")


def test_settled_hours_are_those_that_ended_a_retry_window_ago():
    assert settled_before(datetime(2025, 3, 1, 12, 30, tzinfo=timezone.utc), timedelta(hours=1)) == datetime(
        2025, 3, 1, 11, tzinfo=timezone.utc
    )


def test_exporter_exposes_billed_totals_and_only_settled_abandoned_waste(store, store_url):
    store.write(
        [
            record("old-ok", OLD),
            record("old-drop", OLD, outcome=Outcome.DROPPED, waste=WasteReason.ABANDONED),
            record("new-drop", RECENT, outcome=Outcome.DROPPED, waste=WasteReason.ABANDONED),
            record("r-drop", OLD, request="r", outcome=Outcome.DROPPED, waste=WasteReason.RETRIED),
            record("r-ok", OLD, request="r", number=2),
        ]
    )
    _, registry = exporter(store_url)

    assert value(registry, "costwatch_up") == 1
    assert value(registry, "costwatch_attempts_total", model=MODEL, outcome="completed", error_type="") == 2
    assert (
        value(
            registry,
            "costwatch_attempts_total",
            model=MODEL,
            outcome="dropped",
            error_type="RemoteProtocolError",
        )
        == 3
    )
    assert value(registry, "costwatch_billed_tokens_total", model=MODEL, token_type="input") == 5000
    assert value(registry, "costwatch_billed_tokens_total", model=MODEL, token_type="output") == 460
    assert value(registry, "costwatch_estimated_output_tokens_total", model=MODEL) == 60
    assert value(
        registry, "costwatch_billed_cost_usd_total", model=MODEL, workflow="nightly"
    ) == pytest.approx(2 * 6.0 + 3 * 3.3)
    assert wasted(registry, "retried") == 1000
    assert wasted(registry, "abandoned") == 1000  # the recent drop may still be retried
    assert value(
        registry, "costwatch_wasted_cost_usd_total", model=MODEL, reason="abandoned", workflow="nightly"
    ) == pytest.approx(3.3)
    assert value(registry, "costwatch_logical_requests_total", model=MODEL, result="succeeded") == 2
    assert value(registry, "costwatch_logical_requests_total", model=MODEL, result="failed") == 1
    assert value(registry, "costwatch_time_to_drop_seconds_count", model=MODEL) == 3
    assert value(registry, "costwatch_time_to_drop_seconds_sum", model=MODEL) == 90
    assert (
        value(
            registry, "costwatch_attempt_duration_seconds_bucket", model=MODEL, outcome="completed", le="+Inf"
        )
        == 2
    )


def test_cancelled_waste_is_final_when_written_and_exposed_apart_from_abandoned(store, store_url):
    store.write([record("c-stop", RECENT, outcome=Outcome.CANCELLED, waste=WasteReason.CANCELLED)])
    _, registry = exporter(store_url)
    assert wasted(registry, "cancelled") == 1000  # from the recent hours too: no retry can flip it
    assert wasted(registry, "abandoned") == 0 and wasted(registry, "retried") == 0


def test_two_exporters_over_one_database_agree(store, store_url):
    store.write(
        [record(f"a{i}", OLD + timedelta(minutes=i)) for i in range(5)]
        + [record("d", RECENT, outcome=Outcome.DROPPED, waste=WasteReason.ABANDONED)]
    )
    first, second = exporter(store_url)[1], exporter(store_url)[1]
    assert samples(first) == samples(second)
    assert value(first, "costwatch_attempts_total", model=MODEL, outcome="completed", error_type="") == 5


def test_counters_never_go_down_across_waste_flips_and_restarts(store, store_url):
    store.write([record("d1", RECENT, request="job", outcome=Outcome.DROPPED, waste=WasteReason.ABANDONED)])
    _, before_registry = exporter(store_url)
    before = samples(before_registry)

    # The retry lands: the store flips d1 to retried. Later the hour settles and the exporter restarts.
    store.write([record("d2", RECENT + timedelta(minutes=1), request="job", number=2)])
    flipped = store.attempt("d1")
    assert flipped is not None and flipped.waste_reason is WasteReason.RETRIED
    _, flipped_registry = exporter(store_url)
    _, restarted_registry = exporter(store_url, now=NOW + timedelta(hours=3))
    for later in (samples(flipped_registry), samples(restarted_registry)):
        for key, old in before.items():
            if key[0].endswith(("_total", "_count", "_sum", "_bucket")):
                assert later.get(key, 0.0) >= old, key
    assert wasted(restarted_registry, "retried") == 1000
    assert wasted(restarted_registry, "abandoned") == 0


def test_labels_are_capped_in_first_seen_order(store, store_url):
    store.write([record(f"m{i}", OLD + timedelta(hours=i), model=f"model-{i}") for i in range(4)])
    _, registry = exporter(store_url, model_label_limit=2)
    assert value(registry, "costwatch_billed_tokens_total", model="model-1", token_type="input") == 1000
    assert value(registry, "costwatch_billed_tokens_total", model=OTHER, token_type="input") == 2000


def test_a_full_set_of_kept_labels_stays_when_a_late_record_brings_an_earlier_model(store, store_url):
    store.write([record(f"m{i}", OLD + timedelta(hours=i), model=f"model-{i}") for i in range(3)])
    collector, registry = exporter(store_url, model_label_limit=2)
    assert value(registry, "costwatch_billed_tokens_total", model="model-1", token_type="input") == 1000
    # A record replayed late from a spool, for an hour before every kept model's first one: the
    # kept set is full, so it is not read again; the newcomer is `other` and no named series moves.
    store.write([record("late", OLD - timedelta(hours=3), model="model-early")])
    for _ in range(2):
        assert value(registry, "costwatch_billed_tokens_total", model="model-1", token_type="input") == 1000
        assert value(registry, "costwatch_billed_tokens_total", model=OTHER, token_type="input") == 2000
        assert (
            registry.get_sample_value(
                "costwatch_billed_tokens_total", {"model": "model-early", "token_type": "input"}
            )
            is None
        )
    assert collector.reads >= 3


def test_a_broken_database_gives_up_0_and_keeps_the_last_good_values(store, store_url, tmp_path):
    store.write([record("a", OLD)])
    collector, registry = exporter(store_url)
    assert value(registry, "costwatch_billed_tokens_total", model=MODEL, token_type="input") == 1000

    collector.store = SqlStore("postgresql+psycopg://postgres@127.0.0.1:1/nothing", auto_migrate=False)
    assert value(registry, "costwatch_up") == 0
    assert value(registry, "costwatch_billed_tokens_total", model=MODEL, token_type="input") == 1000


def test_serve_answers_a_scrape_of_a_missing_database_with_up_0(tmp_path):
    server = serve(f"sqlite:///{tmp_path / 'nothing-here.db'}", 0, block=False)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
            status, text = response.status, response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200
    assert "costwatch_up 0.0" in text


def test_closing_the_collector_releases_its_database_connections(store, store_url):
    store.write([record("a", OLD)])
    collector, registry = exporter(store_url)
    assert value(registry, "costwatch_up") == 1
    engine = collector.store.engine
    assert engine.pool.checkedin() >= 1
    collector.close()
    assert engine.pool.checkedin() == 0


def test_closing_the_served_exporter_closes_its_collector(tmp_path):
    url = f"sqlite:///{tmp_path / 'served.db'}"
    SqlStore(url).write([record("a", OLD)])
    server = serve(url, 0, block=False)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
            assert "costwatch_up 1.0" in response.read().decode()
        wanted = SqlStore(url).url
        [served] = [s for s in list(sql_store_sink._live_stores) if s.url == wanted and s._engine is not None]
    finally:
        server.shutdown()
        server.server_close()
    assert served._engine is None


def test_exporter_defaults_come_from_the_settings(monkeypatch):
    monkeypatch.setenv("COSTWATCH_RETRY_WINDOW", "42")
    monkeypatch.setenv("COSTWATCH_MODEL_LABEL_LIMIT", "3")
    collector = FleetCollector("sqlite://")
    assert collector.retry_window == timedelta(seconds=42) and collector.model_label_limit == 3
    assert collector.store.retry_window == timedelta(seconds=42)


def test_rollups_of_settled_hours_still_change_late_records_revisions_and_retries_land_there(store):
    # What the exporter may not assume: "settled" only means the store no longer flips by itself.
    settled = settled_before(NOW, WINDOW)
    before = store.rollup_totals(end=settled, group_by=("waste_reason",))
    store.write([record("late", OLD)])  # replayed from a spool hours later
    late_drop = record("late-drop", OLD, request="job", outcome=Outcome.DROPPED, waste=WasteReason.ABANDONED)
    store.write([late_drop])
    store.write([late_drop.with_waste(WasteReason.RETRIED)])  # a revision from its own process
    after = store.rollup_totals(end=settled, group_by=("waste_reason",))
    assert sum(row.attempts for row in after) == sum(row.attempts for row in before) + 2
    assert {row.group["waste_reason"]: row.attempts for row in after} == {"": 1, "retried": 1}


def test_a_scrape_reads_what_a_new_exporter_reads_after_writes_to_settled_and_recent_hours(store, store_url):
    store.write(
        [
            record("old-ok", OLD),
            record("old-drop", OLD, request="a", outcome=Outcome.DROPPED, waste=WasteReason.ABANDONED),
            record("new-drop", RECENT, request="b", outcome=Outcome.DROPPED, waste=WasteReason.ABANDONED),
        ]
    )
    _, registry = exporter(store_url, model_label_limit=3)
    samples(registry)  # the first scrape of this process

    other_process = SqlStore(store_url, retry_window=WINDOW)
    try:
        other_process.write(
            [
                record("late-ok", OLD - timedelta(hours=2), workflow="batch"),  # a late record, settled hour
                record("late-model", OLD, model="claude-opus-4-6"),  # a new label value, settled hour
                record("a-retry", OLD + timedelta(minutes=1), request="a", number=2),  # flips old-drop
                record("new", RECENT, model="claude-haiku-4-5"),
                record("b-retry", RECENT + timedelta(minutes=1), request="b", number=2),  # flips new-drop
            ]
        )
    finally:
        other_process.shutdown()
    late_drop = record("late-drop", OLD, outcome=Outcome.DROPPED, waste=WasteReason.ABANDONED)
    store.write([late_drop])
    store.write([late_drop.with_waste(WasteReason.RETRIED)])

    scraped, fresh = samples(registry), samples(exporter(store_url, model_label_limit=3)[1])
    # What a new exporter shows, this scrape shows with the same values; beyond that only the series it
    # holds at their high mark since old-drop flipped: its abandoned waste and its logical request's failure.
    assert fresh.keys() <= scraped.keys()
    assert all(scraped[key] == pytest.approx(number, rel=1e-12) for key, number in fresh.items())
    held = {
        dict(labels).get("reason") or dict(labels).get("result")
        for _, labels in scraped.keys() - fresh.keys()
    }
    assert held == {"abandoned", "failed"}
    assert wasted(registry, "abandoned") == 1000  # held at its high mark: old-drop flipped after settling
    assert wasted(registry, "retried") == 3000


def test_a_scrape_that_only_sees_counters_rise_shows_what_a_new_exporter_shows(store, store_url):
    store.write([record("old", OLD), record("recent", RECENT)])
    _, registry = exporter(store_url)
    samples(registry)
    store.write(
        [
            record("late", OLD - timedelta(hours=3), workflow="batch"),
            record("late-drop", OLD, outcome=Outcome.DROPPED, waste=WasteReason.ABANDONED),
            record("more", RECENT + timedelta(minutes=2), model="claude-opus-4-6"),
        ]
    )
    _, fresh_registry = exporter(store_url)
    warm, cold = samples(registry), samples(fresh_registry)
    assert warm.keys() == cold.keys()
    assert warm == pytest.approx(cold, rel=1e-12)


# -- the cost of a scrape is bounded by its output ------------------------------------------------
def test_many_models_and_workflows_come_back_from_the_database_as_one_row_per_kept_label(store, store_url):
    from costwatch.store.query import capped_all_time_with_recent_query

    records = [
        record(
            f"many-{n}", NOW - timedelta(hours=3), model=f"claude-{n % 40:02}", workflow=f"wf-{n // 40:02}"
        )
        for n in range(400)
    ]
    store.write(records)
    query = capped_all_time_with_recent_query(
        settled_before(NOW, WINDOW), caps={"model": 5, "workflow": 4}, other=OTHER, measures=("attempts",)
    )
    with store.engine.connect() as connection:
        rows = connection.execute(query).all()
    assert len(rows) <= (5 + 1) * (4 + 1)
    assert sum(row.attempts for row in rows if not row.recent) == 400
    assert {row.model for row in rows} == {f"claude-{n:02}" for n in range(5)} | {OTHER}  # same hour: by name
    assert {row.workflow for row in rows} == {f"wf-{n:02}" for n in range(4)} | {OTHER}
    fleet = FleetCollector(
        store_url, retry_window=WINDOW, clock=lambda: NOW, model_label_limit=5, workflow_label_limit=4
    )
    registry = CollectorRegistry()
    registry.register(fleet)
    try:
        found = samples(registry)
        assert sum(v for (name, _), v in found.items() if name == "costwatch_attempts_total") == 400
    finally:
        fleet.close()


def test_concurrent_scrapes_share_one_read_of_the_store(store, store_url):
    store.write([record("a1", NOW - timedelta(hours=3))])
    fleet = FleetCollector(store_url, retry_window=WINDOW, clock=lambda: NOW)
    registry = CollectorRegistry()
    registry.register(fleet)
    reading, release = threading.Event(), threading.Event()
    read = fleet._read_families

    def held_read():  # type: ignore[no-untyped-def]
        reading.set()
        release.wait(10)
        return read()

    fleet._read_families = held_read  # type: ignore[method-assign]
    outputs: list[bytes] = []
    leader = threading.Thread(target=lambda: outputs.append(generate_latest(registry)))
    leader.start()
    assert reading.wait(10)
    followers = [
        threading.Thread(target=lambda: outputs.append(generate_latest(registry))) for _ in range(20)
    ]
    for thread in followers:
        thread.start()
    time.sleep(0.2)  # the followers find the read under way and wait for it
    release.set()
    for thread in [leader, *followers]:
        thread.join(10)
    fleet.close()
    assert fleet.reads == 1 and len(outputs) == 21 and len(set(outputs)) == 1
    assert b"costwatch_up 1.0" in outputs[0]


def test_a_scrape_within_the_cache_time_answers_with_the_last_read(store, store_url):
    store.write([record("c1", NOW - timedelta(hours=3))])
    cached = FleetCollector(store_url, retry_window=WINDOW, clock=lambda: NOW, cache_s=60.0)
    fresh = FleetCollector(store_url, retry_window=WINDOW, clock=lambda: NOW)
    try:
        first = {m.name: m for m in cached.collect()}["costwatch_attempts"].samples
        store.write([record("c2", NOW - timedelta(hours=3))])
        again = {m.name: m for m in cached.collect()}["costwatch_attempts"].samples
        now = {m.name: m for m in fresh.collect()}["costwatch_attempts"].samples
    finally:
        cached.close()
        fresh.close()
    assert again == first and cached.reads == 1
    assert sum(s.value for s in now) == sum(s.value for s in first) + 1


def test_serve_reads_nothing_for_a_scraper_that_has_gone():
    from costwatch.exporter import _client_gone, _metrics_app

    class Counting:
        reads = 0

        def collect(self):  # type: ignore[no-untyped-def]
            Counting.reads += 1
            return iter(())

    registry = CollectorRegistry()
    registry.register(Counting())
    app = _metrics_app(registry)
    statuses: list[str] = []
    served, client = socket.socketpair()
    with served, client:
        assert not _client_gone(served)
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/metrics",
            "QUERY_STRING": "",
            "costwatch.connection": served,
        }
        app(environ, lambda status, headers: statuses.append(status))
        assert Counting.reads == 1
        client.close()
        assert _client_gone(served)
        app(environ, lambda status, headers: statuses.append(status))
    assert Counting.reads == 1 and statuses[-1].startswith("503")


def test_served_answers_are_rendered_once_and_a_stale_one_is_served_while_the_next_renders():
    from costwatch.exporter import _ScrapeAnswers

    renders: list[int] = []
    rendering = threading.Event()
    release = threading.Event()

    def exposition(environ, start_response):  # type: ignore[no-untyped-def]
        if renders:  # every render after the first is held until released
            rendering.set()
            release.wait(10)
        renders.append(1)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"render {len(renders)}".encode()]

    answers = _ScrapeAnswers(exposition, fresh_s=0.05)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""}

    def scrape() -> bytes:
        return b"".join(answers(dict(environ), lambda status, headers: None))

    assert scrape() == scrape() == b"render 1" and len(renders) == 1  # fresh: rendered once
    time.sleep(0.1)
    assert scrape() == b"render 1"  # stale: served at once, the next one renders meanwhile
    assert rendering.wait(10)
    assert scrape() == b"render 1" and len(renders) == 1  # still rendering: no second render starts
    release.set()
    assert _eventually(lambda: scrape() == b"render 2")
    assert len(renders) == 2


def _eventually(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_exporter_counts_the_records_every_process_had_refused(store, store_url):
    _, registry = exporter(store_url)
    assert value(registry, "costwatch_store_rejected_records_total") == 0
    other_process = SqlStore(store_url, retry_window=WINDOW)
    try:
        for writer, prefix in ((store, "a"), (other_process, "b")):
            refused = dataclasses.replace(record(f"{prefix}-huge", OLD), usage=Usage(input_tokens=10**20))
            writer.write([record(f"{prefix}-ok", OLD), refused])
    finally:
        other_process.shutdown()
    assert store.rejected_records == 1
    assert value(registry, "costwatch_store_rejected_records_total") == 2
    assert value(registry, "costwatch_attempts_total", model=MODEL, outcome="completed", error_type="") == 2


def _scraped(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return str(response.read().decode())


def _render_processes() -> list[Any]:
    import multiprocessing

    return [p for p in multiprocessing.active_children() if p.name == "costwatch-exporter-render"]


def _input_tokens(text: str) -> float | None:
    prefix = f'costwatch_billed_tokens_total{{model="{MODEL}",token_type="input"}} '
    found = [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]
    return float(found[0]) if found else None


@dataclasses.dataclass
class RenderedApart:
    """A store of one attempt ("a", 1,000 input tokens), served with answers rendered in a worker."""

    writer: SqlStore
    port: int
    worker: Any

    def input_tokens(self) -> float | None:
        return _input_tokens(_scraped(self.port))


@pytest.fixture
def rendered_apart(tmp_path) -> Iterator[RenderedApart]:
    url = f"sqlite:///{tmp_path / 'served.db'}"
    writer = SqlStore(url)
    writer.write([record("a", OLD)])
    server = serve(url, 0, block=False, render_process=True)
    try:
        [worker] = _render_processes()
        assert server.get_app().renderer.wait_ready(60)  # until then, answers are rendered in process
        yield RenderedApart(writer, server.server_port, worker)
    finally:
        writer.shutdown()
        server.shutdown()
        server.server_close()


def test_answers_rendered_in_a_process_of_their_own_follow_the_store(rendered_apart):
    assert rendered_apart.input_tokens() == 1000
    rendered_apart.writer.write([record("b", OLD)])
    # Rendered anew by the worker once the kept answer is older than SCRAPE_CACHE_S.
    assert _eventually(lambda: rendered_apart.input_tokens() == 2000, timeout=60)
    assert rendered_apart.worker.is_alive()


def test_the_first_answers_do_not_wait_for_the_render_process_and_it_ends_with_the_server(tmp_path):
    server = serve(f"sqlite:///{tmp_path / 'served.db'}", 0, block=False, render_process=True)
    try:
        [worker] = _render_processes()
        assert "costwatch_up" in _scraped(server.server_port)  # rendered here if the worker is not ready
        assert server.get_app().renderer.wait_ready(60)
    finally:
        server.shutdown()
        server.server_close()
    assert not worker.is_alive() and _render_processes() == []


def test_the_render_process_logs_through_the_serving_process(tmp_path, caplog):
    server = serve(f"sqlite:///{tmp_path / 'nothing-here.db'}", 0, block=False, render_process=True)
    try:
        assert server.get_app().renderer.wait_ready(60)
        with caplog.at_level("WARNING", logger="costwatch"):
            assert "costwatch_up 0.0" in _scraped(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
    assert [r.getMessage() for r in caplog.records if "reporting costwatch_up 0" in r.getMessage()]


def test_when_the_render_process_dies_the_serving_process_renders_and_keeps_answering(rendered_apart, caplog):
    assert rendered_apart.input_tokens() == 1000
    rendered_apart.worker.kill()
    rendered_apart.worker.join(10)
    rendered_apart.writer.write([record("b", OLD)])
    with caplog.at_level("WARNING", logger="costwatch"):
        assert _eventually(lambda: rendered_apart.input_tokens() == 2000, timeout=60)
    assert any("the render process ended" in r.getMessage() for r in caplog.records)
