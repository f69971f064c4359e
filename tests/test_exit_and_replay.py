"""What happens at exit, tested in real child processes: attempts in flight at SIGTERM are stored as
interrupted with what they billed so far, and a spool left behind is replayed without new traffic
(at instrument(), and by `costwatch db replay`)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import completed_attempt

import costwatch
from costwatch.cli import main
from costwatch.pipeline import Pipeline
from costwatch.records import Outcome
from costwatch.spool import Spool
from costwatch.store import SqlStore
from costwatch.testing import FakeAnthropicServer, ResponseSpec

STREAMS = 4

IN_FLIGHT_CHILD = textwrap.dedent(
    """
    import faulthandler, os, select, signal, sys, threading, time
    import anthropic
    import costwatch

    url, spool_dir, base_url, handled = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "handled"
    if handled:
        # The application's own handler only writes to a pipe: one that took a lock (Event.set) could
        # interrupt the main thread holding that very lock inside Event.wait, and wait forever.
        got_sigterm, on_sigterm = os.pipe()
        signal.signal(signal.SIGTERM, lambda signum, frame: os.write(on_sigterm, b"."))
    costwatch.instrument(database_url=url, spool_dir=spool_dir, metrics=False, listeners=[])
    client = anthropic.Anthropic(base_url=base_url, api_key="sk-ant-test-key", max_retries=0)
    reading = threading.Semaphore(0)

    def consume(n):
        with costwatch.tags(workflow=f"stream-{n}"), client.messages.stream(
            model="claude-haiku-4-5", max_tokens=8192, messages=[{"role": "user", "content": f"go {n}"}]
        ) as stream:
            for i, _ in enumerate(stream.text_stream):
                if i == 20:
                    reading.release()

    threads = [threading.Thread(target=consume, args=(n,), daemon=True) for n in range(int(sys.argv[5]))]
    for thread in threads:
        thread.start()
    for _ in threads:
        reading.acquire()
    faulthandler.dump_traceback_later(100, exit=True)  # a hang ends with every thread's stack
    print("streaming", flush=True)
    # Waits in short slices: with other threads busy, CPython can run a signal's Python handler only
    # after the blocking call it arrived just before returns (a minute, in one long wait).
    if handled:
        while not select.select([got_sigterm], [], [], 0.2)[0]:
            pass
        print("handled", flush=True)
        for thread in threads:
            thread.join(60)
    else:
        while True:
            time.sleep(0.2)
    """
)


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _run_until_streaming(url: str, tmp_path: Path, base_url: str, mode: str) -> tuple[int, str, str]:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            IN_FLIGHT_CHILD,
            url,
            str(tmp_path / "spool"),
            base_url,
            mode,
            str(STREAMS),
        ],
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == "streaming\n", child.stderr.read() if child.stderr else ""
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=110)  # the child dumps its stacks and exits at 100 s
    finally:
        child.kill()
        child.wait()
    return child.returncode, out, err


@pytest.mark.timeout(180)
def test_attempts_in_flight_at_sigterm_are_stored_as_interrupted_with_what_they_billed(
    store_url: str, tmp_path: Path
) -> None:
    spec = ResponseSpec.small(3000, event_interval_s=0.01)  # ~30 s a stream: all four are in flight
    with FakeAnthropicServer(spec) as server:
        code, _, err = _run_until_streaming(store_url, tmp_path, server.base_url, "-")
        assert _eventually(lambda: len(server.ledger.entries) == STREAMS)  # as the cut sockets close
        billed_input = {entry.request_id: entry.input_tokens for entry in server.ledger.entries}
    assert code == -signal.SIGTERM, err
    store = SqlStore(store_url)
    try:
        with store.engine.connect() as connection:
            ids = [row[0] for row in connection.exec_driver_sql("SELECT attempt_id FROM costwatch_attempts")]
        records = [store.attempt(attempt_id) for attempt_id in ids]
    finally:
        store.shutdown()
    assert len(records) == STREAMS
    assert {r.tags["workflow"] for r in records} == {f"stream-{n}" for n in range(STREAMS)}
    for record in records:
        assert record.outcome is Outcome.INTERRUPTED and record.error_type is None
        assert record.usage.input_tokens == billed_input[record.request_id] > 0
        assert record.usage.output_estimated and record.usage.output_tokens >= 20
    assert not any(Path(tmp_path / "spool").rglob("*.jsonl"))


@pytest.mark.timeout(180)
def test_a_sigterm_the_application_handles_leaves_its_streams_to_finish(
    store_url: str, tmp_path: Path
) -> None:
    spec = ResponseSpec.small(300, event_interval_s=0.01)
    with FakeAnthropicServer(spec) as server:
        code, out, err = _run_until_streaming(store_url, tmp_path, server.base_url, "handled")
    assert code == 0 and "handled" in out, err
    store = SqlStore(store_url)
    try:
        [totals] = store.rollup_totals(group_by=["outcome"])
    finally:
        store.shutdown()
    assert totals.group == {"outcome": "completed"} and totals.attempts == STREAMS


def test_a_spool_left_by_a_killed_process_is_replayed_at_instrument_without_any_request(
    store_url: str, tmp_path: Path
) -> None:
    url = store_url
    left = Spool(tmp_path / "spool")
    left.append(SqlStore(url).name, [completed_attempt(n) for n in range(5)])
    left.close()  # what a killed process leaves: a segment nobody holds
    pipeline = Pipeline(spool=Spool(tmp_path / "spool"))
    try:
        assert costwatch.instrument(pipeline=pipeline, database_url=url, metrics=False, listeners=[])
        assert pipeline.flush(10)
        store = next(sink for sink in pipeline.sinks if isinstance(sink, SqlStore))
        deadline_ok = _eventually(lambda: store.attempt_count() == 5)
        assert deadline_ok and not pipeline.spool.has_segments(store.name)
    finally:
        costwatch.uninstrument()
        pipeline.shutdown()


def _eventually(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_costwatch_db_replay_writes_a_spool_left_behind_and_says_how_many(
    store_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = store_url
    store = SqlStore(url)
    store.attempt_count()  # an existing, migrated store
    left = Spool(tmp_path / "spool")
    left.append(store.name, [completed_attempt(n) for n in range(7)])
    left.close()
    assert main(["db", "replay", "--db", url, "--spool-dir", str(tmp_path / "spool")]) == 0
    assert "replayed 7 spooled records" in capsys.readouterr().out
    assert store.attempt_count() == 7
    assert main(["db", "replay", "--db", url, "--spool-dir", str(tmp_path / "spool")]) == 0
    assert "nothing spooled" in capsys.readouterr().out
    store.shutdown()


# -- retention --------------------------------------------------------------------------------------
def test_costwatch_db_prune_removes_old_raw_rows_keeps_every_total_and_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = SqlStore(url)
    old = [completed_attempt(n) for n in range(25)]  # March 2025: long ago
    recent = [
        dataclasses.replace(completed_attempt(100 + n), started_at=datetime.now(timezone.utc))
        for n in range(3)
    ]
    store.write([*old, *recent])
    before = store.rollup_totals()
    for _ in range(2):
        assert main(["db", "prune", "--older-than", "90d", "--db", url]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.index("pruned 25 attempt rows") < out.index("pruned 0 attempt rows")
    assert store.attempt_count() == 3 and store.rollup_totals() == before
    store.shutdown()


def test_a_prune_shorter_than_the_retry_window_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "prune", "--older-than", "5m", "--db", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert "shorter than the retry window" in capsys.readouterr().err


def test_prune_in_small_transactions_deletes_every_old_row(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'store.db'}")
    store.write([completed_attempt(n) for n in range(23)])
    assert store.prune_before(datetime(2026, 1, 1, tzinfo=timezone.utc), batch=5) == 23
    assert store.attempt_count() == 0
    store.shutdown()


def test_serve_with_a_retention_prunes_old_rows_when_it_starts(tmp_path: Path) -> None:
    from costwatch.exporter import serve

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = SqlStore(url)
    store.write([completed_attempt(n) for n in range(4)])
    server = serve(url, 0, block=False, retention=timedelta(days=90))
    try:
        assert _eventually(lambda: store.attempt_count() == 0)
        assert store.rollup_totals()[0].attempts == 4
    finally:
        server.shutdown()
        server.server_close()
        store.shutdown()
