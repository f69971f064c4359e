"""Faults in costwatch's own path: the application's streams keep working and the problem is visible.

A database that is down, a spool that cannot be written, a metrics port that is taken, a bug inside a
hook: in each case the application gets its answer exactly as without costwatch, the health
counters say what went wrong, and costwatch logs it once, not once per attempt.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest
import sqlalchemy as sa
from conftest import completed_attempt
from prometheus_client import CollectorRegistry

import costwatch
from costwatch.health import InstrumentationErrors
from costwatch.metrics import MetricsSink, start_metrics_server
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.sinks import MemorySink
from costwatch.spool import Spool
from costwatch.store import SqlStore
from costwatch.store.sink import store_name
from costwatch.testing import FakeAnthropicServer, ResponseSpec

MODEL = "claude-haiku-4-5"
MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Plan the migration."}]
CALLS = 3


def closed_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


def costwatch_lines(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("costwatch") and r.levelno >= level]


def stream_texts(server: FakeAnthropicServer, calls: int = CALLS) -> list[str]:
    """What the application gets: the text of each streamed answer."""
    client = anthropic.Anthropic(base_url=server.base_url, api_key="sk-ant-own", max_retries=0)
    texts = []
    for _ in range(calls):
        with client.messages.stream(model=MODEL, max_tokens=512, messages=MESSAGES) as stream:
            texts.append("".join(stream.text_stream))
    client.close()
    return texts


@pytest.fixture
def fast_pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"), interval_s=0.05, retry_initial_s=30.0)
    yield pipeline
    pipeline.shutdown(timeout=5)


@pytest.fixture
def bare_texts() -> list[str]:
    with FakeAnthropicServer(ResponseSpec.small(40)) as server:
        return stream_texts(server)


def unwritable(tmp_path: Path) -> Path:
    """A path nothing can be created under (its parent is a file), even for root."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    return blocker / "inside"


@pytest.mark.parametrize("store", ["postgresql_closed_port", "sqlite_directory_gone_after_instrument"])
def test_a_store_that_is_down_leaves_streams_working_and_spools_every_record(
    store: str,
    fast_pipeline: Pipeline,
    bare_texts: list[str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = (
        f"postgresql://costwatch:pw@127.0.0.1:{closed_port()}/costwatch?connect_timeout=2"
        if store == "postgresql_closed_port"
        else f"sqlite:///{tmp_path / 'store' / 'costwatch.db'}"
    )
    (tmp_path / "store").mkdir()  # a missing directory is refused at instrument(); this one goes later
    caplog.set_level(logging.DEBUG, logger="costwatch")
    costwatch.instrument(pipeline=fast_pipeline, database_url=url, metrics=False, listeners=[])
    shutil.rmtree(tmp_path / "store")  # instrument() created and migrated the database in it
    (tmp_path / "store").write_text("")  # nothing can be created under a file, even by root
    try:
        with FakeAnthropicServer(ResponseSpec.small(40)) as server:
            texts = stream_texts(server)
        assert costwatch.flush(20)
    finally:
        costwatch.uninstrument()
    assert texts == bare_texts
    health = fast_pipeline.health()
    assert health.write_errors >= 1 and health.dropped == 0
    assert health.spooled_pending == CALLS
    (line,) = costwatch_lines(caplog)
    assert f"sink {store_name(url)} failed" in line and "spooling" in line


def test_a_sqlite_directory_replaced_after_a_write_spools_the_next_records_not_writing_to_the_old_file(
    fast_pipeline: Pipeline, bare_texts: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The store keeps its connection open between writes (from instrument() on): one still open on
    # the removed file would take the records and lose them with it.
    url = f"sqlite:///{tmp_path / 'store' / 'costwatch.db'}"
    (tmp_path / "store").mkdir()
    caplog.set_level(logging.DEBUG, logger="costwatch")
    costwatch.instrument(pipeline=fast_pipeline, database_url=url, metrics=False, listeners=[])
    try:
        with FakeAnthropicServer(ResponseSpec.small(40)) as server:
            stream_texts(server, calls=1)
            assert costwatch.flush(20)
            assert fast_pipeline.health().write_errors == 0  # written to the store
            shutil.rmtree(tmp_path / "store")
            (tmp_path / "store").write_text("")
            texts = stream_texts(server)
        assert costwatch.flush(20)
    finally:
        costwatch.uninstrument()
    assert texts == bare_texts
    health = fast_pipeline.health()
    assert health.write_errors >= 1 and health.dropped == 0
    assert health.spooled_pending == CALLS
    (line,) = costwatch_lines(caplog)
    assert f"sink {store_name(url)} failed" in line and "spooling" in line


def test_a_sqlite_directory_restored_empty_after_an_outage_is_migrated_and_gets_every_record(
    tmp_path: Path,
) -> None:
    # The store migrates what its path names once the file there changed, as at its first use: a
    # restored directory takes the records again without a restart, the spooled ones replayed.
    folder = tmp_path / "store"
    folder.mkdir()
    url = f"sqlite:///{folder / 'costwatch.db'}"
    pipeline = Pipeline(
        spool=Spool(tmp_path / "spool"), interval_s=0.05, retry_initial_s=0.05, retry_max_s=0.2
    )
    pipeline.add_sink(SqlStore(url))
    try:
        pipeline.submit(completed_attempt(0))
        assert pipeline.flush(20) and pipeline.health().write_errors == 0
        shutil.rmtree(folder)
        folder.write_text("")  # the directory is gone: nothing can be written
        pipeline.submit(completed_attempt(1))
        assert pipeline.flush(20) and pipeline.health().spooled_pending == 1
        folder.unlink()
        folder.mkdir()  # back, empty
        pipeline.submit(completed_attempt(2))
        assert pipeline.flush(20)
        deadline = time.monotonic() + 20
        while pipeline.health().spooled_pending and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pipeline.health().spooled_pending == 0
    finally:
        pipeline.shutdown(timeout=10)
    store = SqlStore(url)
    try:
        assert [store.attempt(f"att-{n}") is not None for n in range(3)] == [False, True, True]
    finally:
        store.shutdown()


def test_a_sqlite_file_replaced_while_the_store_prepares_is_noticed_at_the_first_write(
    tmp_path: Path,
) -> None:
    # prepare() leaves its connection in the pool for the first write: the file that connection has
    # open is the one the store checks the path against, never a file put there after it connected.
    folder = tmp_path / "store"
    folder.mkdir()
    url = f"sqlite:///{folder / 'costwatch.db'}"
    store = SqlStore(url)
    replaced: list[Path] = []

    def replace_the_directory(*_: object) -> None:
        if not replaced:
            replaced.append(folder.rename(tmp_path / "moved"))
            folder.mkdir()

    try:
        engine = store.engine  # created and migrated
        sa.event.listen(engine, "checkout", replace_the_directory)
        store.prepare()  # its connection checked out: the directory is replaced under it
        store.write([completed_attempt(0)])
    finally:
        store.shutdown()
    assert replaced
    for where, expected in ((folder, 1), (tmp_path / "moved", 0)):
        reader = SqlStore(f"sqlite:///{where / 'costwatch.db'}")
        try:
            assert reader.attempt_count() == expected, where
        finally:
            reader.shutdown()


def test_a_spool_that_cannot_be_written_counts_dropped_records_and_says_so_once(
    tmp_path: Path, bare_texts: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    class DownSink:
        name = "down"

        def export(self, records: object) -> None:
            raise ConnectionError("database is down")

        def shutdown(self) -> None:
            return None

    pipeline = Pipeline(spool=Spool(unwritable(tmp_path)), interval_s=0.05, retry_initial_s=30.0)
    caplog.set_level(logging.DEBUG, logger="costwatch")
    costwatch.instrument(pipeline=pipeline, sinks=[DownSink()], listeners=[])
    try:
        with FakeAnthropicServer(ResponseSpec.small(40)) as server:
            texts = stream_texts(server)
        assert costwatch.flush(20)
    finally:
        costwatch.uninstrument()
        pipeline.shutdown(timeout=5)
    assert texts == bare_texts
    assert pipeline.dropped == CALLS and pipeline.write_errors >= 1
    lines = costwatch_lines(caplog)
    # One line for each problem: the sink is down, and the spool cannot hold what it missed.
    assert len(lines) == 2, lines
    assert sum("sink down failed" in line for line in lines) == 1
    assert sum("dropped" in line and "spool could not be written" in line for line in lines) == 1


def test_a_metrics_port_already_taken_raises_a_clear_error_naming_the_port() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = int(taken.getsockname()[1])
    try:
        with pytest.raises(OSError) as caught:
            start_metrics_server(port, registry=CollectorRegistry())
    finally:
        taken.close()
    assert str(port) in str(caught.value) and "in use" in str(caught.value)


@pytest.fixture
def fresh_errors(monkeypatch: pytest.MonkeyPatch) -> InstrumentationErrors:
    """A fresh error counter, so 'logged once per place' does not depend on earlier tests."""
    errors = InstrumentationErrors()
    for module in ("health", "accounting", "instrumentation"):
        monkeypatch.setattr(f"costwatch.{module}.instrumentation_errors", errors)
    monkeypatch.setattr("costwatch.metrics.instrumentation_errors", errors)
    return errors


@pytest.mark.parametrize(
    ("target", "place"),
    [
        ("costwatch.attribution.RetryTracker.begin", "begin"),
        ("costwatch.pricing.PriceTable.cost", "price"),
        ("costwatch.stream_meter.BodyMeter.feed", "feed"),
    ],
    ids=["retry_tracker", "pricing", "sse_parser"],
)
def test_a_bug_inside_a_hook_is_counted_and_logged_once_and_streams_still_work(
    target: str,
    place: str,
    fresh_errors: InstrumentationErrors,
    bare_texts: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def injected_bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(target, injected_bug)
    caplog.set_level(logging.DEBUG, logger="costwatch")
    pipeline = Pipeline()
    registry = CollectorRegistry()
    metrics = MetricsSink(registry=registry, pipeline=pipeline, retry_window_s=600, workflow_label_limit=20)
    memory = MemorySink()
    costwatch.instrument(pipeline=pipeline, sinks=[memory, metrics], listeners=[], prices=load_prices())
    try:
        with FakeAnthropicServer(ResponseSpec.small(40)) as server:
            texts = stream_texts(server)
        costwatch.flush(10)
        records = memory.records
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()
    assert texts == bare_texts
    if place == "price":  # a failed price lookup keeps the record, unpriced
        assert len(records) == CALLS and all(r.cost is None and r.usage.input_tokens for r in records)
    assert fresh_errors.by_place() == {place: CALLS}
    assert registry.get_sample_value("costwatch_instrumentation_errors_total") == CALLS
    (line,) = costwatch_lines(caplog)
    assert f"internal error in {place}" in line and "injected bug" in line
