"""Many writers and an unreliable database: every attempt lands exactly once, rollups stay exact."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import postgres_schema_url

import costwatch
from costwatch.pipeline import Pipeline
from costwatch.records import AttemptRecord, Cost, Outcome, Usage, WasteReason
from costwatch.spool import Spool
from costwatch.store import SqlStore, migrate
from costwatch.store.schema import ATTEMPTS, ROLLUPS

WORKERS = 4
PER_WORKER = 5_000
RETRIED_PER_WORKER = 200

# Each worker writes PER_WORKER attempts through its own pipeline. Its first RETRIED_PER_WORKER are
# dropped streams marked abandoned, whose retries are written by the *next* worker, so the
# abandoned->retried flip happens across processes, in whichever order the two land.
WORKER = textwrap.dedent(
    """
    import sys
    from datetime import datetime, timedelta, timezone
    from costwatch.pipeline import Pipeline
    from costwatch.records import AttemptRecord, Cost, Outcome, Usage, WasteReason
    from costwatch.spool import Spool
    from costwatch.store import SqlStore

    store_url, worker, workers, count, retried, spool_dir = sys.argv[1:7]
    worker, workers, count, retried = int(worker), int(workers), int(count), int(retried)
    t0 = datetime(2025, 3, 1, 10, 0, tzinfo=timezone.utc)
    store = SqlStore(store_url)
    pipeline = Pipeline(batch_size=500, interval_s=0.2, spool=Spool(spool_dir))
    pipeline.add_sink(store)
    previous = (worker - 1) % workers
    for n in range(count):
        started = t0 + timedelta(seconds=n, microseconds=worker)
        usage = Usage(input_tokens=1000 + n % 17, output_tokens=n % 300, cache_read_tokens=n % 5)
        cost = Cost(input_usd=0.003, output_usd=(n % 300) * 0.000015)
        if n < retried:
            record = AttemptRecord(
                attempt_id=f"w{worker}-{n}", logical_request_id=f"w{worker}-req-{n}", attempt_number=1,
                started_at=started, outcome=Outcome.DROPPED, model="claude-sonnet-4-5", usage=usage,
                cost=cost, wasted=True, waste_reason=WasteReason.ABANDONED, error_type="RemoteProtocolError",
                tags={"workflow": f"wf{n % 3}"}, duration_s=1.0,
            )
        elif n < 2 * retried:
            k = n - retried
            record = AttemptRecord(
                attempt_id=f"w{worker}-{n}", logical_request_id=f"w{previous}-req-{k}", attempt_number=2,
                started_at=t0 + timedelta(seconds=k, milliseconds=500), outcome=Outcome.COMPLETED,
                model="claude-sonnet-4-5", usage=usage, cost=cost, duration_s=2.0,
            )
        else:
            record = AttemptRecord(
                attempt_id=f"w{worker}-{n}", logical_request_id=f"w{worker}-req-{n}", attempt_number=1,
                started_at=started, outcome=Outcome.COMPLETED, model="claude-haiku-4-5", usage=usage,
                cost=cost, tags={"workflow": f"wf{n % 3}"}, duration_s=0.5,
            )
        pipeline.submit(record)
    pipeline.shutdown(timeout=60)
    health = pipeline.health()
    assert health.dropped == 0 and health.spooled_pending == 0, health
    """
)


def _child_env() -> dict[str, str]:
    # The children import costwatch exactly as this test process did.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def assert_rollups_equal_raw_row_sums(store_url: str) -> None:
    """The rollup table's grand totals equal the same sums computed over the raw rows in SQL."""
    columns = {
        "attempts": (sa.func.count(), "attempts"),
        "input": (sa.func.sum(ATTEMPTS.c.input_tokens), "billed_input_tokens"),
        "output": (sa.func.sum(ATTEMPTS.c.output_tokens), "billed_output_tokens"),
        "cache_read": (sa.func.sum(ATTEMPTS.c.cache_read_tokens), "billed_cache_read_tokens"),
        "wasted_input": (
            sa.func.sum(sa.case((ATTEMPTS.c.wasted, ATTEMPTS.c.input_tokens), else_=0)),
            "wasted_input_tokens",
        ),
        "started": (
            sa.func.sum(sa.case((ATTEMPTS.c.attempt_number == 1, 1), else_=0)),
            "logical_requests_started",
        ),
        "cost": (sa.func.sum(ATTEMPTS.c.input_cost_usd + ATTEMPTS.c.output_cost_usd), "billed_cost_usd"),
    }
    engine = migrate.create_store_engine(store_url)
    try:
        with engine.connect() as connection:
            raw = connection.execute(sa.select(*(expr for expr, _ in columns.values()))).one()
            rolled = connection.execute(
                sa.select(*(sa.func.sum(ROLLUPS.c[name]) for _, name in columns.values()))
            ).one()
            by_reason_raw = dict(
                connection.execute(
                    sa.select(ATTEMPTS.c.waste_reason, sa.func.count()).group_by(ATTEMPTS.c.waste_reason)
                ).all()
            )
            by_reason_rolled = dict(
                connection.execute(
                    sa.select(ROLLUPS.c.waste_reason, sa.func.sum(ROLLUPS.c.attempts))
                    .group_by(ROLLUPS.c.waste_reason)
                    .having(sa.func.sum(ROLLUPS.c.attempts) != 0)
                ).all()
            )
    finally:
        engine.dispose()
    assert list(rolled[:-1]) == list(raw[:-1])
    assert rolled[-1] == pytest.approx(raw[-1], rel=1e-9)
    assert {reason or "": count for reason, count in by_reason_raw.items()} == by_reason_rolled


@pytest.mark.timeout(900)  # seconds idle; at load 15 four children each took over 100 s
def test_four_processes_write_every_attempt_exactly_once(store_url: str, tmp_path: Path) -> None:
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                store_url,
                str(w),
                str(WORKERS),
                str(PER_WORKER),
                str(RETRIED_PER_WORKER),
                str(tmp_path / f"spool-{w}"),
            ],
            env=_child_env(),
            stderr=subprocess.PIPE,
        )
        for w in range(WORKERS)
    ]
    for child in children:
        _, err = child.communicate(timeout=600)
        assert child.returncode == 0, err.decode()[-3000:]

    engine = migrate.create_store_engine(store_url)
    try:
        with engine.connect() as connection:
            total, distinct = connection.execute(
                sa.select(sa.func.count(), sa.func.count(sa.distinct(ATTEMPTS.c.attempt_id)))
            ).one()
            reasons = dict(
                connection.execute(
                    sa.select(ATTEMPTS.c.waste_reason, sa.func.count()).group_by(ATTEMPTS.c.waste_reason)
                ).all()
            )
    finally:
        engine.dispose()
    assert total == distinct == WORKERS * PER_WORKER
    # Every dropped attempt's retry was written by another process: all of them ended up retried.
    assert reasons == {
        None: WORKERS * (PER_WORKER - RETRIED_PER_WORKER),
        "retried": WORKERS * RETRIED_PER_WORKER,
    }
    assert_rollups_equal_raw_row_sums(store_url)


class TcpRelay:
    """A real TCP relay in front of PostgreSQL that can be cut (refusing connections) and restored.

    While ``silent`` it accepts connections and never answers them (a host whose server hangs), and
    counts them in ``accepted``.
    """

    def __init__(self, target: tuple[str, int], *, silent: bool = False) -> None:
        self.target = target
        self.silent = silent
        self.accepted = 0
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Close the listener and every relayed connection: new connections are refused."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._connections = self._connections, []
        if listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave it listening.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                if self.silent:
                    self._connections.append(client)
                    continue
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
            for end in (client, upstream):  # without it, Nagle + delayed ACKs add 40 ms per round trip
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _attempt(n: int) -> AttemptRecord:
    return AttemptRecord(
        attempt_id=f"outage-{n}",
        logical_request_id=f"req-{n // 2}",
        attempt_number=1 + n % 2,
        started_at=datetime(2025, 3, 1, 10, tzinfo=timezone.utc) + timedelta(seconds=n),
        outcome=Outcome.DROPPED if n % 2 == 0 else Outcome.COMPLETED,
        model="claude-sonnet-4-5",
        usage=Usage(input_tokens=1000, output_tokens=n % 100),
        cost=Cost(input_usd=0.003, output_usd=0.0001),
        wasted=n % 2 == 0,
        waste_reason=WasteReason.ABANDONED if n % 2 == 0 else None,
    )


@pytest.mark.postgres
def test_instrument_waits_one_connect_timeout_for_a_silent_database_and_writes_the_spool_once_it_answers(
    postgres_schema: str, tmp_path: Path
) -> None:
    """A server that accepts and never answers costs ``instrument()`` one connect timeout: neither the
    calibration's load nor the revision's read-ahead try again; the writer does both later."""
    relay = TcpRelay(("127.0.0.1", 5432), silent=True)
    relay.start()
    url = postgres_schema_url(postgres_schema, port=relay.port) + "&connect_timeout=1"
    pipeline = Pipeline(
        interval_s=0.05, spool=Spool(tmp_path / "spool"), retry_initial_s=0.05, retry_max_s=0.5
    )
    try:
        assert costwatch.instrument(pipeline=pipeline, database_url=url, metrics=False, listeners=[])
        assert relay.accepted == 1
        for n in range(10):
            pipeline.submit(_attempt(n))
        assert pipeline.flush(timeout=30)
        assert pipeline.health().spooled_pending == 10

        relay.silent = False  # the server answers from now on: the writer migrates and replays
        store = next(sink for sink in pipeline.sinks if isinstance(sink, SqlStore))
        deadline = time.monotonic() + 60
        while pipeline.health().spooled_pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pipeline.health().spooled_pending == 0
        assert store.attempt_count() == 10
    finally:
        costwatch.uninstrument()
        pipeline.shutdown(timeout=30)
        relay.cut()


@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_database_outage_spools_records_and_totals_are_exact_after_it_returns(
    postgres_schema: str, tmp_path: Path
) -> None:
    migrate.upgrade(postgres_schema_url(postgres_schema))
    relay = TcpRelay(("127.0.0.1", 5432))
    relay.start()
    store = SqlStore(postgres_schema_url(postgres_schema, port=relay.port))
    pipeline = Pipeline(
        batch_size=100,
        interval_s=0.05,
        spool=Spool(tmp_path / "spool"),
        retry_initial_s=0.05,
        retry_max_s=0.5,
    )
    pipeline.add_sink(store)
    try:
        for n in range(1000):
            pipeline.submit(_attempt(n))
        assert pipeline.flush(timeout=60)
        assert store.attempt_count() == 1000

        relay.cut()
        started = time.monotonic()
        for n in range(1000, 3000):
            pipeline.submit(_attempt(n))
        assert pipeline.flush(timeout=60), "flush blocked while the database was unreachable"
        assert time.monotonic() - started < 60
        health = pipeline.health()
        assert health.write_errors >= 1 and health.spooled_pending == 2000 and health.dropped == 0

        relay.start()
        deadline = time.monotonic() + 120  # the replay of 2,000 records through the relay: minutes at load 15
        while pipeline.health().spooled_pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pipeline.health().spooled_pending == 0
        for n in range(3000, 3200):
            pipeline.submit(_attempt(n))
        assert pipeline.flush(timeout=60)
    finally:
        pipeline.shutdown(timeout=60)
        relay.cut()

    store_url = postgres_schema_url(postgres_schema)
    store = SqlStore(store_url)
    try:
        assert store.attempt_count() == 3200
        [totals] = store.rollup_totals()
        assert totals.attempts == 3200 and totals.billed_input_tokens == 3200 * 1000
        # Every dropped attempt n was followed by its retry n+1, before, during or after the outage.
        assert store.rollup_totals(where={"waste_reason": "abandoned"}) == []
    finally:
        store.shutdown()
    assert_rollups_equal_raw_row_sums(store_url)
