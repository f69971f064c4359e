"""Load: many concurrent streams and several processes lose no record, duplicate none, and never hang.

Every record is checked against the fake server's ledger: one record per HTTP attempt, with the
attempt's request id, so a lost, duplicated or misattributed record fails the test. Every wait has a
timeout, so a deadlock fails instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path

import anthropic
import pytest

import costwatch
from costwatch import AttemptRecord, Outcome
from costwatch.pipeline import Pipeline
from costwatch.pricing import load_prices
from costwatch.sinks import MemorySink
from costwatch.store import SqlStore
from costwatch.testing import DropProfile, FakeAnthropicServer, LedgerEntry, ResponseSpec

MODEL = "claude-haiku-4-5"
MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Name three prime numbers."}]
SMALL = ResponseSpec.small(12)
DROPS = DropProfile(drop_rate=0.25, seed=8)


@pytest.fixture
def accounting() -> Iterator[tuple[Pipeline, MemorySink]]:
    pipeline = Pipeline(batch_size=64, interval_s=0.05)
    sink = MemorySink()
    costwatch.instrument(pipeline=pipeline, sinks=[sink], listeners=[], prices=load_prices())
    try:
        yield pipeline, sink
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def assert_one_record_per_ledger_entry(
    records: Sequence[AttemptRecord], entries: Sequence[LedgerEntry]
) -> None:
    assert len({r.attempt_id for r in records}) == len(records), "a record was duplicated"
    assert sorted(r.request_id or "" for r in records) == sorted(e.request_id for e in entries)
    by_request = {e.request_id: e for e in entries}
    for record in records:
        entry = by_request[record.request_id or ""]
        assert record.usage.input_tokens == entry.input_tokens
        if record.outcome is Outcome.COMPLETED:
            assert record.usage.output_tokens == entry.output_tokens
        else:
            assert record.outcome is Outcome.DROPPED and entry.ending.value == "cut"


def stream_once(client: anthropic.Anthropic) -> None:
    try:
        for _ in client.messages.create(model=MODEL, max_tokens=256, messages=MESSAGES, stream=True):
            pass
    except (anthropic.APIError, OSError, Exception) as exc:  # a scripted drop
        assert "peer closed" in str(exc), exc


def test_64_threads_streaming_at_once_lose_and_duplicate_no_record(accounting) -> None:
    _pipeline, sink = accounting
    threads_count = 64
    with FakeAnthropicServer(SMALL, drop_profile=DROPS) as server:
        start = threading.Barrier(threads_count, timeout=20)
        client = anthropic.Anthropic(
            base_url=server.base_url, api_key="sk-ant-load", max_retries=0, timeout=30
        )

        def work(i: int) -> None:
            start.wait()
            with costwatch.tags(workflow=f"thread-{i}"):
                stream_once(client)

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(t.is_alive() for t in threads), "a streaming thread hung"
        entries = server.ledger.wait_for(threads_count, timeout=10)
        client.close()
    assert costwatch.flush(20)
    records = sink.records
    assert len(records) == threads_count
    assert_one_record_per_ledger_entry(records, entries)
    assert sorted(r.tags["workflow"] for r in records) == sorted(f"thread-{i}" for i in range(threads_count))
    assert any(r.outcome is Outcome.DROPPED for r in records)


def test_256_asyncio_tasks_streaming_at_once_lose_and_duplicate_no_record(accounting) -> None:
    _pipeline, sink = accounting
    tasks_count = 256

    async def main(server: FakeAnthropicServer) -> None:
        async with anthropic.AsyncAnthropic(
            base_url=server.base_url, api_key="sk-ant-load", max_retries=0, timeout=60
        ) as client:

            async def one(i: int) -> None:
                with costwatch.tags(workflow=f"task-{i}"):
                    try:
                        stream = await client.messages.create(
                            model=MODEL, max_tokens=256, messages=MESSAGES, stream=True
                        )
                        async for _ in stream:
                            pass
                    except Exception as exc:  # a scripted drop
                        assert "peer closed" in str(exc), exc

            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(tasks_count))), 90)

    with FakeAnthropicServer(SMALL, drop_profile=DROPS) as server:
        asyncio.run(main(server))
        entries = server.ledger.wait_for(tasks_count, timeout=10)
        assert server.peak_open_responses > 1
    assert costwatch.flush(20)
    records = sink.records
    assert len(records) == tasks_count
    assert_one_record_per_ledger_entry(records, entries)
    assert sorted(r.tags["workflow"] for r in records) == sorted(f"task-{i}" for i in range(tasks_count))


WORKER = textwrap.dedent(
    """
    import sys
    import anthropic
    import costwatch

    base_url, database_url, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
    costwatch.instrument(database_url=database_url, metrics=False)
    client = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-load", max_retries=0, timeout=30)
    for _ in range(calls):
        try:
            for _ in client.messages.create(
                model="claude-haiku-4-5", max_tokens=256, stream=True,
                messages=[{"role": "user", "content": "Name three prime numbers."}],
            ):
                pass
        except Exception as exc:
            assert "peer closed" in str(exc), exc
    assert costwatch.flush(60), "records were not delivered in time"
    """
)


@pytest.mark.timeout(180)
def test_processes_sharing_one_sqlite_store_write_every_attempt_once(tmp_path: Path) -> None:
    processes, calls = 3, 20
    database_url = f"sqlite:///{tmp_path / 'shared.db'}"
    setup = SqlStore(database_url)
    assert setup.attempt_count() == 0  # migrates the schema up front, as `costwatch db upgrade` would
    setup.shutdown()
    env = {**os.environ, "COSTWATCH_SPOOL_DIR": str(tmp_path / "spool")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with FakeAnthropicServer(SMALL, drop_profile=DROPS) as server:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, server.base_url, database_url, str(calls)],
                env=env,
                cwd=tmp_path,
                stderr=subprocess.PIPE,
            )
            for _ in range(processes)
        ]
        try:
            for child in children:
                _, err = child.communicate(timeout=150)
                assert child.returncode == 0, err.decode()[-3000:]
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait(10)
        entries = server.ledger.wait_for(processes * calls, timeout=10)
    store = SqlStore(database_url)
    try:
        assert store.attempt_count() == processes * calls
        with store.engine.connect() as connection:
            from costwatch.store.schema import ATTEMPTS

            ids = [row.attempt_id for row in connection.execute(ATTEMPTS.select())]
        records = [store.attempt(attempt_id) for attempt_id in ids]
    finally:
        store.shutdown()
    assert_one_record_per_ledger_entry([r for r in records if r is not None], entries)
    assert not list((tmp_path / "spool").rglob("*.jsonl")), "records were left in a spool"


class CountingSink:
    """Counts records and keeps nothing, so memory measures costwatch and not the sink."""

    name = "counting"

    def __init__(self) -> None:
        self.count = 0

    def export(self, records: Sequence[AttemptRecord]) -> None:
        self.count += sum(1 for r in records if r.revision == 0)

    def shutdown(self) -> None:
        return None


def traced_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_memory_stays_flat_over_a_long_run_of_streams() -> None:
    # COSTWATCH_SOAK_ROUNDS lengthens the soak (the default keeps CI short).
    rounds = int(os.environ.get("COSTWATCH_SOAK_ROUNDS", "4"))
    per_round = 80
    pipeline = Pipeline(batch_size=64, interval_s=0.05)
    sink = CountingSink()
    # A short retry window lets the retry tracker forget settled requests within the run, as it
    # does in production within its (longer) window.
    costwatch.instrument(
        pipeline=pipeline, sinks=[sink], listeners=[], prices=load_prices(), retry_window_s=0.2
    )
    tracemalloc.start()
    try:
        with FakeAnthropicServer(SMALL, drop_profile=DROPS) as server:
            client = anthropic.Anthropic(base_url=server.base_url, api_key="sk-ant-load", max_retries=0)
            sizes = []
            for _ in range(rounds):
                for _ in range(per_round):
                    stream_once(client)
                assert costwatch.flush(20)
                server.ledger.clear()
                sizes.append(traced_bytes())
            client.close()
    finally:
        tracemalloc.stop()
        costwatch.uninstrument()
        pipeline.shutdown()
    assert sink.count == rounds * per_round
    # After the first round has warmed every cache, later rounds must not keep what they made.
    growth = max(sizes[1:]) - sizes[0]
    assert growth < 128 * 1024, f"memory grew by {growth} bytes over {rounds - 1} rounds: {sizes}"
