"""The pipeline: batching, delivery to every sink, and losing nothing when sinks, queues or processes fail."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import completed_attempt, sigint_by_default

import costwatch
import costwatch.pipeline
from costwatch.pipeline import Pipeline, get_pipeline
from costwatch.records import AttemptRecord, Outcome
from costwatch.settings import SettingsError
from costwatch.sinks import MemorySink
from costwatch.spool import Spool
from costwatch.store import SqlStore


class FlakySink:
    """A sink that refuses every batch while ``down`` is set, like a database that went away."""

    name = "flaky"

    def __init__(self) -> None:
        self.down = threading.Event()
        self.memory = MemorySink()
        self.exports = 0

    def export(self, records: Sequence[AttemptRecord]) -> None:
        self.exports += 1
        if self.down.is_set():
            raise ConnectionError("database unreachable")
        self.memory.export(records)

    def shutdown(self) -> None:
        pass


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _wait_for(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """A spool in a fresh directory."""
    return Spool(tmp_path / "spool")


def test_flush_delivers_every_record_to_every_sink(spool: Spool) -> None:
    pipeline = Pipeline(batch_size=7, interval_s=10, spool=spool)
    first, second = MemorySink(), MemorySink()
    pipeline.add_sink(first)
    pipeline.add_sink(second)
    for n in range(100):
        pipeline.submit(completed_attempt(n))
    assert pipeline.flush(timeout=5)
    assert len(first.records) == len(second.records) == 100
    assert pipeline.health().queue_depth == 0
    pipeline.shutdown()


def test_batches_go_out_on_the_interval_without_a_flush(spool: Spool) -> None:
    pipeline = Pipeline(batch_size=1000, interval_s=0.05, spool=spool)
    sink = MemorySink()
    pipeline.add_sink(sink)
    pipeline.submit(completed_attempt(1))
    assert _wait_for(lambda: len(sink.records) == 1, timeout=5)
    pipeline.shutdown()


def test_records_arriving_while_a_batch_is_written_wait_for_the_next_batch_instead_of_one_write_each(
    spool: Spool,
) -> None:
    class BatchSizes(MemorySink):
        """Records the size of every batch; while writing the first, the application submits more."""

        def __init__(self, pipeline: Pipeline) -> None:
            super().__init__()
            self.pipeline = pipeline
            self.sizes: list[int] = []

        def export(self, records: Sequence[AttemptRecord]) -> None:
            if not self.sizes:
                for n in range(100, 103):  # one at a time, as an application's requests end
                    self.pipeline.submit(completed_attempt(n))
            self.sizes.append(len(records))
            super().export(records)

    pipeline = Pipeline(batch_size=500, interval_s=30, spool=spool)
    sink = BatchSizes(pipeline)
    pipeline.add_sink(sink)
    pipeline.submit(completed_attempt(1))
    assert _wait_for(lambda: sink.sizes == [1])
    time.sleep(0.3)  # a writer chasing arrivals would have written them by now, one batch each
    assert sink.sizes == [1]
    assert pipeline.flush(timeout=5)
    assert sink.sizes == [1, 3]
    pipeline.shutdown()


def test_flush_waits_for_a_batch_the_writer_already_took(spool: Spool) -> None:
    class SlowSink(MemorySink):
        def export(self, records: Sequence[AttemptRecord]) -> None:
            time.sleep(0.3)
            super().export(records)

    pipeline = Pipeline(batch_size=1, interval_s=0.01, spool=spool)
    sink = SlowSink()
    pipeline.add_sink(sink)
    pipeline.submit(completed_attempt(1))
    assert _wait_for(lambda: pipeline.queue_depth == 0)
    assert pipeline.flush(timeout=5)
    assert len(sink.records) == 1
    pipeline.shutdown()


def test_failing_sink_gets_its_records_from_the_spool_once_it_recovers(spool: Spool) -> None:
    pipeline = Pipeline(batch_size=10, interval_s=0.02, spool=spool, retry_initial_s=0.05, retry_max_s=0.2)
    flaky, healthy = FlakySink(), MemorySink()
    pipeline.add_sink(flaky)
    pipeline.add_sink(healthy)
    flaky.down.set()
    for n in range(95):
        pipeline.submit(completed_attempt(n))
    assert pipeline.flush(timeout=5)
    health = pipeline.health()
    assert health.spooled_pending == 95 and health.write_errors >= 1 and health.dropped == 0
    assert len(healthy.records) == 95 and flaky.memory.records == []

    flaky.down.clear()
    assert _wait_for(lambda: pipeline.health().spooled_pending == 0)
    assert [r.attempt_id for r in flaky.memory.records] == [f"att-{n}" for n in range(95)]
    assert len(healthy.records) == 95  # the healthy sink was not sent the spool again
    pipeline.shutdown()


def test_failing_sink_is_not_retried_on_every_batch(spool: Spool) -> None:
    pipeline = Pipeline(batch_size=1, interval_s=0.01, spool=spool, retry_initial_s=60, retry_max_s=60)
    flaky = FlakySink()
    flaky.down.set()
    pipeline.add_sink(flaky)
    for n in range(50):
        pipeline.submit(completed_attempt(n))
    assert pipeline.flush(timeout=5)
    assert flaky.exports == 1 and pipeline.health().spooled_pending == 50
    pipeline.shutdown()


def test_full_queue_spills_to_the_spool_and_nothing_is_lost(spool: Spool) -> None:
    pipeline = Pipeline(capacity=10, batch_size=1000, interval_s=0.05, spool=spool, retry_max_s=0.1)
    sink = MemorySink()
    pipeline.add_sink(sink)
    blocker = threading.Event()
    original_export = sink.export
    sink.export = lambda records: (blocker.wait(5), original_export(records))  # type: ignore[method-assign]
    for n in range(200):
        pipeline.submit(completed_attempt(n))
    assert spool.pending("memory") >= 180  # at most one batch in flight and one queue-full held back
    blocker.set()
    assert _wait_for(lambda: len(sink.records) == 200 and pipeline.health().spooled_pending == 0)
    assert pipeline.health().dropped == 0
    pipeline.shutdown()


def test_record_is_dropped_only_when_the_spool_cannot_be_written_and_it_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the spool directory should be")
    pipeline = Pipeline(batch_size=5, interval_s=0.01, spool=Spool(blocked), retry_initial_s=60)
    flaky = FlakySink()
    flaky.down.set()
    pipeline.add_sink(flaky)
    caplog.set_level(logging.WARNING, logger="costwatch")
    for n in range(20):
        pipeline.submit(completed_attempt(n))
    assert pipeline.flush(timeout=5)
    assert pipeline.health().dropped == 20
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    pipeline.shutdown()


def test_spool_left_by_an_earlier_run_is_replayed_when_the_sink_is_added(spool: Spool) -> None:
    spool.append("memory", [completed_attempt(n) for n in range(5)])
    spool.close()
    pipeline = Pipeline(interval_s=0.02, spool=Spool(spool.directory))
    sink = MemorySink()
    pipeline.add_sink(sink)
    pipeline.submit(completed_attempt(99))
    assert _wait_for(lambda: len(sink.records) == 6)
    pipeline.shutdown()


def test_get_pipeline_is_one_per_process() -> None:
    assert get_pipeline() is get_pipeline()


def instrument_with_spool_dir(directory: Path) -> bool:
    """instrument() with the process-wide pipeline and no sinks: only its spool directory matters."""
    return costwatch.instrument(spool_dir=str(directory), store=False, metrics=False, listeners=[])


def test_a_spool_dir_given_to_instrument_moves_the_spool_of_a_pipeline_flush_created_earlier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(costwatch.pipeline, "_pipeline", None)
    monkeypatch.delenv("COSTWATCH_SPOOL_DIR", raising=False)
    assert costwatch.flush(1)  # creates the process-wide pipeline, with the default spool
    assert instrument_with_spool_dir(tmp_path / "chosen")
    try:
        assert get_pipeline().spool.directory == tmp_path / "chosen"
    finally:
        costwatch.uninstrument()
        get_pipeline().shutdown()


def test_a_spool_dir_the_running_pipeline_cannot_take_is_refused_and_installs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(costwatch.pipeline, "_pipeline", None)
    pipeline = get_pipeline(spool_dir=tmp_path / "first")
    pipeline.retry_spool()  # the writer starts: records may be spooled in the first directory from now on
    try:
        with pytest.raises(SettingsError, match=r"spool_dir='.*second' cannot take effect: .* running"):
            instrument_with_spool_dir(tmp_path / "second")
        assert not costwatch.is_instrumented() and pipeline.spool.directory == tmp_path / "first"
        assert instrument_with_spool_dir(tmp_path / "first")  # the directory in use is no conflict
        costwatch.uninstrument()
    finally:
        pipeline.shutdown()


SIGTERM_CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from datetime import datetime, timedelta, timezone
    from costwatch.pipeline import Pipeline
    from costwatch.records import AttemptRecord, Outcome, Usage
    from costwatch.spool import Spool
    from costwatch.store import SqlStore

    url, spool_dir, count, chain = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "chain"
    if chain:
        def previous_handler(signum, frame):
            print("previous handler ran", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, previous_handler)
    store = SqlStore(url)
    store.attempt_count()  # migrate before the clock starts
    # Batches larger than the workload and an hour's interval: the writer takes nothing before SIGTERM,
    # however fast the store is (with 500 a fast writer had drained most before "queued").
    pipeline = Pipeline(batch_size=5000, interval_s=3600, spool=Spool(spool_dir))
    pipeline.add_sink(store)
    pipeline.install_exit_handlers()
    t0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
    for n in range(count):
        pipeline.submit(AttemptRecord(
            attempt_id=f"sig-{n}", logical_request_id=f"req-{n}", attempt_number=1,
            started_at=t0 + timedelta(seconds=n), outcome=Outcome.COMPLETED, usage=Usage(input_tokens=1),
        ))
    print(f"queued {pipeline.queue_depth}", flush=True)
    for _ in range(300):  # short slices: a signal right after "queued" is not left for a minute
        time.sleep(0.2)
    """
)


@pytest.mark.parametrize("chain", [False, True], ids=["default-action", "chained-handler"])
@pytest.mark.timeout(300)  # the child took over 60 s to start and queue at load 15
def test_sigterm_mid_workload_loses_nothing_already_submitted(tmp_path: Path, chain: bool) -> None:
    url = f"sqlite:///{tmp_path / 'sigterm.db'}"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SIGTERM_CHILD,
            url,
            str(tmp_path / "spool"),
            "3000",
            "chain" if chain else "-",
        ],
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        # The interval is an hour, so at this point (nearly) everything is still only in memory.
        assert line.startswith("queued "), child.stderr.read() if child.stderr else ""
        assert int(line.split()[1]) > 2000
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=150)
    finally:
        child.kill()
    if chain:
        assert child.returncode == 3 and "previous handler ran" in out, err
    else:
        assert child.returncode == -signal.SIGTERM, err
    store = SqlStore(url)
    try:
        assert store.attempt_count() == 3000
        [totals] = store.rollup_totals()
        assert totals.attempts == 3000
    finally:
        store.shutdown()


CTRL_C_CHILD = textwrap.dedent(
    """
    import collections, sys, time
    from datetime import datetime, timezone
    from costwatch.pipeline import Pipeline
    from costwatch.records import AttemptRecord, Outcome, Usage
    from costwatch.spool import Spool

    delivered, spool_dir, program = sys.argv[1], sys.argv[2], sys.argv[3]

    class CodeGeneratingSink:
        # Generates code as SQLAlchemy does on the first use of a construct: exec() of a string.
        name = "generating"
        def export(self, records):
            collections.namedtuple("Row", "attempt_id")
            with open(delivered, "a") as out:
                out.writelines(record.attempt_id + "\\n" for record in records)
        def shutdown(self):
            pass

    def record(attempt_id):
        return AttemptRecord(
            attempt_id=attempt_id, logical_request_id=attempt_id, attempt_number=1,
            started_at=datetime.now(timezone.utc), outcome=Outcome.COMPLETED, usage=Usage(input_tokens=1),
        )

    pipeline = Pipeline(interval_s=3600, spool=Spool(spool_dir))
    pipeline.add_sink(CodeGeneratingSink())
    pipeline.install_exit_handlers()
    pipeline.submit(record("before"))
    assert pipeline.flush(60)
    pipeline.submit(record("at-exit"))  # the writer sleeps for an hour: delivered at exit
    try:
        print("ready", flush=True)
        for _ in range(300):  # short slices: a signal right after "ready" is not left for a minute
            time.sleep(0.2)
    except KeyboardInterrupt:
        if program != "handles":
            raise
    """
)


@pytest.mark.parametrize(
    ("program", "ends_with"),
    [("does-not-catch", -signal.SIGINT), ("handles", 0)],
    ids=["uncaught", "caught"],
)
@pytest.mark.usefixtures("runner_ignoring_sigint")
@pytest.mark.timeout(120)
def test_a_ctrl_c_ends_the_program_as_python_would_after_the_records_are_delivered(
    tmp_path: Path, program: str, ends_with: int
) -> None:
    """An uncaught Ctrl-C ends the process by SIGINT, as Python does, although delivering the records
    at exit ran generated code; a Ctrl-C the program caught leaves its exit status its own."""
    delivered = tmp_path / "delivered.txt"
    child = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_CHILD, str(delivered), str(tmp_path / "spool"), program],
        env=_child_env(),
        preexec_fn=sigint_by_default,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n", child.stderr.read() if child.stderr else ""
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=100)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == ends_with, err
    assert delivered.read_text().split() == ["before", "at-exit"]


SIGTERM_AT_EVERY_LINE_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from datetime import datetime, timedelta, timezone
    from costwatch.pipeline import Pipeline
    from costwatch.records import AttemptRecord, Outcome, Usage
    from costwatch.spool import Spool

    work, scenario = sys.argv[1], sys.argv[2]
    HANG_S = 60.0  # far beyond the handler's own deadlines: a process still alive then is deadlocked


    class FileSink:
        # Writes the ids it is given to a file, so the parent sees what was delivered.
        name = "file"

        def __init__(self, path):
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

        def export(self, records):
            os.write(self.fd, "".join(r.attempt_id + "\\n" for r in records).encode())

        def shutdown(self):
            pass


    def record(n):
        return AttemptRecord(
            attempt_id=f"r{n}", logical_request_id=f"q{n}", attempt_number=1,
            started_at=datetime(2025, 3, 1, tzinfo=timezone.utc) + timedelta(seconds=n),
            outcome=Outcome.COMPLETED, model="claude-sonnet-4-5", usage=Usage(input_tokens=1),
        )


    def prepare(folder):
        # The pipeline as the scenario finds it, and the call to interrupt.
        pipeline = Pipeline(batch_size=1 if scenario == "wake" else 500, interval_s=3600,
                            spool=Spool(os.path.join(folder, "spool")))
        pipeline.add_sink(FileSink(os.path.join(folder, "delivered")))
        pipeline.install_exit_handlers()
        if scenario != "start":
            pipeline.submit(record(1))
            assert pipeline.flush(30)
        if scenario == "flush":
            pipeline.submit(record(2))
            return lambda: pipeline.flush(30)
        return lambda: pipeline.submit(record(2))


    def run(folder, fire_at):
        # In a forked child: run the call under a tracer that sends SIGTERM at its fire_at-th line.
        call = prepare(folder)
        seen = 0

        def tracer(frame, event, arg):
            nonlocal seen
            if seen > fire_at:
                return None
            if event == "line":
                seen += 1
                if seen == fire_at:
                    seen += 1
                    sys.settrace(None)
                    with open(os.path.join(folder, "at"), "w") as f:
                        f.write(f"{frame.f_code.co_filename}:{frame.f_lineno}")
                    os.kill(os.getpid(), signal.SIGTERM)
                    return None
            return tracer

        sys.settrace(tracer)
        call()
        sys.settrace(None)
        os.write(1, f"{seen}\\n".encode())  # how many lines the call ran (when the signal never fired)
        os._exit(0)


    fire_at = 1
    while True:
        folder = os.path.join(work, f"{scenario}-{fire_at}")
        os.makedirs(folder)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            os.dup2(write, 1)
            run(folder, fire_at)
        os.close(write)
        deadline = time.monotonic() + HANG_S
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                at = open(os.path.join(folder, "at")).read()
                print(f"HUNG after SIGTERM at line {fire_at} of {scenario}: {at}", flush=True)
                sys.exit(1)
            time.sleep(0.01)
        out = os.read(read, 100).decode()
        os.close(read)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and out:
            print(f"{scenario}: {fire_at - 1} lines, each interrupted", flush=True)
            sys.exit(0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, (fire_at, status)
        target = os.path.join(folder, "delivered")
        delivered = open(target).read().split() if os.path.exists(target) else []
        spool = Spool(os.path.join(folder, "spool"))
        spooled = []
        spool.replay("file", lambda rs: spooled.extend(r.attempt_id for r in rs))
        kept = delivered + spooled
        assert len(kept) == len(set(kept)), (fire_at, kept)
        if scenario != "start":
            assert "r1" in delivered, (fire_at, delivered)
        if scenario == "flush":
            assert "r2" in kept, (fire_at, kept)
        fire_at += 1
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("scenario", ["wake", "start", "flush"])
@pytest.mark.timeout(600)
def test_a_sigterm_at_any_line_of_submit_or_flush_still_delivers_and_ends_the_process(
    tmp_path: Path, scenario: str
) -> None:
    """The SIGTERM handler runs in the main thread between two of its lines, whatever it was doing:
    waking the writer (``wake``), starting it (``start``) or waiting in a flush (``flush``). For
    every line of that call, one forked child is signalled there: each ends by SIGTERM, with what
    was queued before delivered (or spooled) exactly once. A lock the interrupted line held and the
    handler needed again would leave a child hanging."""
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT_EVERY_LINE_CHILD, str(tmp_path), scenario],
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert done.returncode == 0 and "each interrupted" in done.stdout, done.stdout + done.stderr[-3000:]


EXIT_CHILD = textwrap.dedent(
    """
    import sys, time
    import anthropic
    import costwatch
    import costwatch.instrumentation as hooks
    from costwatch.testing import FakeAnthropicServer, ResponseSpec

    settle = hooks._settle_item
    def settle_late(item):
        time.sleep(0.5)  # the settler is still at work when the interpreter begins to exit
        settle(item)
    hooks._settle_item = settle_late

    costwatch.instrument(database_url=sys.argv[1], spool_dir=sys.argv[2], metrics=False, listeners=[])
    with FakeAnthropicServer(ResponseSpec.small(2000)) as server:
        client = anthropic.Anthropic(base_url=server.base_url, api_key="sk-ant-test-key")
        with client.messages.stream(
            model="claude-haiku-4-5", max_tokens=8192, messages=[{"role": "user", "content": "go"}]
        ) as stream:
            for _ in stream.text_stream:
                break  # closed early: the attempt is left to the settler thread
    """
)


@pytest.mark.timeout(180)
def test_a_stream_closed_just_before_exit_is_settled_and_stored_before_the_pipeline_shuts_down(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'exit.db'}"
    child = subprocess.run(
        [sys.executable, "-c", EXIT_CHILD, url, str(tmp_path / "spool")],
        env=_child_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert child.returncode == 0, child.stderr
    store = SqlStore(url)
    try:
        assert store.attempt_count() == 1
        [totals] = store.rollup_totals(group_by=("outcome",))
        assert totals.group == {"outcome": Outcome.CANCELLED.value} and totals.billed_input_tokens > 0
    finally:
        store.shutdown()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.timeout(30)
def test_forked_child_delivers_its_own_records_and_not_the_parents(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.txt"

    class LedgerSink:
        """Appends "<pid> <attempt_id>" per delivered record to a shared file."""

        name = "ledger"

        def export(self, records: Sequence[AttemptRecord]) -> None:
            with open(ledger, "a") as out:
                out.writelines(f"{os.getpid()} {r.attempt_id}\n" for r in records)

        def shutdown(self) -> None:
            pass

    pipeline = Pipeline(batch_size=1000, interval_s=3600, spool=Spool(tmp_path / "spool"))
    pipeline.add_sink(LedgerSink())
    for n in range(10):
        pipeline.submit(completed_attempt(n))
    pid = os.fork()
    if pid == 0:  # the child: its pipeline starts empty and runs its own writer thread
        try:
            for n in range(100, 105):
                pipeline.submit(completed_attempt(n))
            ok = pipeline.flush(timeout=10)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pipeline.flush(timeout=10)
    pipeline.shutdown()
    lines = [line.split() for line in ledger.read_text().splitlines()]
    by_child = sorted(a for p, a in lines if int(p) == pid)
    by_parent = sorted(a for p, a in lines if int(p) == os.getpid())
    assert by_child == sorted(f"att-{n}" for n in range(100, 105))
    assert by_parent == sorted(f"att-{n}" for n in range(10))


def test_sql_store_is_a_sink_the_pipeline_can_feed(tmp_path: Path, spool: Spool) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'pipe.db'}")
    pipeline = Pipeline(batch_size=50, interval_s=0.05, spool=spool)
    pipeline.add_sink(store)
    for n in range(120):
        pipeline.submit(completed_attempt(n))
    assert pipeline.flush(timeout=10)
    assert store.attempt_count() == 120
    pipeline.shutdown()


def test_records_delivered_when_no_sink_is_attached_are_counted_as_dropped(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = Pipeline(spool=spool, interval_s=0.05)
    try:
        pipeline.submit(completed_attempt(1))
        assert pipeline.flush(timeout=5)
        assert pipeline.dropped == 1
        assert "no sink was attached" in caplog.text
    finally:
        pipeline.shutdown(timeout=5)


def test_stores_of_different_databases_never_receive_each_others_spooled_records(
    tmp_path: Path, spool: Spool
) -> None:
    down_url = f"sqlite:///{tmp_path / 'not-yet' / 'a.db'}"  # its folder does not exist: the store fails
    service_a = Pipeline(interval_s=10, spool=spool)
    service_a.add_sink(SqlStore(down_url))
    for n in range(5):
        service_a.submit(completed_attempt(n))
    assert service_a.flush(timeout=10)
    assert spool.pending() == 5
    service_a.shutdown()

    # Service B shares the working directory (and so the spool) but writes another database.
    store_b = SqlStore(f"sqlite:///{tmp_path / 'b.db'}")
    service_b = Pipeline(interval_s=0.02, spool=Spool(spool.directory))
    service_b.add_sink(store_b)
    service_b.submit(completed_attempt(100))
    assert service_b.flush(timeout=10)
    service_b.retry_spool()
    assert service_b.flush(timeout=10)
    assert [store_b.attempt(f"att-{n}") for n in range(5)] == [None] * 5
    assert store_b.attempt_count() == 1
    service_b.shutdown()

    (tmp_path / "not-yet").mkdir()
    store_a = SqlStore(down_url)
    service_a = Pipeline(interval_s=0.02, spool=Spool(spool.directory))
    service_a.add_sink(store_a)
    service_a.retry_spool()
    assert _wait_for(lambda: store_a.attempt_count() == 5)
    service_a.shutdown()


def test_a_store_is_named_by_its_database_and_never_by_its_password() -> None:
    first = SqlStore("postgresql://costwatch:secret@db.example:5432/billing")
    same_database = SqlStore("postgresql://costwatch:other-secret@db.example:5432/billing")
    other_database = SqlStore("postgresql://costwatch:secret@db.example:5432/reports")
    assert first.name == same_database.name != other_database.name
    assert first.name.startswith("sql-") and "secret" not in first.name


def test_writer_thread_survives_an_error_of_its_own_and_counts_it_as_a_write_error(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = Pipeline(interval_s=0.02, spool=spool)
    sink = MemorySink()
    pipeline.add_sink(sink)
    real = pipeline._seconds_to_next_event
    calls = 0

    def fails_twice() -> float:
        # As when an application thread adds a sink while the writer computes its next wake-up.
        nonlocal calls
        calls += 1
        if calls in (2, 3):
            raise RuntimeError("dictionary changed size during iteration")
        return real()

    pipeline._seconds_to_next_event = fails_twice  # type: ignore[method-assign]
    caplog.set_level(logging.ERROR, logger="costwatch")
    pipeline.submit(completed_attempt(1))
    assert _wait_for(lambda: calls >= 4)
    pipeline.submit(completed_attempt(2))
    assert pipeline.flush(timeout=5)
    assert [r.attempt_id for r in sink.records] == ["att-1", "att-2"]
    assert pipeline.write_errors == 2
    assert len([r for r in caplog.records if "record pipeline error" in r.getMessage()]) == 1
    pipeline.shutdown()
